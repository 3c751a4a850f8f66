"""Site calibration: refit a run's threshold and probabilities on a small sample of a new intake.

A model can still rank a new hospital's films well (AUC holds) while its scores have moved:
normal films pushed towards pneumonia, so the validation threshold calls too many positive.
Tens of labelled images per class from the new site are enough to move the threshold back.

What is fitted, on the sample only:
- 2 classes: Platt scaling of the positive logit, p' = sigmoid(a * z + b) (sklearn's
  LogisticRegression, default L2, which keeps `a` finite when a tiny sample separates
  perfectly), then the run's own threshold rule (Youden's J, or its sensitivity target) on p'.
  Platt is monotone, so the decisions are those of the refitted threshold; it makes the
  probabilities mean something at the new site.
- K > 2 classes: one temperature T on the logits (argmax decisions are unchanged).
Both maps are affine in the logits, so they are folded into the final linear layer (`fc`) of
the new run's model.pt: evaluate, predict, serve, export (ONNX), Grad-CAM and report all use
the calibrated model with no code of their own. checkpoints/ keep the original training's
weights (they are what `--resume` would continue; a complete run is never resumed).

The new run is a copy of the original with model.pt, threshold, val_predictions.csv (the
original validation images' probabilities mapped through the same calibration), metrics.json
and its plots replaced, and run.json["site_calibration"] saying what it was fitted on. Files
that described the old model's behaviour elsewhere (metrics_test.json, shift.json, report.html)
are not copied. The original run is not touched; the new one appears all at once (built in a
temporary folder beside it, then renamed).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from cxrlab.errors import CxrlabError

log = logging.getLogger("cxrlab")

MIN_PER_CLASS = 10
NOT_COPIED = (".lock", "report.html", "error.txt", "metrics_test.json", "shift.json",
              "shift.png", "val_predictions.png", ".*.tmp")
_EPS = 1e-7  # float32 probabilities saturate near 1 - 6e-8; logits beyond +-16 carry nothing


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def platt(z: np.ndarray, is_pos: np.ndarray) -> tuple[float, float]:
    """(a, b) of p' = sigmoid(a z + b), fitted by (lightly L2-regularised) logistic regression."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0).fit(z.reshape(-1, 1), is_pos.astype(int))
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def temperature(log_probs: np.ndarray, y: np.ndarray) -> float:
    """T minimising the negative log-likelihood of softmax(logits / T) (log p are the logits up
    to a per-row constant, which softmax ignores)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def nll(log_t: float) -> float:
        return -float(log_softmax(log_probs / np.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def apply_binary(probs: np.ndarray, positive: int, a: float, b: float) -> np.ndarray:
    out = np.empty_like(probs, dtype=np.float64)
    out[:, positive] = _sigmoid(a * _logit(probs[:, positive]) + b)
    out[:, 1 - positive] = 1 - out[:, positive]
    return out


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    from scipy.special import softmax

    return softmax(np.log(np.clip(probs, 1e-12, 1)) / t, axis=1)


def balanced_accuracy(is_pos: np.ndarray, score: np.ndarray, threshold: float) -> float:
    called = score >= threshold
    return float((called[is_pos].mean() + (~called[~is_pos]).mean()) / 2)


def bootstrap_threshold(is_pos: np.ndarray, score: np.ndarray, rule: str, target: float,
                        n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of the refitted threshold over resamples of the sample
    (stratified: each resample keeps the sample's count of each class)."""
    from cxrlab.evaluate import choose_threshold

    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(is_pos), np.flatnonzero(~is_pos)
    ts = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        ts.append(choose_threshold(is_pos[idx], score[idx], rule, target))
    lo, hi = np.percentile(ts, [2.5, 97.5])
    return [float(lo), float(hi)]


