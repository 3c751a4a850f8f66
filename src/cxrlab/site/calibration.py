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
from collections.abc import Callable, Iterator
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
    interval_method,
)
from cxrlab.evaluation.operating_point import patient_strata
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
REFIT = "intercept"  # the default map, chosen by benchmarks/site_calibration.py
SITE_RULES = ("keep-sensitivity", "youden", "sensitivity")
CONFIDENCE = 0.9  # keep-sensitivity's one-sided confidence that the sensitivity is kept
PRIOR_SD = (0.25, 1.0)  # shrink: prior sd of the slope (around 1) and intercept (around 0)
# what NEW/metrics.json repeats of run.json's site_calibration: the refit and its intervals
SUMMARY = ("method", "a", "a_ci", "b", "b_ci", "temperature", "threshold_rule",
           "target_sensitivity", "target_sensitivity_from", "confidence", "target_shown",
           "threshold", "threshold_ci", "threshold_ci_method", "n_per_class")
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


def intercept_only(z: np.ndarray, is_pos: np.ndarray) -> tuple[float, float]:
    """(1, b): the maximum-likelihood shift of the logit, slope kept at the run's own 1.

    One parameter from tens of films: it moves the probabilities by the site's offset (scores
    shifted, another prevalence) without letting a small sample re-stretch the scale. Solves
    sum(sigmoid(z + b)) = number of positives (the score equation), which is monotone in b."""
    from scipy.optimize import brentq

    z, k = np.asarray(z, dtype=np.float64), float(np.sum(is_pos))
    if k in (0, len(z)):
        raise CxrlabError("site calibration needs films of both classes")
    b = brentq(lambda b: float(_sigmoid(z + b).sum()) - k, -60.0, 60.0, xtol=1e-12)
    return 1.0, float(b)


def shrunk_platt(z: np.ndarray, is_pos: np.ndarray,
                 prior_sd: tuple[float, float] = PRIOR_SD) -> tuple[float, float]:
    """(a, b) of Platt scaling with a Gaussian prior centred on the run's own mapping (a = 1,
    b = 0): the posterior mode. The prior is worth a fixed amount of evidence, so a small
    sample moves the map a little and a large one as far as plain Platt."""
    from scipy.optimize import minimize

    z = np.asarray(z, dtype=np.float64)
    s = np.where(is_pos, 1.0, -1.0)
    va, vb = prior_sd[0] ** 2, prior_sd[1] ** 2

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        m = s * (ab[0] * z + ab[1])
        g = -s * _sigmoid(-m)  # d/d(a z + b) of log(1 + exp(-m))
        return (float(np.logaddexp(0, -m).sum() + (ab[0] - 1) ** 2 / (2 * va)
                      + ab[1] ** 2 / (2 * vb)),
                np.array([(g * z).sum() + (ab[0] - 1) / va, g.sum() + ab[1] / vb]))

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


REFITS = {"intercept": intercept_only, "shrink": shrunk_platt, "platt": platt}


def site_threshold(is_pos: np.ndarray, score: np.ndarray, rule: str, target: float,
                   confidence: float = CONFIDENCE) -> float:
    """The threshold a site rule picks on the sample's (calibrated) scores: keep-sensitivity
    (`keep_sensitivity_threshold`), or `choose_threshold`'s plain youden / sensitivity."""
    if rule == "keep-sensitivity":
        return keep_sensitivity_threshold(is_pos, score, target, confidence)[0]
    return choose_threshold(is_pos, score, rule, target)


