"""Stress test: how a run scores when the intake changes in ways validation never showed.

Each shift is a small pure function `f(images, level, seed) -> images` on the uint8 arrays the
model sees (N, C, S, S): deterministic for a seed, batched (numpy / torch / PIL), never in
place. `SHIFTS` gives each one three graded levels, mild to severe, chosen to look like what a
new site's scanner, post-processing or export can do to chest films. `stress_test` scores the
run on every (shift, level) through the one inference path
(`cxrlab.deploy.inference.predict_probs`) at
the run's own threshold, beside the unshifted baseline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxrlab.data.images import recompress_jpeg
from cxrlab.deploy.inference import decide
from cxrlab.progress import progress_bar
from cxrlab.reporting import plots
from cxrlab.run import SHIFT_JSON, write_json

# Imported inside the functions that need them: rich, sklearn (heavy or
# optional; importing them here would slow every command that imports this module).

log = logging.getLogger("cxrlab")

RESULT_JSON = SHIFT_JSON  # RUN/shift.json: read back by cxrlab.run.read_shift (the report)
RESULT_PNG = "shift.png"


def _to_uint8(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.numpy()
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32))  # a copy: inputs are never written


def gamma(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """Grey-level gamma: `level` > 1 darkens the mid-tones (a different LUT/export curve)."""
    lut = _to_uint8(255.0 * (np.arange(256) / 255.0) ** level)
    return lut[images]


def contrast(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """Contrast scaled by `level` about each image's own mean (flatter films below 1)."""
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return _to_uint8(mean + level * (x - mean))


def brightness(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """`level` grey levels added everywhere (a brighter window), clipped to 0..255."""
    return _to_uint8(images.astype(np.float32) + level)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def blur(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """Gaussian blur with sigma `level` pixels (at the model's input size), edges reflected."""
    x = _float(images)
    n, c, h, w = x.shape
    k = _gaussian_kernel(level)
    r = (len(k) - 1) // 2
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return _to_uint8(y.reshape(n, c, h, w))


def downsample(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """Down by a factor `level` (area average), then back up (bilinear): a low-resolution
    source upscaled to the model's size."""
    x = _float(images)
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h / level)), max(1, round(w / level))),
                          mode="area")
    return _to_uint8(F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False))


