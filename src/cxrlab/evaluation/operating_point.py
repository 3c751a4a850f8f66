"""How far a run's decision threshold can be trusted: its patient-bootstrap interval on
validation, its spread across folds or ensemble members, and a warning when it is unstable.

On a validation split whose AUC is 0.999 a wide gap of thresholds scores almost the same, and a
rule (Youden's J, a target sensitivity) takes one point of it that a resample of the same
patients moves far. What makes that matter is what the moved threshold decides: so a
threshold is *unstable* when the two ends of its 95% interval (or the lowest and highest of
the folds' / members' thresholds) decide the validation images with a sensitivity or a
specificity more than `UNSTABLE_POINTS` percentage points apart. The criterion and its
measurement: docs/recipes.md, "Decision threshold" (benchmarks/operating_point.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cxrlab.evaluation.metrics import (
    choose_threshold,
    compute_metrics,
    group_codes,
    interval_method,
)

_EPS = 1e-6  # choose_threshold's clip
_CHUNK_CELLS = 2_000_000  # (resample x score) cells per chunk, ~16 MB

# Unstable: the interval's ends differ by more than this many points of validation sensitivity
# or specificity (measured: benchmarks/results/operating-point-2026-12-06-xeon-fp32.json).
UNSTABLE_POINTS = 5.0
N_BOOT = 1000


def patient_strata(is_pos: np.ndarray, groups):
    """The group codes (None without groups: every image its own patient), the patient per
    image, the number of patients, and the patients with positive films only, negative only,
    and both: a stratified patient bootstrap keeps each stratum's count."""
    codes = group_codes(groups, len(is_pos))
    pat = np.arange(len(is_pos)) if codes is None else codes
    n_pat = int(pat.max()) + 1 if pat.size else 0
    has_pos = np.bincount(pat, weights=is_pos, minlength=n_pat) > 0
    has_neg = np.bincount(pat, weights=~is_pos, minlength=n_pat) > 0
    strata = [s for s in (np.flatnonzero(has_pos & ~has_neg), np.flatnonzero(~has_pos & has_neg),
                          np.flatnonzero(has_pos & has_neg)) if s.size]
    return codes, pat, n_pat, strata