def keep_sensitivity_threshold(is_pos: np.ndarray, score: np.ndarray, target: float,
                               confidence: float = CONFIDENCE) -> tuple[float, bool]:
    """(threshold, met): the highest threshold at which the sample still shows sensitivity
    >= `target` with one-sided `confidence` (Clopper-Pearson: the upper bound on the miss rate
    of m misses among n positives is beta.ppf(confidence, m + 1, n - m)).

    The plain rule (the highest threshold whose *sample* sensitivity reaches the target) sits
    on a few lowest positives and loses sensitivity on the next films half the time; this one
    leaves the margin that n positives warrant. When n positives cannot show the target even
    with none missed, the threshold goes just below the lowest positive and `met` is False."""
    from scipy.stats import beta

    is_pos = np.asarray(is_pos, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    pos = np.sort(score[is_pos])
    if not pos.size or pos.size == len(score):
        raise CxrlabError("site calibration needs films of both classes")
    m = -1  # the most positives the threshold may pass (-1: not even none shows the target)
    while m + 1 < pos.size and beta.ppf(confidence, m + 2, pos.size - m - 1) <= 1 - target:
        m += 1
    chosen = pos[max(m, 0)]
    below = score[score < chosen]  # midpoint to the next lower score, as choose_threshold
    return float((chosen + (below.max() if below.size else min(0.0, chosen))) / 2), m >= 0


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


def patient_resamples(is_pos: np.ndarray, groups: list[str | None] | None, n_boot: int,
                      seed: int) -> tuple[Iterator[np.ndarray], str]:
    """(index arrays of `n_boot` resamples of the sample, how they were drawn
    (`evaluate.interval_method`)).

    With `groups` (a patient key per image; None or "" is its own patient) whole patients are
    drawn, as every other interval of a run: films of one patient are not independent
    evidence, and drawing them singly gives too narrow an interval. Stratified: each resample
    keeps the sample's count of patients with positive films only, negative only, and both
    (without groups: of positive and of negative images)."""
    is_pos = np.asarray(is_pos, dtype=bool)
    codes, pat, n_pat, strata = patient_strata(is_pos, groups)
    order = np.argsort(pat, kind="stable")
    films = np.split(order, np.cumsum(np.bincount(pat, minlength=n_pat))[:-1])

    def draw() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            drawn = np.concatenate([rng.choice(s, len(s)) for s in strata])
            yield np.concatenate([films[p] for p in drawn])

    return draw(), interval_method(codes)


def bootstrap_threshold(is_pos: np.ndarray, score: np.ndarray, rule: str, target: float,
                        n_boot: int = 1000, seed: int = 0,
                        groups: list[str | None] | None = None,
                        confidence: float = CONFIDENCE) -> tuple[list[float], str]:
    """95% percentile interval of the threshold `rule` picks, over patient resamples of the
    sample (`patient_resamples`) with the map held fixed, and how they were drawn."""
    is_pos, score = np.asarray(is_pos, dtype=bool), np.asarray(score, dtype=np.float64)
    resamples, method = patient_resamples(is_pos, groups, n_boot, seed)
    ts = [site_threshold(is_pos[i], score[i], rule, target, confidence) for i in resamples]
    lo, hi = np.percentile(ts, [2.5, 97.5])
    return [float(lo), float(hi)], method


def bootstrap_map(is_pos: np.ndarray, z: np.ndarray, refit: str, n_boot: int = 1000,
                  seed: int = 0, groups: list[str | None] | None = None
                  ) -> tuple[tuple[list[float], list[float]], str]:
    """95% percentile intervals of the map's slope and intercept, each resample refitted."""
    is_pos, z = np.asarray(is_pos, dtype=bool), np.asarray(z, dtype=np.float64)
    resamples, method = patient_resamples(is_pos, groups, n_boot, seed)
    ab = np.array([REFITS[refit](z[i], is_pos[i]) for i in resamples])
    lo, hi = np.percentile(ab, [2.5, 97.5], axis=0)
    return ([float(lo[0]), float(hi[0])], [float(lo[1]), float(hi[1])]), method


def _check_options(refit: str, rule: str, target: float | None, confidence: float) -> None:
    if refit not in REFITS:
        raise CxrlabError(f"--refit {refit!r}: expected one of {', '.join(REFITS)}")
    if rule not in SITE_RULES:
        raise CxrlabError(f"--rule {rule!r}: expected one of {', '.join(SITE_RULES)}")
    if target is not None and not 0.0 < target <= 1.0:
        raise CxrlabError(f"--target-sensitivity {target}: expected a value in (0, 1]")
    if not 0.0 < confidence < 1.0:
        raise CxrlabError(f"--confidence {confidence}: expected a value in (0, 1)")


def _validation_sensitivity(run) -> tuple[float, str]:
    """The sensitivity the run showed on its own validation images at its own threshold
    (val_predictions.csv), what a site calibration keeps unless told otherwise; the run's
    target_sensitivity where that file is missing."""
    vp_file = run.run_dir / "val_predictions.csv"
    pos = run.info.positive
    if vp_file.is_file():
        _, vy, vp = read_predictions(vp_file, run.classes)
        t = 0.5 if run.threshold is None else run.threshold
        if (vy == pos).any():
            return (_rate(np.asarray(vp[vy == pos, pos], dtype=np.float64) >= t),
                    "the run's validation sensitivity at its threshold")
    return run.config.target_sensitivity, "the run's target_sensitivity"


def _rate(hits: np.ndarray) -> float:
    return float(np.mean(hits)) if len(hits) else float("nan")


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
                  skip_bad: bool = False, n_boot: int = 1000, tta: str | None = None,
                  refit: str = REFIT, rule: str = "keep-sensitivity",
                  target_sensitivity: float | None = None,
                  confidence: float = CONFIDENCE) -> dict:
    """Fit the calibration on DATA and write it as the new complete run OUT; returns a summary.

    `tta`: test-time augmentation (None: the run's own); the new run scores with it.
    Two classes: `refit` is the map (REFITS), `rule` the threshold's (SITE_RULES);
    `target_sensitivity` (None: the run's own validation sensitivity at its threshold) is what
    keep-sensitivity keeps with `confidence`, and what the plain sensitivity rule reaches."""
    out = Path(out)
    _check_options(refit, rule, target_sensitivity, confidence)
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
        z = _logit(probs[:, pos])
        a, b = REFITS[refit](z, is_pos)
        if a <= 0 or auc <= 0.5:
            raise CxrlabError(f"{data}: the run's scores do not rank the classes here (ROC AUC "
                              f"{auc:.2f}); a new threshold cannot help: retrain instead")
        (a_ci, b_ci), _ = bootstrap_map(is_pos, z, refit, n_boot, run.config.seed, keys)
        cal.update(method=refit, a=a, b=b, a_ci=a_ci, b_ci=b_ci)
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
        old = 0.5 if run.threshold is None else run.threshold
        target, target_from = ((target_sensitivity, "--target-sensitivity")
                               if target_sensitivity is not None else _validation_sensitivity(run))
        threshold, met = (keep_sensitivity_threshold(is_pos, score, target, confidence)
                          if rule == "keep-sensitivity" else
                          (choose_threshold(is_pos, score, rule, target), None))
        old_rescaled = float(_sigmoid(a * _logit(np.array([old]))[0] + b))
        ci, method = bootstrap_threshold(is_pos, score, rule, target, n_boot, run.config.seed,
                                         keys, confidence)
        cal.update(threshold_rule=rule, target_sensitivity=target,
                   target_sensitivity_from=target_from, threshold=threshold, threshold_ci=ci,
                   threshold_ci_method=method, original_threshold=run.threshold,
                   original_threshold_rescaled=old_rescaled, sample_roc_auc=auc,
                   sample_sensitivity_before=_rate(probs[is_pos, pos] >= old),
                   sample_sensitivity_after=_rate(score[is_pos] >= threshold),
                   sample_specificity_before=_rate(probs[~is_pos, pos] < old),
                   sample_specificity_after=_rate(score[~is_pos] < threshold),
                   sample_balanced_accuracy_before=balanced_accuracy(is_pos, probs[:, pos], old),
                   sample_balanced_accuracy_after=balanced_accuracy(is_pos, score, threshold))
        if rule == "keep-sensitivity":
            cal.update(confidence=confidence, target_shown=met)
            if not met:
                log.warning("site calibration: %d positive films cannot show sensitivity >= %.3g "
                            "with %.0f%% confidence; the threshold is just below the lowest "
                            "positive film's score (label more films to move it further)",
                            int(is_pos.sum()), target, 100 * confidence)
    else:
        cal.update(sample_accuracy=float((probs.argmax(1) == y).mean()))
    _write_run(run, out, cal, threshold, state, model, n_boot, (paths, images))
    return {**cal, "out": str(out)}


