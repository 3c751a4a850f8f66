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
the calibrated model with no code of their own. The threshold is chosen on that model's own
scores of the sample, and its interval, like metrics.json's, resamples patients.
checkpoints/ keep the original training's weights (they are what `--resume` would continue; a
complete run is never resumed).

The new run is a copy of the original with model.pt, threshold, val_predictions.csv (the
original validation images' probabilities mapped through the same calibration), metrics.json
and its plots replaced, and run.json["site_calibration"] saying what it was fitted on. Files
that described the old model's behaviour elsewhere (metrics_test.json, shift.json, report.html)
are not copied. The original run is not touched; the new one appears all at once (built in a
temporary folder beside it, then renamed).
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import os
import shutil
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cxrlab.data.cache import load_images
from cxrlab.data.split import patient_key
from cxrlab.deploy.inference import predict_probs
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.metrics import (
    choose_threshold,
    compute_metrics,
    group_codes,
    interval_method,
)
from cxrlab.evaluation.overlap import record_sample
from cxrlab.evaluation.scoring import labelled_records
from cxrlab.models.tta import with_tta, without_tta
from cxrlab.reporting import plots
from cxrlab.reporting.report import recompute_val_predictions
from cxrlab.run import (
    check_out_dir,
    load_run,
    patient_keys,
    read_predictions,
    read_split_csv,
    write_json,
    write_predictions_csv,
    write_threshold,
)

# Imported inside the functions that need them: scipy, sklearn (heavy or
# optional; importing them here would slow every command that imports this module).

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
                        n_boot: int = 1000, seed: int = 0,
                        groups: list[str | None] | None = None) -> tuple[list[float], str]:
    """95% percentile interval of the refitted threshold over resamples of the sample, and how
    they were drawn (`evaluate.interval_method`).

    With `groups` (a patient key per image; None or "" is its own patient) whole patients are
    drawn, as every other interval of a run: films of one patient are not independent
    evidence, and drawing them singly gives too narrow an interval. Stratified: each resample
    keeps the sample's count of patients with positive films only, negative only, and both
    (without groups: of positive and of negative images, as before)."""
    is_pos = np.asarray(is_pos, dtype=bool)
    codes = group_codes(groups, len(is_pos))
    pat = np.arange(len(is_pos)) if codes is None else codes
    n_pat = int(pat.max()) + 1 if pat.size else 0
    has_pos = np.bincount(pat, weights=is_pos, minlength=n_pat) > 0
    has_neg = np.bincount(pat, weights=~is_pos, minlength=n_pat) > 0
    strata = [s for s in (np.flatnonzero(has_pos & ~has_neg), np.flatnonzero(~has_pos & has_neg),
                          np.flatnonzero(has_pos & has_neg)) if s.size]
    order = np.argsort(pat, kind="stable")
    films = np.split(order, np.cumsum(np.bincount(pat, minlength=n_pat))[:-1])
    rng = np.random.default_rng(seed)
    ts = []
    for _ in range(n_boot):
        drawn = np.concatenate([rng.choice(s, len(s)) for s in strata])
        idx = np.concatenate([films[p] for p in drawn])
        ts.append(choose_threshold(is_pos[idx], score[idx], rule, target))
    lo, hi = np.percentile(ts, [2.5, 97.5])
    return [float(lo), float(hi)], interval_method(codes)


def _sample(run, data: Path, image_col, label_col, split, skip_bad):
    """The labelled sample's images, labels and patient keys (read from the file names with
    the run's group_regex, as `evaluate` reads them; None when no name gives one); refused
    (before any work) when a class has fewer than MIN_PER_CLASS images."""
    records = labelled_records(run.classes, data, image_col, label_col, split)

    def check(recs) -> None:
        counts = Counter(r.label for r in recs)
        for c in run.classes:
            if counts[c] < MIN_PER_CLASS:
                raise CxrlabError(f"{data}: {counts[c]} {c} image(s); site calibration needs at "
                                  f"least {MIN_PER_CLASS} of each class")

    check(records)
    images, bad = load_images([r.path for r in records], run.config.image_size,
                              run.info.in_chans, skip_bad=skip_bad, bit_depth=run.bit_depth)
    bad_paths = {Path(p) for p, _ in bad}
    records = [r for r in records if r.path not in bad_paths]
    check(records)
    y = np.array([run.classes.index(r.label) for r in records], dtype=np.int64)
    keys = [patient_key(r.path, run.config.group_regex) for r in records]
    return images, y, keys if any(keys) else None, [r.path for r in records]


