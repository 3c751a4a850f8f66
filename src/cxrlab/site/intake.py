"""Intake check: do the images being evaluated look like the ones the run was trained on?

A model validated at 98% can fall to 83% at a new hospital whose films are darker, flatter,
letterboxed or exported at another size; nothing in the metrics says why. This module compares
cheap per-image statistics of new images with the same statistics of the run's training and
validation images (stored at training time in RUN/intake.json, computed once from the decoded
uint8 cache, or lazily for older runs), and the new scores with validation's
(val_predictions.csv).

Rule (per statistic): the new images differ when BOTH
  (a) their median lies outside the middle half (25th–75th percentile) of the reference's
      per-image values: the typical new image sits where at most a quarter of the training
      images did, i.e. beyond what validation covered; and
  (b) a two-sample Kolmogorov–Smirnov test rejects "same distribution" at p < 0.01, so a
      handful of unlucky images cannot raise the alarm.
(a) asks "is the difference large?", (b) "is it more than sampling noise?". A difference is
a warning, not an error: the metrics still stand, they just answer for other images.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cxrlab.data.cache import load_images
from cxrlab.data.images import image_header
from cxrlab.errors import CxrlabError
from cxrlab.run import read_predictions, read_split_csv, write_json

# Imported inside the functions that need them: scipy (heavy or
# optional; importing them here would slow every command that imports this module).

log = logging.getLogger("cxrlab")

INTAKE_JSON = "intake.json"
MAX_REFERENCE = 2000  # images summarised at training time (a seeded random subset)
KS_P = 0.01
CONSTANT_STD = 2.0  # grey levels: a row/column flatter than this is border, not anatomy

LABELS = {
    "mean": "mean grey level",
    "std": "contrast (grey-level std)",
    "p05": "dark end (5th percentile grey level)",
    "p95": "bright end (95th percentile grey level)",
    "border": "constant border (fraction of rows and columns)",
    "width": "original width (px)",
    "height": "original height (px)",
    "aspect": "original aspect ratio (w/h)",
    "score": "model score",
}


def image_stats(images: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
    """Per-image grey-level mean, std, 5th/95th percentiles and constant-border fraction of
    uint8 (N, C, S, S) images (colour averaged to grey)."""
    n = len(images)
    out = {k: np.zeros(n) for k in ("mean", "std", "p05", "p95", "border")}
    for s in range(0, n, chunk):
        x = images[s:s + chunk]
        grey = x[:, 0] if x.shape[1] == 1 else np.rint(x.mean(1)).astype(np.uint8)
        m, h, w = grey.shape
        g = grey.reshape(m, -1)
        out["mean"][s:s + m] = g.mean(1)
        out["std"][s:s + m] = g.std(1)
        hist = np.bincount((g + 256 * np.arange(m)[:, None]).ravel(), minlength=256 * m)
        cdf = np.cumsum(hist.reshape(m, 256), 1) / (h * w)
        out["p05"][s:s + m] = np.argmax(cdf >= 0.05, 1)
        out["p95"][s:s + m] = np.argmax(cdf >= 0.95, 1)
        gf = grey.astype(np.float32)
        rows = gf.std(2) < CONSTANT_STD  # (m, h)
        cols = gf.std(1) < CONSTANT_STD  # (m, w)

        def run_len(a: np.ndarray) -> np.ndarray:  # constant lines counted in from each edge
            return np.cumprod(a, 1).sum(1) + np.cumprod(a[:, ::-1], 1).sum(1)

        frac = (run_len(rows) + run_len(cols)) / (h + w)
        out["border"][s:s + m] = np.minimum(frac, 1.0)
    return out


def header_stats(paths: list[Path]) -> dict[str, np.ndarray]:
    """Width, height and aspect of the original files (headers only: cheap)."""
    wh = []
    for p in paths:
        try:
            w, h, *_ = image_header(p)
            wh.append((w, h))
        except Exception:  # a statistic, best effort: never fail a run over a header
            wh.append((np.nan, np.nan))
    a = np.array(wh, dtype=float).reshape(-1, 2)
    return {"width": a[:, 0], "height": a[:, 1], "aspect": a[:, 0] / a[:, 1]}


def all_stats(images: np.ndarray, paths: list[Path]) -> dict[str, np.ndarray]:
    return {**image_stats(images), **header_stats(paths)}


def reference(images: np.ndarray, paths: list[Path], seed: int = 0,
              index: np.ndarray | None = None) -> dict:
    """The training side, as stored in RUN/intake.json: each statistic's per-image values
    (sorted) over at most MAX_REFERENCE of the images (rows `index` of `images`, default
    all; `paths` has one entry per row of `images`)."""
    idx = np.arange(len(images)) if index is None else np.asarray(index)
    n = len(idx)
    if n > MAX_REFERENCE:
        idx = np.sort(np.random.default_rng(seed).choice(idx, MAX_REFERENCE, replace=False))
    stats = all_stats(images[idx], [paths[i] for i in idx])
    return {"n_images": int(n), "n_summarised": int(len(idx)),
            "stats": {k: [round(float(x), 4) for x in np.sort(v[np.isfinite(v)])]
                      for k, v in stats.items()}}


def write_reference(run_dir: Path, images: np.ndarray, paths: list[Path], seed: int = 0,
                    index: np.ndarray | None = None) -> None:
    write_json(Path(run_dir) / INTAKE_JSON, reference(images, paths, seed, index))


def load_reference(run) -> dict | None:
    """RUN/intake.json; for a run trained before it existed, computed now from the training
    data named in config.yaml (and stored, when the run directory is writable)."""
    path = run.run_dir / INTAKE_JSON
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            log.warning("%s: not readable JSON; recomputing it", path)
    try:
        rows = [r for r in read_split_csv(run.run_dir / "split.csv")
                if r["split"] in ("train", "val")]
        paths = [Path(r["path"]) for r in rows if Path(r["path"]).is_file()]
        if not paths:
            raise CxrlabError("the training images are not reachable")
        if len(paths) > MAX_REFERENCE:  # decode only what will be summarised
            keep = np.random.default_rng(run.config.seed).choice(len(paths), MAX_REFERENCE,
                                                                 replace=False)
            paths = [paths[i] for i in np.sort(keep)]
        log.info("%s: summarising %d training images for the intake check (once)",
                 run.run_dir, len(paths))
        images, bad = load_images(paths, run.config.image_size, run.info.in_chans,
                                  skip_bad=True, bit_depth=run.bit_depth)
    except (CxrlabError, OSError, KeyError) as e:
        log.warning("intake check skipped: %s has no %s and its training images cannot be "
                    "read (%s)", run.run_dir, INTAKE_JSON, e)
        return None
    bad_paths = {Path(p) for p, _ in bad}
    ref = reference(images, [p for p in paths if p not in bad_paths], run.config.seed)
    ref["n_images"] = len(rows)
    try:
        write_json(path, ref)
    except OSError:
        pass  # a read-only run still gets the check
    return ref


def compare(ref: dict[str, list[float]], new: dict[str, np.ndarray]) -> dict[str, dict]:
    """The module's rule applied to each statistic both sides have."""
    from scipy.stats import ks_2samp

    out = {}
    for k, values in new.items():
        r = np.asarray(ref.get(k, []), dtype=float)
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if len(r) < 2 or len(v) < 2:
            continue
        q25, q50, q75 = np.percentile(r, [25, 50, 75])
        med = float(np.median(v))
        p = float(ks_2samp(v, r).pvalue)
        outside = med < q25 or med > q75
        out[k] = {"median": med, "reference_q25": float(q25), "reference_median": float(q50),
                  "reference_q75": float(q75), "ks_p": p, "differs": bool(outside and p < KS_P)}
    return out