def bootstrap_thresholds(is_pos: np.ndarray, score: np.ndarray, rule: str, target: float,
                         n_boot: int = N_BOOT, seed: int = 0,
                         groups: Sequence[str | None] | None = None,
                         ) -> tuple[np.ndarray, str]:
    """The rule's threshold re-chosen on `n_boot` resamples, and how they were drawn.

    With `groups` (a patient key per image; None or "" is its own patient) whole patients are
    drawn, as every other interval of a run: films of one patient are not independent
    evidence, and drawing them singly gives too narrow an interval. Stratified: each resample
    keeps the sample's count of patients with positive films only, negative only, and both
    (without groups: of positive and of negative images). Each resample's threshold is exactly
    `choose_threshold`'s on it (a test checks), computed for all resamples at once."""
    choose_threshold([0, 1], [0.0, 1.0], rule, target)  # the rule's and target's checks
    is_pos = np.asarray(is_pos, dtype=bool)
    score = np.asarray(score, dtype=float)
    codes, pat, n_pat, strata = patient_strata(is_pos, groups)
    distinct, inverse = np.unique(score, return_inverse=True)
    desc, rank = distinct[::-1], len(distinct) - 1 - inverse.ravel()  # descending, as roc_curve
    rng = np.random.default_rng(seed)
    out = []
    step = max(1, _CHUNK_CELLS // max(n_pat, len(distinct), 1))
    for start in range(0, n_boot, step):
        B = min(step, n_boot - start)
        drawn = np.zeros((B, n_pat))
        for s in strata:
            picks = s[rng.integers(0, len(s), size=(B, len(s)))]
            drawn += np.bincount((np.arange(B)[:, None] * n_pat + picks).ravel(),
                                 minlength=B * n_pat).reshape(B, n_pat)
        w = drawn[:, pat]  # how often each image is in each resample
        out.append(_choose_many(desc, rank, is_pos, w, rule, target))
    return np.concatenate(out) if out else np.zeros(0), interval_method(codes)


def _choose_many(desc: np.ndarray, rank: np.ndarray, is_pos: np.ndarray, w: np.ndarray,
                 rule: str, target: float) -> np.ndarray:
    """`choose_threshold` on each row of image counts `w` (resamples x images) at once.
    `desc`: the sample's distinct scores, descending; `rank`: each image's index into it."""
    B, U = w.shape[0], len(desc)

    def per_score(cases: np.ndarray) -> np.ndarray:
        flat = (np.arange(B)[:, None] * U + rank[cases]).ravel()
        return np.bincount(flat, weights=w[:, cases].ravel(), minlength=B * U).reshape(B, U)

    pos, neg = per_score(is_pos), per_score(~is_pos)
    present = (pos + neg) > 0  # the scores this resample holds: roc_curve's thresholds
    tp, fp = np.cumsum(pos, 1), np.cumsum(neg, 1)
    both = (tp[:, -1] > 0) & (fp[:, -1] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    if rule == "youden":
        i = np.where(present, tpr - fpr, -np.inf).argmax(1)  # first maximum: highest
    else:
        i = (present & (tpr >= target - 1e-12)).argmax(1)
    chosen = desc[i]
    # the next lower score this resample holds (none: min(0, chosen)), as choose_threshold
    idx = np.where(present, np.arange(U), U)
    after = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1]
    after = np.concatenate([after[:, 1:], np.full((B, 1), U)], axis=1)[np.arange(B), i]
    lower = np.where(after < U, desc[np.minimum(after, U - 1)], np.minimum(0.0, chosen))
    t = (chosen + lower) / 2.0
    clipped = np.clip(t, _EPS, 1.0 - _EPS)
    t = np.where((lower < clipped) & (clipped <= chosen), clipped, t)
    return np.where(both, t, 0.5)


def bootstrap_threshold(is_pos: np.ndarray, score: np.ndarray, rule: str, target: float,
                        n_boot: int = N_BOOT, seed: int = 0,
                        groups: Sequence[str | None] | None = None) -> tuple[list[float], str]:
    """95% percentile interval of the re-chosen threshold (`bootstrap_thresholds`), and how
    the resamples were drawn."""
    ts, method = bootstrap_thresholds(is_pos, score, rule, target, n_boot, seed, groups)
    lo, hi = np.percentile(ts, [2.5, 97.5])
    return [float(lo), float(hi)], method


def rates_at(is_pos: np.ndarray, score: np.ndarray,
             threshold: float) -> dict[str, float | None]:
    """Accuracy, sensitivity and specificity of calling `score >= threshold` positive; None
    (JSON null) for a rate whose class has no image here (a tiny validation split)."""
    is_pos = np.asarray(is_pos, dtype=bool)
    called = np.asarray(score) >= threshold
    return {"accuracy": float((called == is_pos).mean()),
            "sensitivity": float(called[is_pos].mean()) if is_pos.any() else None,
            "specificity": float((~called[~is_pos]).mean()) if (~is_pos).any() else None}


def rate(value: float | None) -> str:
    """A rate of `rates_at` for a sentence: 3 decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"


def span(is_pos: np.ndarray, score: np.ndarray, low: float, high: float,
         points: float = UNSTABLE_POINTS) -> dict:
    """What the thresholds `low` and `high` decide on these images, how far apart (points of
    sensitivity or specificity, the larger), and whether that is more than `points`."""
    a, b = rates_at(is_pos, score, low), rates_at(is_pos, score, high)
    moved = max((abs(a[k] - b[k]) for k in ("sensitivity", "specificity")
                 if a[k] is not None and b[k] is not None), default=0.0)
    return {"at_low": a, "at_high": b, "change_points": round(100 * moved, 2),
            "unstable": bool(100 * moved > points)}


def threshold_stability(is_pos: np.ndarray, score: np.ndarray, rule: str, target: float,
                        groups: Sequence[str | None] | None = None, n_boot: int = N_BOOT,
                        seed: int = 0) -> dict:
    """metrics.json's "threshold_stability": the rule's patient-bootstrap 95% interval on the
    validation scores, what its ends decide there, and the `unstable` flag."""
    (lo, hi), method = bootstrap_threshold(is_pos, score, rule, target, n_boot, seed, groups)
    return {"rule": rule, **({"target_sensitivity": target} if rule == "sensitivity" else {}),
            "interval": [lo, hi], "interval_method": method, "n_boot": n_boot,
            **span(is_pos, score, lo, hi), "criterion": criterion()}


def threshold_spread(thresholds: Sequence[float | None], is_pos: np.ndarray,
                     score: np.ndarray) -> dict | None:
    """The spread of several thresholds of one recipe (the folds of `--folds`, the members of an
    ensemble) and what its lowest and highest decide on `score` (the pooled out-of-fold or the
    ensemble's validation scores); None with fewer than two thresholds."""
    ts = [float(t) for t in thresholds if t is not None]
    if len(ts) < 2:
        return None
    return {"thresholds": ts, "median": float(np.median(ts)), "min": min(ts), "max": max(ts),
            **span(is_pos, score, min(ts), max(ts)), "criterion": criterion()}


def criterion(points: float = UNSTABLE_POINTS) -> str:
    return (f"unstable when the thresholds at the two ends differ by more than {points:g} "
            "points of validation sensitivity or specificity")


def warning(stability: dict | None, what: str = "the threshold's 95% interval") -> str | None:
    """One line for the console and the report when `stability` (`threshold_stability` or
    `threshold_spread`) says unstable; None otherwise."""
    if not stability or not stability.get("unstable"):
        return None
    lo, hi = stability.get("interval") or (stability["min"], stability["max"])
    a, b = stability["at_low"], stability["at_high"]
    return (f"unstable decision threshold: {what} runs from {lo:.3g} to {hi:.3g}, deciding "
            f"validation at sensitivity {rate(a['sensitivity'])} -> {rate(b['sensitivity'])}, "
            f"specificity {rate(a['specificity'])} -> {rate(b['specificity'])} "
            f"({stability['change_points']:.1f} points apart); expect a new intake's errors "
            "to move as much: more validation data, `cxrlab calibrate`, or an ensemble "
            "(--folds) pins it better")


def decide_on_validation(y: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                         positive: int | None, rule: str, target: float, seed: int,
                         groups: Sequence[str | None] | None) -> tuple[float | None, dict]:
    """A run's threshold, chosen on its validation scores by its rule (None for more than two
    classes), the metrics at it, and how firmly those patients pin it: one path for a single
    run and an ensemble."""
    threshold = None
    if positive is not None:
        threshold = choose_threshold((y == positive).astype(int), probs[:, positive], rule,
                                     target)
    metrics = compute_metrics(y, probs, classes, positive=positive, threshold=threshold,
                              seed=seed, groups=groups)
    if threshold is not None:  # how far a resample of the same patients moves it
        metrics["threshold_stability"] = threshold_stability(
            y == positive, probs[:, positive], rule, target, groups=groups, seed=seed)
    return threshold, metrics