def calibrate_run(run_dir: Path, data: Path, out: Path, image_col: str | None = None,
                  label_col: str | None = None, split: str | None = None,
                  skip_bad: bool = False, n_boot: int = 1000, tta: str | None = None) -> dict:
    """Fit the calibration on DATA and write it as the new complete run OUT; returns a summary.

    `tta`: test-time augmentation (None: the run's own); the new run scores with it."""
    out = Path(out)
    check_out_dir(out)
    if out.resolve().is_relative_to(Path(run_dir).resolve()):
        raise CxrlabError(f"--out {out}: inside the run {run_dir}; choose a folder outside it")
    run = load_run(run_dir, tta)
    images, y, keys, paths = _sample(run, data, image_col, label_col, split, skip_bad)
    probs = predict_probs(run.model, images)
    pos = run.info.positive
    n_per_class = {c: int((y == k).sum()) for k, c in enumerate(run.classes)}
    cal: dict = {"data": str(Path(data).resolve()), "n_per_class": n_per_class,
                 "calibrated_from": str(Path(run_dir).resolve()), "tta": run.tta,
                 "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    if pos is not None:
        from sklearn.metrics import roc_auc_score

        is_pos = y == pos
        auc = float(roc_auc_score(is_pos, probs[:, pos]))
        a, b = platt(_logit(probs[:, pos]), is_pos)
        if a <= 0:
            raise CxrlabError(f"{data}: the run's scores do not rank the classes here (ROC AUC "
                              f"{auc:.2f}); a new threshold cannot help: retrain instead")
        cal.update(method="platt", a=a, b=b)
    else:
        cal.update(method="temperature",
                   temperature=temperature(np.log(np.clip(probs, 1e-12, 1)), y))
    state = _folded_state(run, cal)
    # The threshold is chosen on what the new model.pt itself outputs on the sample, so every
    # later command decides on the very scores it was chosen on.
    model = copy.deepcopy(without_tta(run.model))
    model.load_state_dict(state)
    model = with_tta(model, run.tta)  # Platt is fitted on the TTA scores, folded per view
    calibrated = predict_probs(model, images)
    threshold = None
    if pos is not None:
        score = calibrated[:, pos]
        rule, target = run.config.threshold_rule, run.config.target_sensitivity
        threshold = choose_threshold(is_pos, score, rule, target)
        old = 0.5 if run.threshold is None else run.threshold
        old_rescaled = float(_sigmoid(a * _logit(np.array([old]))[0] + b))
        ci, method = bootstrap_threshold(is_pos, score, rule, target, n_boot, run.config.seed,
                                         keys)
        cal.update(threshold_rule=rule, threshold=threshold, threshold_ci=ci,
                   threshold_ci_method=method, original_threshold=run.threshold,
                   original_threshold_rescaled=old_rescaled, sample_roc_auc=auc,
                   sample_balanced_accuracy_before=balanced_accuracy(is_pos, probs[:, pos], old),
                   sample_balanced_accuracy_after=balanced_accuracy(is_pos, score, threshold))
    else:
        cal.update(sample_accuracy=float((probs.argmax(1) == y).mean()))
    _write_run(run, out, cal, threshold, state, model, n_boot, (paths, images))
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
            f"{r['threshold']:.4g} (95% interval {lo:.4g}-{hi:.4g}, "
            f"{r['threshold_ci_method']}); the original "
            f"{old} is {r['original_threshold_rescaled']:.4g} on the calibrated scale. "
            "Balanced accuracy on the sample (in-sample, so optimistic): "
            f"{r['sample_balanced_accuracy_before']:.3f} -> "
            f"{r['sample_balanced_accuracy_after']:.3f}.")


def _write_run(run, out: Path, cal: dict, threshold: float | None, state: dict,
               model: torch.nn.Module, n_boot: int, sample: tuple | None = None) -> None:
    """Copy the run to a temporary sibling of OUT, replace what the calibration changes, and
    rename it into place: OUT is complete or absent."""
    tmp = out.parent / f".{out.name}.calibrating-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(run.run_dir, tmp, ignore=shutil.ignore_patterns(*NOT_COPIED))
        _calibrate_files(run, tmp, cal, threshold, state, model, n_boot)
        if sample is not None:  # evaluate labels these images selection-biased (overlap)
            record_sample(tmp, *sample)
        if out.is_dir():
            out.rmdir()  # check_out_dir allowed only an empty one
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _folded_state(run, cal: dict) -> dict:
    """run's model.pt with the calibration folded into its final linear layer (fc).

    Two classes: the model's one logit z is class 1's (`inference.probabilities`), while the
    Platt fit is on the positive class's logit: z itself when the positive is class 1, -z when
    it is class 0, where a(-z) + b is class 1's logit a z - b. K classes: logits / T.
    """
    state = torch.load(run.run_dir / "model.pt", map_location="cpu", weights_only=True)
    if "fc.weight" not in state or "fc.bias" not in state:
        raise CxrlabError(f"{run.run_dir}: model.pt has no final linear layer (fc); cannot "
                          "fold a calibration into it")
    w, bias = state["fc.weight"].double(), state["fc.bias"].double()
    pos = run.info.positive
    if pos is not None:
        if w.shape[0] != 1:
            raise CxrlabError(f"{run.run_dir}: model.pt has {w.shape[0]} outputs for two "
                              "classes (expected one logit); cannot fold a calibration into it")
        sign = 1.0 if pos == 1 else -1.0
        w, bias = cal["a"] * w, cal["a"] * bias + sign * cal["b"]
    else:
        w, bias = w / cal["temperature"], bias / cal["temperature"]
    state["fc.weight"] = w.to(state["fc.weight"].dtype)
    state["fc.bias"] = bias.to(state["fc.bias"].dtype)
    return state