def check_intake(run, paths: list[Path], images: np.ndarray, probs: np.ndarray,
                 positive: int | None) -> dict | None:
    """Compare new images (and their scores) with the run's; one warning line per statistic
    that differs. Returns what was compared, for the JSON, or None without a reference."""
    ref = load_reference(run)
    if ref is None or len(images) == 0:
        return None
    result = compare(ref["stats"], all_stats(images, paths))
    score_ref = _validation_scores(run, positive)
    if score_ref is not None:
        new = probs[:, positive] if positive is not None else probs.max(1)
        # compared at 6 significant digits, all older runs' CSVs kept: the same images then
        # give the same scores whichever precision the run wrote
        new = np.array([float(f"{v:.6g}") for v in new])
        ref6 = np.array([float(f"{v:.6g}") for v in score_ref])
        result.update(compare({"score": ref6}, {"score": new}))
    what = (f"p({run.classes[positive]})" if positive is not None
            else "top-class probability")
    warnings = []
    for k, r in result.items():
        if not r["differs"]:
            continue
        label = f"{LABELS[k]} {what}" if k == "score" else LABELS[k]
        side = "validation's" if k == "score" else "training's"
        line = (f"intake: {label} differs from the run's images: median {r['median']:.3g} "
                f"here, {side} middle half {r['reference_q25']:.3g}–{r['reference_q75']:.3g} "
                f"(KS p={r['ks_p']:.1g}); metrics here answer for other images than "
                "validation's")
        log.warning("%s", line)
        warnings.append(line)
    return {"rule": "median outside the reference's 25-75% range and KS p < 0.01",
            "n": int(len(images)), "n_reference": ref.get("n_images"), "stats": result,
            "warnings": warnings}


def _validation_scores(run, positive: int | None) -> np.ndarray | None:
    path = run.run_dir / "val_predictions.csv"
    if not path.is_file():
        return None
    try:
        _, _, probs = read_predictions(path, run.classes)
    except CxrlabError:
        return None
    return probs[:, positive] if positive is not None else probs.max(1)
