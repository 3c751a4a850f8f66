"""Does an int8 file score the same on a CPU without VNNI? Measured here, on one with it.

ONNX Runtime picks its int8 kernels by CPUID. Natively on a CPU with VNNI (Zen 4) it runs
its VNNI kernels; under valgrind, which emulates no AVX-512, the same process takes its AVX2
kernels (vpmaddubsw: pairs of uint8 x int8 products summed in 16 bits, which can saturate),
as on a Zen 3 or an Intel laptop without VNNI. The same file and images, both ways:

    python benchmarks/int8_without_vnni.py RUN [RUN ...] --json out.json   # ~5 min a run
    python benchmarks/int8_without_vnni.py RUN --instructions              # +20 min (ResNet-18)

Per run, the two files `cxrlab export --int8` can write: 8-bit weights (made on a CPU with
VNNI) and 7-bit (`--portable`, or made on a CPU without VNNI), quantized as export does
(`cxrlab.deploy.quantize`: the run's graph, its calibration images). For each: the largest change
of a probability and the decisions changed between the two kernels, and each against fp32.
Times under valgrind mean nothing: there are no speeds here. `--instructions` counts, with
callgrind, the instructions per image of the fp32 and the 7-bit file on the AVX2 kernels
(two batches of 4 images less one, so that loading is not counted): a hint of what int8
gains without VNNI, not a speed (an AVX2 CPU may run 8-bit multiplies at another rate than
fp32 FMAs). Needs valgrind (Debian package).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = 1
s = ort.InferenceSession(sys.argv[1], o, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
for _ in range(int(sys.argv[4]) if len(sys.argv) > 4 else 1):
    y = np.concatenate([s.run(None, {"image": x[i:i + 16]})[0] for i in range(0, len(x), 16)])
np.save(sys.argv[3], y)
"""
COUNTED = 4  # images a batch when counting instructions


def scores(graph: Path, images: Path, under_valgrind: bool) -> np.ndarray:
    out = graph.with_suffix(".valgrind.npy" if under_valgrind else ".native.npy")
    cmd = [sys.executable, "-c", CHILD, str(graph), str(images), str(out)]
    if under_valgrind:
        cmd = ["valgrind", "--tool=none", "--quiet", *cmd]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return np.load(out)


def instructions_per_image(graph: Path, images: np.ndarray) -> float:
    """Instructions per image under callgrind (AVX2 kernels): 2 batches less 1."""
    x = graph.with_suffix(".counted.npy")
    np.save(x, images[:COUNTED])
    counts = []
    for batches in (1, 2):
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
               sys.executable, "-c", CHILD, str(graph), str(x),
               str(graph.with_suffix(".out.npy")), str(batches)]
        err = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
        counts.append(int(re.search(r"I\s+refs:\s+([\d,]+)", err)[1].replace(",", "")))
    return (counts[1] - counts[0]) / COUNTED


def measure(run_dir: Path, n_images: int, tmp: Path, count: bool) -> dict:
    import onnx

    from cxrlab.cpu import cpu_name
    from cxrlab.deploy.export import fp32_graph
    from cxrlab.deploy.quantize import (
        CALIBRATION_IMAGES,
        agreement,
        calibration_paths,
        load,
        quantize_run_graph,
    )
    from cxrlab.run import load_run, read_predictions

    run = load_run(run_dir)
    calib = load(calibration_paths(run, CALIBRATION_IMAGES), run, "calibration")
    paths, y, _ = read_predictions(run_dir / "val_predictions.csv", run.classes)
    pick = np.unique(np.linspace(0, len(paths) - 1, n_images).round().astype(int))

    def compare(a: np.ndarray, b: np.ndarray) -> dict:
        check = agreement(run, y[pick], b, a)
        return {k: check[k] for k in ("max_probability_change", "changed_decisions")}

    images = tmp / f"{run_dir.name}-images.npy"
    np.save(images, load([Path(paths[i]) for i in pick], run, "validation"))
    graphs = {"fp32": fp32_graph(run)}
    for bits, reduce_range in (("8-bit", False), ("7-bit", True)):
        graphs[bits] = quantize_run_graph(graphs["fp32"], calib, reduce_range)
    files = {}
    for name, proto in graphs.items():
        files[name] = tmp / f"{run_dir.name}-{name}.onnx"
        onnx.save(proto, files[name])
    fp32 = scores(files["fp32"], images, False)
    result = {"run": str(run_dir), "model": run.config.model, "images": len(pick),
              "cpu": cpu_name()}
    for bits in ("8-bit", "7-bit"):
        vnni, avx2 = scores(files[bits], images, False), scores(files[bits], images, True)
        result[bits] = {"avx2_vs_vnni": compare(avx2, vnni),
                        "vnni_vs_fp32": compare(vnni, fp32),
                        "avx2_vs_fp32": compare(avx2, fp32)}
        print(f"{run_dir.name} ({run.config.model}) {bits}: "
              + "; ".join(f"{k} max dp {v['max_probability_change']:.4f}, "
                          f"{v['changed_decisions']} of {len(pick)} decisions changed"
                          for k, v in result[bits].items()), flush=True)
    if count:
        x = np.load(images)
        result["avx2_instructions_per_image"] = {
            k: instructions_per_image(files[k], x) for k in ("fp32", "7-bit")}
        print(f"{run_dir.name}: instructions per image on the AVX2 kernels "
              f"{result['avx2_instructions_per_image']}", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished cxrlab run directories")
    ap.add_argument("--images", type=int, default=128,
                    help="validation images scored (spread evenly; valgrind is slow)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--instructions", action="store_true",
                    help="also count instructions per image (fp32, 7-bit) on the AVX2 kernels")
    args = ap.parse_args()
    from cxrlab.cpu import cpu_has_vnni

    if shutil.which("valgrind") is None:
        sys.exit("needs valgrind (apt-get install valgrind)")
    if not cpu_has_vnni():
        sys.exit("this CPU has no VNNI: natively ONNX Runtime runs the same AVX2 kernels as "
                 "under valgrind; nothing to compare")
    with tempfile.TemporaryDirectory(prefix="int8-vnni-") as d:
        results = [measure(r, args.images, Path(d), args.instructions) for r in args.runs]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