def noise(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise, standard deviation `level` grey levels (a noisier detector)."""
    rng = np.random.default_rng(seed)
    return _to_uint8(images.astype(np.float32) + rng.normal(0, level, images.shape))


def jpeg(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """JPEG re-compression at quality `level` (PACS exports, screenshots)."""
    return recompress_jpeg(images, [int(level)] * len(images))


def zoom(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """The central `level` fraction of each side, resized back up (tighter collimation)."""
    x = _float(images)
    h, w = x.shape[-2:]
    ch, cw = max(1, round(h * level)), max(1, round(w * level))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    return _to_uint8(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False,
                                   antialias=True))


def rotation(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """Rotated by `level` degrees, clockwise or anticlockwise per image (seeded); corners
    filled black (patient positioning, a tilted scan)."""
    x = _float(images)
    n = x.shape[0]
    sign = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    a = torch.from_numpy(np.deg2rad(level) * sign).float()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return _to_uint8(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                   align_corners=False))


def border(images: np.ndarray, level: float, seed: int = 0) -> np.ndarray:
    """Letterboxed: the image shrunk to leave a black border of `level` x the side on every
    side (a film digitised on a larger plate, a framed export)."""
    x = _float(images)
    h, w = x.shape[-2:]
    ih, iw = max(1, round(h * (1 - 2 * level))), max(1, round(w * (1 - 2 * level)))
    small = F.interpolate(x, size=(ih, iw), mode="bilinear", align_corners=False,
                          antialias=True)
    out = torch.zeros_like(x)
    top, left = (h - ih) // 2, (w - iw) // 2
    out[..., top:top + ih, left:left + iw] = small
    return _to_uint8(out)


@dataclass(frozen=True)
class Shift:
    name: str
    fn: Callable[[np.ndarray, float, int], np.ndarray]
    levels: tuple[float, float, float]  # mild, moderate, severe
    unit: str


SHIFTS: dict[str, Shift] = {s.name: s for s in (
    Shift("gamma", gamma, (1.3, 1.7, 2.2), "gamma"),
    Shift("contrast", contrast, (0.8, 0.6, 0.4), "x contrast"),
    Shift("brightness", brightness, (15, 35, 60), "grey levels added"),
    Shift("blur", blur, (0.7, 1.5, 3.0), "sigma, px"),
    Shift("downsample", downsample, (2, 3, 4), "factor"),
    Shift("noise", noise, (5, 12, 25), "sigma, grey levels"),
    Shift("jpeg", jpeg, (50, 20, 8), "quality"),
    Shift("zoom", zoom, (0.9, 0.8, 0.7), "fraction kept"),
    Shift("rotation", rotation, (5, 12, 25), "degrees"),
    Shift("border", border, (0.04, 0.1, 0.18), "border per side"),
)}


def apply_shift(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """`images` under shift `name` at severity 1 (mild), 2 or 3 (severe)."""
    s = SHIFTS[name]
    return s.fn(images, s.levels[severity - 1], seed)


def score(y: np.ndarray, probs: np.ndarray, positive: int | None,
          threshold: float | None) -> dict:
    """AUC, accuracy and (2 classes) sensitivity/specificity at the run's threshold."""
    from sklearn.metrics import roc_auc_score


    pred = decide(probs, positive, threshold)
    out = {"accuracy": float((pred == y).mean()) if len(y) else None,
           "roc_auc": None, "sensitivity": None, "specificity": None}
    if len(np.unique(y)) < 2:
        return out
    if positive is not None:
        is_pos = y == positive
        out["roc_auc"] = float(roc_auc_score(is_pos, probs[:, positive]))
        out["sensitivity"] = float((pred[is_pos] == positive).mean())
        out["specificity"] = float((pred[~is_pos] != positive).mean())
    elif len(np.unique(y)) == probs.shape[1]:
        out["roc_auc"] = float(roc_auc_score(y, probs, multi_class="ovr"))
    return out


def stress_test(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                y: np.ndarray, positive: int | None, threshold: float | None,
                shifts: list[str] | None = None, seed: int = 0) -> dict:
    """{baseline: scores, rows: [{shift, severity, level, unit, scores...}]} for each shift.

    `predict` is the caller's own uint8 -> probabilities path (evaluate's), so shifted and
    unshifted images go through exactly what deployment runs. The threshold stays the run's:
    the question is what the deployed model does, unchanged.
    """
    def run(x: np.ndarray) -> dict:
        return score(y, predict(x), positive, threshold)

    # every row in order, then the baseline (benchmarks/framing.py keys its scores so)
    names = shifts or list(SHIFTS)
    steps = 1 + sum(len(SHIFTS[name].levels) for name in names)
    what = f"stress test: {len(y)} images"
    with progress_bar(what, steps) as advance:
        rows = []
        for name in names:
            s = SHIFTS[name]
            for k, level in enumerate(s.levels, start=1):
                advance(f"{what}, {name} {level:g} ({s.unit})")
                rows.append({"shift": name, "severity": k, "level": level, "unit": s.unit,
                             **run(s.fn(images, level, seed))})
        advance(f"{what}, unshifted")
        baseline = run(images)
    return {"n": int(len(y)), "threshold": threshold, "seed": seed, "baseline": baseline,
            "rows": rows}


def render(result: dict, console) -> None:
    """One Rich table: the baseline, then each shift's three severities."""
    from rich.table import Table

    def f(v):
        return "–" if v is None else f"{v:.3f}"

    units = "; ".join(f"{s.name}: {s.unit}" for s in SHIFTS.values())
    table = Table("shift", "severity", "level", "AUC", "sensitivity", "specificity", "accuracy",
                  title=f"Stress test ({result['n']} images, run's threshold)",
                  caption=f"levels: {units}")
    b = result["baseline"]
    table.add_row("none", "0", "", f(b["roc_auc"]), f(b["sensitivity"]), f(b["specificity"]),
                  f(b["accuracy"]), style="bold")
    for r in result["rows"]:
        table.add_row(r["shift"], str(r["severity"]), f"{r['level']:g}", f(r["roc_auc"]),
                      f(r["sensitivity"]), f(r["specificity"]), f(r["accuracy"]))
    console.print(table)


def save(run_dir: Path, result: dict) -> tuple[Path, Path] | None:
    """RUN/shift.json and RUN/shift.png, each written atomically (an earlier stress test's
    pair is replaced; nothing else in the run is touched). A run folder that cannot take them
    (read-only, full) is one warning and None: the stress test is already in the caller's
    hands (and its --json), and is not thrown away for a copy in the run."""
    run_dir = Path(run_dir)
    js, png = run_dir / RESULT_JSON, run_dir / RESULT_PNG
    try:
        write_json(js, result)  # what the report shows (it redraws the figure from it)
    except OSError as e:
        log.warning("%s: cannot write the stress test there (%s); the report will not show "
                    "it", run_dir, e.strerror or e)
        return None
    try:
        plots.plot_shift(result, png)
    except OSError as e:
        log.warning("%s: cannot write %s there (%s)", run_dir, RESULT_PNG, e.strerror or e)
        try:
            png.unlink(missing_ok=True)  # an earlier test's figure beside this JSON would lie
        except OSError:
            pass
        return None
    return js, png
