"""An int8 ONNX file of a run, and what int8 changes on the run's own validation images.

fp32 inference of ResNet-18 at 224 px at 60 images/s needs about 220 GFLOP/s: nearly the
whole fp32 peak of two cores without AVX-512 (2 x 32 FLOP a cycle with AVX2). 8-bit integer
arithmetic does more per instruction, so a deployment that must be fast on such a CPU can
trade a little agreement for speed. Nothing in cxrlab decides in int8 unless a user asks:
training, the threshold, metrics, evaluate and the default predict stay fp32.

ONNX Runtime's static quantization does the work (QDQ format, uint8 activations, int8 weights
per output channel, MinMax ranges from training images: its own guidance for x86 CPUs). On a
CPU without VNNI ONNX Runtime multiplies uint8 by int8 in pairs summed in 16 bits, which can
saturate; weights then get 7 bits (`reduce_range`), as that guidance says. So the file is
quantized for the kind of CPU that exports it, and the check written into it holds there;
`portable` gives 7 bits everywhere, for a file that scores the same on any x86 CPU
(benchmarks/int8_without_vnni.py: bit-identical under ONNX Runtime's AVX2 and VNNI kernels,
while an 8-bit file changed decisions there). `OnnxPredictor` refuses a file made for VNNI
on a CPU without it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cxrlab.cpu import cpu_has_vnni, cpu_name
from cxrlab.data.cache import load_images
from cxrlab.deploy.export import OnnxPredictor, check_out, fp32_graph, save_onnx, set_metadata
from cxrlab.deploy.inference import decide
from cxrlab.errors import CxrlabError
from cxrlab.run import LoadedRun, load_run, read_predictions, read_split_csv

# Imported inside the functions that need them: onnx, onnxruntime, sklearn (heavy or
# optional; importing them here would slow every command that imports this module).

CALIBRATION_IMAGES = 256
SPEED_IMAGES = 128  # timed in fp32 and int8, from the calibration images
# The ranges are min/max over all images, the same file at any batch size; a batch of 32 took
# the export to 3.6 GB (EfficientNet-Lite0), 8 to 2.0 GB, as fast
CALIBRATION_BATCH = 8


def calibration_paths(run: LoadedRun, n: int) -> list[Path]:
    """`n` of the run's training images, spread evenly over split.csv (always the same ones)."""
    rows = read_split_csv(Path(run.run_dir) / "split.csv")
    train = [Path(r["path"]) for r in rows if r["split"] == "train"]
    if not train:
        raise CxrlabError(f"--int8: {run.run_dir}/split.csv names no training images "
                          "to calibrate on")
    return [train[i] for i in np.unique(np.linspace(0, len(train) - 1, n).round().astype(int))]


def load(paths: list[Path], run: LoadedRun, what: str) -> np.ndarray:
    for p in paths:
        if not p.is_file():
            raise CxrlabError(f"--int8: {what} image {p} not found (int8 needs the run's "
                              f"{what} images where they were when it trained)")
    images, _ = load_images(paths, run.config.image_size, run.info.in_chans,
                            bit_depth=run.bit_depth)
    return images


def agreement(run: LoadedRun, y: np.ndarray, fp32: np.ndarray, int8: np.ndarray) -> dict:
    """What int8 changes on the validation images: decisions at the run's threshold, the
    largest change of a class probability, accuracy and AUC before and after."""
    from sklearn.metrics import roc_auc_score

    pos, t = run.info.positive, run.threshold
    before, after = decide(fp32, pos, t), decide(int8, pos, t)

    def auc(p: np.ndarray) -> float | None:
        """The positive class's AUC, or with more classes the mean one-vs-rest AUC over the
        classes present, as `cxrlab evaluate` reports it (sklearn's multiclass AUC refuses
        int8 probabilities: their rows need not sum to exactly 1)."""
        ks = range(p.shape[1]) if pos is None else [pos]
        aucs = [roc_auc_score(y == k, p[:, k]) for k in ks if 0 < (y == k).sum() < len(y)]
        return float(np.mean(aucs)) if aucs else None

    return {"images": int(len(y)),
            "changed_decisions": int((before != after).sum()),
            "max_probability_change": float(np.abs(int8 - fp32).max()) if len(y) else 0.0,
            "accuracy": {"fp32": float((before == y).mean()), "int8": float((after == y).mean())},
            "auc": {"fp32": auc(fp32), "int8": auc(int8)}}