def describe(r: dict) -> str:
    """The summary of `calibrate_run` in a few sentences, for the console."""
    counts = ", ".join(f"{v} {k}" for k, v in r["n_per_class"].items())
    if r["method"] == "temperature":
        return f"Sample: {counts}. Temperature {r['temperature']:.3g}."
    lo, hi = r["threshold_ci"]
    old = "0.5 (none saved)" if r["original_threshold"] is None else \
        f"{r['original_threshold']:.4g}"
    (alo, ahi), (blo, bhi) = r["a_ci"], r["b_ci"]
    rule = {"youden": "Youden's J on the sample",
            "sensitivity": f"sample sensitivity >= {r['target_sensitivity']:.3g}"}.get(
        r["threshold_rule"],
        f"keeps sensitivity >= {r['target_sensitivity']:.3g} ({r['target_sensitivity_from']}) "
        f"with {100 * r.get('confidence', CONFIDENCE):.0f}% confidence"
        + ("" if r.get("target_shown", True) else
           "; too few positive films to show it: just below the lowest one"))
    return (f"Sample: {counts} (ROC AUC {r['sample_roc_auc']:.3f}). Map ({r['method']}): "
            f"p = sigmoid({r['a']:.3g} z + {r['b']:.3g}), slope 95% interval "
            f"{alo:.3g}-{ahi:.3g}, intercept {blo:.3g}-{bhi:.3g}. Threshold "
            f"{r['threshold']:.4g} ({rule}; 95% interval {lo:.4g}-{hi:.4g}, "
            f"{r['threshold_ci_method']}); the original "
            f"{old} is {r['original_threshold_rescaled']:.4g} on the calibrated scale. "
            "On the sample (in-sample, so optimistic): sensitivity "
            f"{r['sample_sensitivity_before']:.3f} -> {r['sample_sensitivity_after']:.3f}, "
            f"specificity {r['sample_specificity_before']:.3f} -> "
            f"{r['sample_specificity_after']:.3f}.")