def _sample(run, data: Path, image_col, label_col, split, skip_bad):
    """The labelled sample's records and images; refused (before any work) when a class has
    fewer than MIN_PER_CLASS images."""
    from collections import Counter

    from cxrlab.data.cache import load_images
    from cxrlab.scoring import labelled_records

    records = labelled_records(run.classes, data, image_col, label_col, split)

    def check(recs) -> None:
        counts = Counter(r.label for r in recs)
        for c in run.classes:
            if counts[c] < MIN_PER_CLASS:
                raise CxrlabError(f"{data}: {counts[c]} {c} image(s); site calibration needs at "
                                  f"least {MIN_PER_CLASS} of each class")

    check(records)
    images, bad = load_images([r.path for r in records], run.config.image_size,
                              run.info.in_chans, skip_bad=skip_bad)
    bad_paths = {Path(p) for p, _ in bad}
    records = [r for r in records if r.path not in bad_paths]
    check(records)
    y = np.array([run.classes.index(r.label) for r in records], dtype=np.int64)
    return records, images, y


def calibrate_run(run_dir: Path, data: Path, out: Path, image_col: str | None = None,
                  label_col: str | None = None, split: str | None = None,
                  skip_bad: bool = False, n_boot: int = 1000) -> dict:
    """Fit the calibration on DATA and write it as the new complete run OUT; returns a summary."""
    from cxrlab.evaluate import choose_threshold
    from cxrlab.inference import predict_probs
    from cxrlab.run import check_out_dir, load_run

    out = Path(out)
    check_out_dir(out)
    if out.resolve().is_relative_to(Path(run_dir).resolve()):
        raise CxrlabError(f"--out {out}: inside the run {run_dir}; choose a folder outside it")
    run = load_run(run_dir)
    _, images, y = _sample(run, data, image_col, label_col, split, skip_bad)
    probs = predict_probs(run.model, images)
    pos = run.info.positive
    n_per_class = {c: int((y == k).sum()) for k, c in enumerate(run.classes)}
    cal: dict = {"data": str(Path(data).resolve()), "n_per_class": n_per_class,
                 "calibrated_from": str(Path(run_dir).resolve()),
                 "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if pos is not None:
        from sklearn.metrics import roc_auc_score

        is_pos = y == pos
        auc = float(roc_auc_score(is_pos, probs[:, pos]))
        a, b = platt(_logit(probs[:, pos]), is_pos)
        if a <= 0:
            raise CxrlabError(f"{data}: the run's scores do not rank the classes here (ROC AUC "
                              f"{auc:.2f}); a new threshold cannot help: retrain instead")
        score = apply_binary(probs, pos, a, b)[:, pos]
        rule, target = run.config.threshold_rule, run.config.target_sensitivity
        threshold = choose_threshold(is_pos, score, rule, target)
        old = 0.5 if run.threshold is None else run.threshold
        old_rescaled = float(_sigmoid(a * _logit(np.array([old]))[0] + b))
        cal.update(method="platt", a=a, b=b, threshold_rule=rule, threshold=threshold,
                   threshold_ci=bootstrap_threshold(is_pos, score, rule, target, n_boot,
                                                    run.config.seed),
                   original_threshold=run.threshold,
                   original_threshold_rescaled=old_rescaled, sample_roc_auc=auc,
                   sample_balanced_accuracy_before=balanced_accuracy(is_pos, probs[:, pos], old),
                   sample_balanced_accuracy_after=balanced_accuracy(is_pos, score, threshold))
    else:
        t = temperature(np.log(np.clip(probs, 1e-12, 1)), y)
        threshold = None
        cal.update(method="temperature", temperature=t,
                   sample_accuracy=float((probs.argmax(1) == y).mean()))
    _write_run(run, out, cal, threshold)
    return {**cal, "out": str(out)}


def describe(r: dict) -> str:
    """The summary of `calibrate_run` in two sentences, for the console."""
    counts = ", ".join(f"{v} {k}" for k, v in r["n_per_class"].items())
    if r["method"] != "platt":
        return f"Sample: {counts}. Temperature {r['temperature']:.3g}."
    lo, hi = r["threshold_ci"]
    old = "0.5 (none saved)" if r["original_threshold"] is None else \
        f"{r['original_threshold']:.4g}"
    return (f"Sample: {counts} (ROC AUC {r['sample_roc_auc']:.3f}). Threshold "
            f"{r['threshold']:.4g} (95% bootstrap interval {lo:.4g}-{hi:.4g}); the original "
            f"{old} is {r['original_threshold_rescaled']:.4g} on the calibrated scale. "
            "Balanced accuracy on the sample (in-sample, so optimistic): "
            f"{r['sample_balanced_accuracy_before']:.3f} -> "
            f"{r['sample_balanced_accuracy_after']:.3f}.")


def _write_run(run, out: Path, cal: dict, threshold: float | None) -> None:
    """Copy the run to a temporary sibling of OUT, replace what the calibration changes, and
    rename it into place: OUT is complete or absent."""
    tmp = out.parent / f".{out.name}.calibrating-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(run.run_dir, tmp, ignore=shutil.ignore_patterns(*NOT_COPIED))
        _calibrate_files(run, tmp, cal, threshold)
        if out.is_dir():
            out.rmdir()  # check_out_dir allowed only an empty one
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _calibrate_files(run, new: Path, cal: dict, threshold: float | None) -> None:
    from cxrlab import plots
    from cxrlab.evaluate import compute_metrics
    from cxrlab.run import read_predictions, write_json, write_predictions_csv, write_threshold

    classes, pos = run.classes, run.info.positive
    state = torch.load(new / "model.pt", map_location="cpu", weights_only=True)
    if "fc.weight" not in state or "fc.bias" not in state:
        raise CxrlabError(f"{run.run_dir}: model.pt has no final linear layer (fc); cannot "
                          "fold a calibration into it")
    w, bias = state["fc.weight"].double(), state["fc.bias"].double()
    if pos is not None:  # one logit z = w.f + bias -> a z + b (the logit is the positive's)
        w, bias = cal["a"] * w, cal["a"] * bias + cal["b"]

        def mapping(p: np.ndarray) -> np.ndarray:
            return apply_binary(p, pos, cal["a"], cal["b"])
    else:
        w, bias = w / cal["temperature"], bias / cal["temperature"]

        def mapping(p: np.ndarray) -> np.ndarray:
            return apply_temperature(p, cal["temperature"])
    state["fc.weight"] = w.to(state["fc.weight"].dtype)
    state["fc.bias"] = bias.to(state["fc.bias"].dtype)
    torch.save(state, new / "model.pt")
    if threshold is not None:
        write_threshold(new, threshold)

    mfile = run.run_dir / "metrics.json"
    old = json.loads(mfile.read_text()) if mfile.is_file() else {}
    vp_file = new / "val_predictions.csv"
    if vp_file.is_file():
        paths, vy, vp = read_predictions(vp_file, classes)
        vp = mapping(vp)
    else:  # a run from before val_predictions.csv: score its validation images again
        from cxrlab.report import recompute_val_predictions
        from cxrlab.run import read_split_csv

        paths, vy, vp = recompute_val_predictions(new, read_split_csv(new / "split.csv"))
    write_predictions_csv(vp_file, paths, [classes[k] for k in vy], vp, classes)
    metrics = compute_metrics(vy, vp, classes, positive=pos, threshold=threshold,
                              seed=run.config.seed)
    metrics.update({k: old[k] for k in ("split", "epochs", "train_seconds") if k in old})
    write_json(new / "metrics.json", metrics)
    plots.plot_confusion(np.array(metrics["confusion_matrix"]), classes,
                         new / "confusion_matrix.png",
                         title="Validation confusion matrix (site-calibrated)")
    plots.plot_roc(vy, vp, classes, new / "roc.png", positive=pos, threshold=threshold)
    plots.plot_pr(vy, vp, classes, new / "pr.png", positive=pos)
    info = json.loads((new / "run.json").read_text())
    info["site_calibration"] = cal
    write_json(new / "run.json", info)
