"""How close to this CPU's arithmetic limit a model already runs, and what a target asks of it.

    python benchmarks/roofline.py                       # ~1 min on 2 cores
    python benchmarks/roofline.py --throughput RESULT.json --keras keras.json

The limit is measured, not read from a data sheet: the fastest 3x3 convolution this CPU runs
through torch (oneDNN, channels-last, batch 32; best of three layer shapes of ResNet-18), in
fp32 and, where the CPU has bf16, in bf16 (dropped when slower than fp32, as under
ONEDNN_MAX_CPU_ISA=AVX2, the proxy for a CPU without bf16, where oneDNN emulates it). A
model's arithmetic is torch's FLOP count of its forward pass; a training step is counted as
3 forwards (the input and the weight gradients each cost about one; torch.utils.flop_counter
over-counts grouped convolutions' backward by the group count, so it is not asked). A
model's img/s at the limit is, in practice, a ceiling no change to the loop, the data path or
the allocator gets past; only less arithmetic does (a smaller image, frozen stages). For
models of depthwise convolutions (EfficientNet-Lite, the notebook CNN's separable blocks) it
is far off: those, and their ReLUs and pools, are bound by memory, not arithmetic.

Printed per model: its GFLOP per image, its img/s at the limit (training, inference), and
for each of the speed issue's targets the fraction of the limit it needs; with --throughput
(throughput.py's JSON from this machine) also the fraction its measured figures reach.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_has_bf16, cpu_name  # noqa: E402

from cxrlab.models import create_model  # noqa: E402

SIZES = {"efficientnet_lite0": 192, "resnet18": 224, "cnn": 180}
SHAPES = [(64, 56), (256, 28), (512, 14)]  # channels, side: ResNet-18's stages 1, 3 and 4


def conv_peak(dtype: torch.dtype, repeats: int = 10, rounds: int = 3) -> float:
    """GFLOP/s of the fastest of SHAPES' 3x3 convolutions (forward, no grad), best of rounds:
    a ceiling, and the VM's noise only ever pulls a round down."""
    best = 0.0
    for ch, side in SHAPES * rounds:
        conv = torch.nn.Conv2d(ch, ch, 3, padding=1, bias=False).to(dtype)
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(32, ch, side, side, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            for _ in range(3):
                conv(x)
            start = time.perf_counter()
            for _ in range(repeats):
                conv(x)
            seconds = time.perf_counter() - start
        best = max(best, 2 * 32 * side * side * ch * ch * 9 * repeats / seconds / 1e9)
    return best


def forward_gflop(name: str) -> float:
    model = create_model(name, 2).eval()
    x = torch.zeros(1, 1, SIZES[name], SIZES[name])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,efficientnet_lite0")
    ap.add_argument("--throughput", type=Path,
                    help="throughput.py's JSON from this machine: measured fractions")
    ap.add_argument("--keras", type=Path,
                    help="keras_baseline.py's JSON from this machine: the 2.5x target")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    bf16 = cpu_has_bf16()
    peaks = {"fp32": conv_peak(torch.float32)}
    if bf16:
        peaks["bf16"] = conv_peak(torch.bfloat16)
        if peaks["bf16"] < peaks["fp32"]:  # emulated: ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16
            bf16 = False
            del peaks["bf16"]
    measured = {}
    if args.throughput:
        measured = {r["model"]: r for r in json.loads(args.throughput.read_text())["results"]}
    keras = json.loads(args.keras.read_text()) if args.keras else {}
    keras = keras.get("results", keras)

    print(f"{cpu_name()}, {torch.get_num_threads()} threads, bf16: {'yes' if bf16 else 'no'}"
          + (f" (ONEDNN_MAX_CPU_ISA={os.environ['ONEDNN_MAX_CPU_ISA']})"
             if "ONEDNN_MAX_CPU_ISA" in os.environ else ""))
    print("limit (fastest 3x3 conv): "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items()))
    out = {"cpu": cpu_name(), "bf16": bf16, "peak_gflop_s": peaks, "models": {}}
    for name in args.models.split(","):
        fwd = forward_gflop(name)
        row = {"forward_gflop": fwd}
        print(f"\n{name} {SIZES[name]} px: {fwd:.2f} GFLOP forward, {3 * fwd:.2f} a training step")
        for p, peak in peaks.items():
            row[f"train_limit_{p}"] = peak / (3 * fwd)
            row[f"infer_limit_{p}"] = peak / fwd
            print(f"  at the {p} limit: training {peak / (3 * fwd):6.1f} img/s, "
                  f"inference {peak / fwd:6.1f} img/s")
        targets = []
        if name == "resnet18":
            targets += [("inference fp32 >= 60 img/s", 60.0, peaks["fp32"] / fwd)]
            if bf16:
                targets += [("inference bf16 >= 80 img/s", 80.0, peaks["bf16"] / fwd)]
        if name in keras:
            # cxrlab trains ResNet-18 and the CNN in bf16 where the CPU has it, else fp32
            limit = peaks["bf16" if bf16 else "fp32"] / (3 * fwd)
            need = 2.5 * keras[name]["img_s"]
            targets += [(f"training 2.5x Keras ({keras[name]['img_s']:.1f}) = {need:.1f} img/s",
                         need, limit)]
        for label, need, limit in targets:
            print(f"  target {label}: {need / limit:.0%} of the limit")
        row["targets"] = {label: need / limit for label, need, limit in targets}
        if name in measured:
            r = measured[name]
            prec = "bf16" if "bf16" in r.get("precision", "") and bf16 else "fp32"
            seen = [(f"training step ceiling (a, {prec})", r["a"], peaks[prec] / (3 * fwd)),
                    ("end to end (b)", r["b"], peaks[prec] / (3 * fwd)),
                    ("inference fp32", r["infer_fp32"], peaks["fp32"] / fwd)]
            if bf16:
                seen.append(("inference bf16", r["infer_bf16"], peaks["bf16"] / fwd))
            for label, img_s, limit in seen:
                print(f"  measured {label}: {img_s:.1f} img/s = {img_s / limit:.0%} of the limit")
            row["measured"] = {label: img_s / limit for label, img_s, limit in seen}
        out["models"][name] = row
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