def _write_run(run, out: Path, cal: dict, threshold: float | None, state: dict,
               model: torch.nn.Module, n_boot: int, sample: tuple | None = None) -> None:
    def fill(tmp: Path) -> None:
        _calibrate_files(run, tmp, cal, threshold, state, model, n_boot)
        if sample is not None:  # evaluate labels these images selection-biased (overlap)
            record_sample(tmp, *sample)

    write_new_run(run, out, fill, "calibrating")


def write_new_run(run, out: Path, fill: Callable[[Path], None], what: str = "new") -> None:
    """Copy the run to a temporary sibling of OUT (less NOT_COPIED), let `fill` replace what
    the new run changes in it, and rename it into place: OUT is complete or absent. For every
    command that derives a run from a run (calibrate; adapt can share it)."""
    tmp = out.parent / f".{out.name}.{what}-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(run.run_dir, tmp, ignore=shutil.ignore_patterns(*NOT_COPIED))
        fill(tmp)
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
    write_validation(run, new, paths, vy, vp, threshold, n_boot,
                     {"site_calibration": {k: cal[k] for k in SUMMARY if k in cal}},
                     "Validation confusion matrix (site-calibrated)")
    info = json.loads((new / "run.json").read_text())
    info["site_calibration"] = cal
    write_json(new / "run.json", info)


def write_validation(run, new: Path, paths: list[str], vy: np.ndarray, vp: np.ndarray,
                     threshold: float | None, n_boot: int, extra: dict, title: str) -> None:
    """A derived run's validation files (val_predictions.csv, metrics.json with `extra`, the
    plots) from what its own model.pt scores, so they never describe the run it came from."""
    classes, pos = run.classes, run.info.positive
    mfile = run.run_dir / "metrics.json"
    old = json.loads(mfile.read_text()) if mfile.is_file() else {}
    write_predictions_csv(new / "val_predictions.csv", paths, [classes[k] for k in vy], vp,
                          classes)
    # patients as split.csv has them, as training's own metrics.json drew its intervals
    metrics = compute_metrics(vy, vp, classes, positive=pos, threshold=threshold,
                              n_boot=n_boot, seed=run.config.seed,
                              groups=patient_keys(new, paths))
    metrics.update({k: old[k] for k in ("split", "epochs", "train_seconds", "train_precision")
                    if k in old})
    metrics["selection_biased"] = "the epoch was chosen on these images"
    metrics.update(extra)
    write_json(new / "metrics.json", metrics)
    plots.plot_confusion(np.array(metrics["confusion_matrix"]), classes,
                         new / "confusion_matrix.png", title=title)
    plots.plot_roc(vy, vp, classes, new / "roc.png", positive=pos, threshold=threshold)
    plots.plot_pr(vy, vp, classes, new / "pr.png", positive=pos)