@contextmanager
def quiet_onnxruntime():
    """ONNX Runtime's quantizer logs on the root logger: each rescaled weight (dozens of lines
    for EfficientNet-Lite0), and a warning for each 1-D weight it quantizes per tensor rather
    than per channel (the notebook CNN's batch norms). Nothing there for a user to act on: the
    check says what quantization did. Its records below ERROR are dropped while it runs."""
    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname

    handlers = logging.getLogger().handlers
    for h in handlers:
        h.addFilter(keep)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(keep)


def quantize_graph(proto, batches: Iterable[dict[str, np.ndarray]], reduce_range: bool):
    """An fp32 ONNX graph (ModelProto) quantized to int8 by ONNX Runtime, its ranges from
    `batches` (each a dict of the graph's inputs); metadata as given."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="cxrlab-int8-") as d, quiet_onnxruntime():
        onnx.save(proto, f"{d}/fp32.onnx")
        quant_pre_process(f"{d}/fp32.onnx", f"{d}/pre.onnx")  # shapes, folded constants
        quantize_static(f"{d}/pre.onnx", f"{d}/int8.onnx", Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        reduce_range=reduce_range, calibrate_method=CalibrationMethod.MinMax)
        return onnx.load(f"{d}/int8.onnx")


def quantize_run_graph(proto, calib: np.ndarray, reduce_range: bool):
    """A run's fp32 graph (input `image`, uint8) quantized with ranges from `calib`, as
    `export --int8` does it."""
    return quantize_graph(proto, ({"image": calib[i : i + CALIBRATION_BATCH]}
                                  for i in range(0, len(calib), CALIBRATION_BATCH)), reduce_range)


def images_per_second(session, images: np.ndarray) -> float:
    """ONNX Runtime's rate on this CPU, batches of 64, best of two passes after a warm-up:
    whether int8 pays here at all (the notebook CNN ran slower in int8 on Zen 4)."""

    OnnxPredictor.scores(session, images[:64])
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        OnnxPredictor.scores(session, images)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def export_int8(run: LoadedRun | Path, out: Path, overwrite: bool = False,
                calibration_images: int = CALIBRATION_IMAGES,
                portable: bool = False) -> tuple[Path, dict]:
    """Write the run as an int8 ONNX file; (its path, the check on the validation images).

    `portable`: 7-bit weights even on a CPU with VNNI, so that the file and its check hold on
    CPUs without it too (a few more changed decisions; the same speed with VNNI).

    The check compares the int8 file with the run's own fp32 scores (val_predictions.csv)
    and is stored in the file's metadata (`int8_check`, JSON) beside the usual keys."""
    import onnxruntime as ort


    out = check_out(out, overwrite)
    if calibration_images < 1:
        raise CxrlabError(f"--calibration-images {calibration_images}: must be at least 1")
    if not isinstance(run, LoadedRun):
        run = load_run(run)
    calib = load(calibration_paths(run, calibration_images), run, "calibration")
    val_paths, y, fp32 = read_predictions(Path(run.run_dir) / "val_predictions.csv", run.classes)
    val = load([Path(p) for p in val_paths], run, "validation")

    reduce_range = portable or not cpu_has_vnni()
    proto = fp32_graph(run)
    meta = {p.key: p.value for p in proto.metadata_props}
    int8 = quantize_run_graph(proto, calib, reduce_range)

    def session(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    # one session at a time: each keeps its working memory while it lives (the default
    # model's export peaked at 3.1 GB with both at once, 2.1 GB so)
    timed = np.resize(calib, (SPEED_IMAGES, *calib.shape[1:]))
    s = session(int8)
    scores, speed = OnnxPredictor.scores(s, val), {"int8": images_per_second(s, timed)}
    del s
    speed["fp32"] = images_per_second(session(proto), timed)
    check = agreement(run, y, fp32, scores) | {
        "calibration_images": int(len(calib)), "reduce_range": reduce_range,
        "cpu": cpu_name(), "cpu_vnni": cpu_has_vnni(), "vnni": not reduce_range,
        "images_per_second": speed}
    set_metadata(int8, meta | {"precision": "int8", "int8_check": json.dumps(check)})
    return save_onnx(int8, out), check