def _rescore(run, model: torch.nn.Module, paths: list[str]) -> np.ndarray | None:
    """The validation films through the calibrated model, when every one is still readable
    where training read it; else None.

    Mapping val_predictions.csv instead loses what the probabilities lost: a float32 score
    saturated at 0 or 1 (and, in runs written before the CSV was exact, anything past its 6
    significant digits) maps to another probability than model.pt gives, and the ties it makes
    can change the AUC that a monotone map must keep."""
    from cxrlab.data.cache import load_images
    from cxrlab.deploy.inference import predict_probs

    files = [Path(p) for p in paths]
    if not all(f.is_file() for f in files):
        return None
    images, bad = load_images(files, run.config.image_size, run.info.in_chans, skip_bad=True,
                              bit_depth=run.bit_depth)
    return None if bad else predict_probs(model, images)


def _calibrate_files(run, new: Path, cal: dict, threshold: float | None, state: dict,
                     model: torch.nn.Module, n_boot: int) -> None:
    classes, pos = run.classes, run.info.positive
    if pos is not None:
        def mapping(p: np.ndarray) -> np.ndarray:
            return apply_binary(p, pos, cal["a"], cal["b"])
    else:
        def mapping(p: np.ndarray) -> np.ndarray:
            return apply_temperature(p, cal["temperature"])
    torch.save(state, new / "model.pt")
    if run.tta != run.config.tta:  # the new threshold was chosen with this TTA
        run.config.model_copy(update={"tta": run.tta}).save(new / "config.yaml")
    if threshold is not None:
        write_threshold(new, threshold)

    mfile = run.run_dir / "metrics.json"
    old = json.loads(mfile.read_text()) if mfile.is_file() else {}
    vp_file = new / "val_predictions.csv"
    if vp_file.is_file():
        paths, vy, vp = read_predictions(vp_file, classes)
        # a folds ensemble's are out-of-fold member scores: model.pt trained on those images
        out_of_fold = (run.info.ensemble or {}).get("kind") == "folds"
        scored = None if out_of_fold else _rescore(run, model, paths)
        if scored is None:
            log.info("site calibration: validation images not all readable; "
                     "val_predictions.csv mapped through the calibration instead of re-scored")
            cal["val_predictions"] = "the original's val_predictions.csv, mapped"
            vp = mapping(vp)
        else:
            cal["val_predictions"] = "validation images scored by the calibrated model.pt"
            vp = scored
    else:  # a run from before val_predictions.csv: score its validation images again
        paths, vy, vp = recompute_val_predictions(new, read_split_csv(new / "split.csv"))
        cal["val_predictions"] = "validation images scored by the calibrated model.pt"
    write_predictions_csv(vp_file, paths, [classes[k] for k in vy], vp, classes)
    # patients as split.csv has them, as training's own metrics.json drew its intervals
    metrics = compute_metrics(vy, vp, classes, positive=pos, threshold=threshold,
                              n_boot=n_boot, seed=run.config.seed,
                              groups=patient_keys(new, paths))
    metrics.update({k: old[k] for k in ("split", "epochs", "train_seconds", "train_precision")
                    if k in old})
    metrics["selection_biased"] = "the epoch was chosen on these images"
    write_json(new / "metrics.json", metrics)
    plots.plot_confusion(np.array(metrics["confusion_matrix"]), classes,
                         new / "confusion_matrix.png",
                         title="Validation confusion matrix (site-calibrated)")
    plots.plot_roc(vy, vp, classes, new / "roc.png", positive=pos, threshold=threshold)
    plots.plot_pr(vy, vp, classes, new / "pr.png", positive=pos)
    info = json.loads((new / "run.json").read_text())
    info["site_calibration"] = cal
    write_json(new / "run.json", info)
