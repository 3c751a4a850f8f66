"""Metrics, decision thresholds and bootstrap intervals for a run's predictions.

Point estimates come from scikit-learn. Bootstrap replicates use vectorised NumPy kernels
(checked against scikit-learn in the tests): a thousand scikit-learn calls per metric would
take seconds. A replicate is a (resamples x cases) matrix of how often each case was drawn, so
one kernel serves both the image bootstrap and the patient (cluster) bootstrap, which draws
whole patients: Kermany has several images per patient, and images of one patient are not
independent evidence. Anything undefined (an AUC with one class present, an empty set) is
None, never NaN, so metrics.json stays valid JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from rich.table import Table
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    f1_score,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxrlab.errors import CxrlabError

METRIC_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc")
THRESHOLD_KEYS = ("accuracy", "precision", "recall", "specificity", "f1")
THRESHOLD_RULES = ("youden", "sensitivity")
_RATE_KEYS = ("precision", "recall", "specificity", "f1")
# A threshold of exactly 0 or 1 would call everything (or nothing) positive whatever the model.
_EPS = 1e-6
# Bootstrap work is done in chunks of at most this many (resample x case) cells (~16 MB each).
_CHUNK_CELLS = 2_000_000


# -- thresholds -------------------------------------------------------------------------------


def choose_threshold(
    y_true: Sequence[int] | np.ndarray,
    p_pos: Sequence[float] | np.ndarray,
    rule: str = "youden",
    target_sensitivity: float = 0.95,
) -> float:
    """Decision threshold on validation scores; y_true is 1 (or True) for the positive class.

    "youden" maximises sensitivity + specificity - 1; "sensitivity" takes the highest threshold
    that still reaches `target_sensitivity`. The returned value is the midpoint between the
    chosen score and the next lower distinct score: it classifies the validation set exactly
    as the chosen score does, but does not sit on a validation case, so a test case scored a
    hair below that case is not flipped. The result is clipped into (0, 1) unless validation
    scores within 1e-6 of 0 or 1 make clipping change the rule's choice (a positive scored
    exactly 0 needs a threshold of 0). One class only (nothing to separate) gives 0.5.
    """
    if rule not in THRESHOLD_RULES:
        raise CxrlabError(f"threshold_rule {rule!r}: expected one of {', '.join(THRESHOLD_RULES)}")
    if not 0.0 < target_sensitivity <= 1.0:
        raise CxrlabError(f"target_sensitivity {target_sensitivity}: expected a value in (0, 1]")
    y = np.asarray(y_true).ravel().astype(bool)
    p = np.asarray(p_pos, dtype=float).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} labels but p_pos has {p.size} scores")
    _check_finite(p)
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    # thresholds[0] is +inf ("call nothing positive"); skip it. Youden is 0 there and also at
    # the lowest score, so it is never needed; nor for a sensitivity target > 0.
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if rule == "youden":
        i = int(np.argmax(tpr - fpr))  # first maximum = highest such threshold
    else:
        # tpr reaches 1 at the lowest score, so a threshold meeting the target always exists.
        i = int(np.argmax(tpr >= target_sensitivity - 1e-12))
    chosen = thresholds[i]
    distinct = np.unique(p)
    below = distinct[distinct < chosen]
    lower = below[-1] if below.size else min(0.0, chosen)
    t = (chosen + lower) / 2.0
    clipped = float(np.clip(t, _EPS, 1.0 - _EPS))
    # Clipping must not change what the rule chose; it only could if a score sits at 0 or 1.
    return clipped if lower < clipped <= chosen else float(t)


# -- metrics ----------------------------------------------------------------------------------


def compute_metrics(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    positive: int | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    groups: Sequence[str | None] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """All metrics of one prediction set, as a JSON-ready dict with stable keys.

    y_true holds indices into `classes`; probs is (N, K) with rows summing to 1. Two classes:
    `positive` (default 1) is the positive column, a case is called positive when its
    probability is >= `threshold` (default 0.5), and `at_0_5` repeats the threshold metrics at
    0.5 for comparison (`strict`: positive only when > `threshold`, a run's threshold seen
    from its other class, see `inference.complement_threshold`). More classes: argmax
    prediction, macro averages, `per_class`; `positive` and `threshold` are ignored. `ci`
    holds 95% percentile-bootstrap intervals
    (seeded; the threshold stays fixed): with `groups` (a patient key per case; None or ""
    for a case that is its own patient) whole patients are resampled, else single cases;
    `interval_method` says which. Undefined values are
    None: AUCs unless both classes (K > 2: the class and the rest) are present, recall with no
    positive cases, specificity with no negative ones; precision and F1 follow scikit-learn's
    zero_division=0. Macro averages skip a class where its value is None.
    """
    y, P, names = _validate(y_true, probs, classes)
    codes = group_codes(groups, len(y))
    if len(names) == 2:
        out = _binary_metrics(y, P, names, positive, threshold, n_boot, seed, codes, strict)
    else:
        out = _multiclass_metrics(y, P, names, n_boot, seed, codes)
    out["interval_method"] = interval_method(codes)
    return out


def _binary_metrics(
    y: np.ndarray, P: np.ndarray, names: list[str], positive: int | None,
    threshold: float | None, n_boot: int, seed: int, codes: np.ndarray | None,
    strict: bool = False,
) -> dict[str, Any]:
    pos = 1 if positive is None else int(positive)
    if pos not in (0, 1):
        raise ValueError(f"positive={positive}: expected 0 or 1 for two classes")
    t = 0.5 if threshold is None else float(threshold)
    score = P[:, pos]
    is_pos = y == pos
    pred_pos = score > t if strict else score >= t
    y_pred = np.where(pred_pos, pos, 1 - pos)
    n = len(y)

    out: dict[str, Any] = _threshold_metrics(is_pos, pred_pos)
    both = bool(is_pos.any() and (~is_pos).any())
    out["roc_auc"] = _num(roc_auc_score(is_pos, score)) if both else None
    out["pr_auc"] = _num(average_precision_score(is_pos, score)) if both else None
    out["threshold"] = t
    out["confusion_matrix"] = _confusion(y, y_pred, 2)
    out["classes"] = names
    out["positive_class"] = names[pos]
    out["n"] = n

    auc_kernel = _RankKernel(score)

    def replicate(w: np.ndarray) -> dict[str, np.ndarray]:
        m = w.sum(1)
        tp = w @ (is_pos & pred_pos)
        fp = w @ (~is_pos & pred_pos)
        fn = w @ (is_pos & ~pred_pos)
        tn = m - tp - fp - fn
        stats = _rates(tp, fp, fn, tn)
        stats["accuracy"] = (tp + tn) / m
        stats["roc_auc"], stats["pr_auc"] = auc_kernel(w, is_pos)
        return stats

    out["ci"] = _bootstrap(n, n_boot, seed, replicate, codes)
    out["at_0_5"] = _threshold_metrics(is_pos, score >= 0.5)
    return out


def _multiclass_metrics(
    y: np.ndarray, P: np.ndarray, names: list[str], n_boot: int, seed: int,
    codes: np.ndarray | None,
) -> dict[str, Any]:
    K, n = len(names), len(y)
    y_pred = P.argmax(1) if n else np.zeros(0, dtype=int)
    labels = list(range(K))
    per_class: dict[str, dict[str, Any]] = {}
    rates: dict[str, Sequence[float | None]] = dict.fromkeys(_RATE_KEYS, [None] * K)
    if n:
        prec, rec, f1, support = precision_recall_fscore_support(
            y, y_pred, labels=labels, average=None, zero_division=0
        )
        mcm = multilabel_confusion_matrix(y, y_pred, labels=labels)  # [[tn, fp], [fn, tp]]
        negatives = mcm[:, 0, 0] + mcm[:, 0, 1]
        rates = {
            "precision": prec,
            "recall": [r if s else None for r, s in zip(rec, support, strict=True)],
            "specificity": [
                m[0, 0] / d if d else None for m, d in zip(mcm, negatives, strict=True)
            ],
            "f1": f1,
        }
    for k, name in enumerate(names):
        is_k = y == k
        both = bool(is_k.any() and (~is_k).any())
        per_class[name] = {
            **{key: _num(rates[key][k]) for key in _RATE_KEYS},
            "roc_auc": _num(roc_auc_score(is_k, P[:, k])) if both else None,
            "pr_auc": _num(average_precision_score(is_k, P[:, k])) if both else None,
            "support": int(is_k.sum()),
        }

    out: dict[str, Any] = {"accuracy": _num(accuracy_score(y, y_pred)) if n else None}
    for key in ("precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
        # Macro: every class counts equally; metrics undefined for a class (its recall when
        # it is absent, its AUCs) are averaged over the classes where they are defined.
        vals = [c[key] for c in per_class.values() if c[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    out["threshold"] = None
    out["confusion_matrix"] = _confusion(y, y_pred, K)
    out["classes"] = names
    out["positive_class"] = None
    out["n"] = n

    kernels = [_RankKernel(P[:, k]) for k in range(K)]

    cell = np.zeros((n, K * K))  # one-hot (true, predicted) cell of each case
    cell[np.arange(n), y * K + y_pred] = 1.0

    def replicate(w: np.ndarray) -> dict[str, np.ndarray]:
        m = w.sum(1)[:, None]
        cms = (w @ cell).reshape(-1, K, K)
        tp = np.diagonal(cms, axis1=1, axis2=2)
        fp = cms.sum(1) - tp
        fn = cms.sum(2) - tp
        tn = m - tp - fp - fn
        stats = {k: _nanmean_rows(v) for k, v in _rates(tp, fp, fn, tn).items()}
        stats["accuracy"] = tp.sum(1) / m[:, 0]
        aucs, aps = zip(*(kern(w, y == k) for k, kern in enumerate(kernels)), strict=True)
        stats["roc_auc"] = _nanmean_rows(np.stack(aucs, 1))
        stats["pr_auc"] = _nanmean_rows(np.stack(aps, 1))
        return stats

    out["ci"] = _bootstrap(n, n_boot, seed, replicate, codes)
    out["at_0_5"] = None
    out["per_class"] = per_class
    return out


def _threshold_metrics(is_pos: np.ndarray, pred_pos: np.ndarray) -> dict[str, float | None]:
    """Accuracy .. F1 for one binary decision (see `_rates` for the undefined cases)."""
    if is_pos.size == 0:
        return dict.fromkeys(THRESHOLD_KEYS)
    has_pos, has_neg = bool(is_pos.any()), bool((~is_pos).any())
    return {
        "accuracy": _num(accuracy_score(is_pos, pred_pos)),
        "precision": _num(precision_score(is_pos, pred_pos, zero_division=0)),
        "recall": _num(recall_score(is_pos, pred_pos)) if has_pos else None,
        # Specificity is the recall of the negative class.
        "specificity": _num(recall_score(~is_pos, ~pred_pos)) if has_neg else None,
        "f1": _num(f1_score(is_pos, pred_pos, zero_division=0)),
    }


def _confusion(y: np.ndarray, y_pred: np.ndarray, K: int) -> list[list[int]]:
    if len(y) == 0:
        return [[0] * K for _ in range(K)]
    return confusion_matrix(y, y_pred, labels=list(range(K))).astype(int).tolist()


# -- bootstrap --------------------------------------------------------------------------------


def group_codes(groups: Sequence[str | None] | None, n: int) -> np.ndarray | None:
    """Patient index per case, numbered by first appearance; None without groups.

    A case whose key is None or "" is its own patient. With one case per patient the codes
    are 0..n-1 in order, so the patient bootstrap draws exactly what the image bootstrap does.
    """
    if groups is None:
        return None
    keys = ["\0" + str(i) if not g else str(g) for i, g in enumerate(groups)]
    if len(keys) != n:
        raise ValueError(f"groups has {len(keys)} keys for {n} cases")
    if not keys:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(np.array(keys, dtype=object).astype(str), return_index=True,
                                  return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def interval_method(codes: np.ndarray | None) -> str:
    """How the intervals were drawn, in words for metrics.json, tables and reports."""
    if codes is None:
        return "image bootstrap"
    return f"patient bootstrap ({int(codes.max()) + 1 if codes.size else 0} patients)"


def resample_weights(n: int, n_boot: int, seed: int,
                     codes: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """Chunks of (resamples, n) counts: how often each case is in each bootstrap resample.

    Without `codes`, n cases drawn with replacement; with `codes` (patient per case, as
    `group_codes` gives), as many patients as there are drawn with replacement, each bringing
    all of its cases, so a resample's size varies as the patients' sizes do.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // max(n, 1))
    draws = n if codes is None else (int(codes.max()) + 1 if codes.size else 0)
    for start in range(0, n_boot, chunk):
        B = min(chunk, n_boot - start)
        idx = rng.integers(0, draws, size=(B, draws))
        flat = (np.arange(B)[:, None] * draws + idx).ravel()
        counts = np.bincount(flat, minlength=B * draws).reshape(B, draws)
        yield (counts if codes is None else counts[:, codes]).astype(float)


def _bootstrap(
    n: int, n_boot: int, seed: int, replicate: Callable[[np.ndarray], dict[str, np.ndarray]],
    codes: np.ndarray | None = None,
) -> dict[str, list[float] | None]:
    """95% percentile intervals; replicates where a metric is undefined (NaN) are skipped."""
    if n == 0 or n_boot <= 0:
        return dict.fromkeys(METRIC_KEYS)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in METRIC_KEYS}
    for w in resample_weights(n, n_boot, seed, codes):
        for k, v in replicate(w).items():
            parts[k].append(np.asarray(v, dtype=float))
    ci: dict[str, list[float] | None] = {}
    for k in METRIC_KEYS:
        v = np.concatenate(parts[k])
        v = v[np.isfinite(v)]
        ci[k] = [float(x) for x in np.percentile(v, [2.5, 97.5])] if v.size else None
    return ci


def _rates(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    """Per-(resample, class) precision, recall, specificity and F1.

    Recall and specificity are NaN (None in the output) when the set holds no case of the
    kind they measure: the data cannot say. Precision and F1 follow scikit-learn's
    zero_division=0: predicting nothing positive is the model's doing and scores 0.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "precision": _div0(tp, tp + fp),
            "recall": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "f1": _div0(2 * tp, 2 * tp + fp + fn),
        }


class _RankKernel:
    """ROC AUC and average precision for many resamples of one score vector at once.

    A resample is a multiset of the original cases (`w`: resamples x cases counts), so each
    one reduces to positive and negative counts per distinct score; both metrics follow from
    cumulative sums of those counts, with scikit-learn's conventions (ties count half in AUC;
    AP is the step sum over distinct thresholds). NaN where the resample holds one class only.
    """

    def __init__(self, scores: np.ndarray):
        self.distinct, self.inverse = np.unique(scores, return_inverse=True)
        self.U = len(self.distinct)

    def __call__(self, w: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        B, U = w.shape[0], self.U
        label = np.asarray(label, dtype=bool)

        def per_score(cases: np.ndarray) -> np.ndarray:
            flat = (np.arange(B)[:, None] * U + self.inverse[cases]).ravel()
            return np.bincount(flat, weights=w[:, cases].ravel(), minlength=B * U).reshape(B, U)

        pos, neg = per_score(label), per_score(~label)
        n_pos, n_neg = pos.sum(1), neg.sum(1)
        defined = (n_pos > 0) & (n_neg > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            neg_below = np.cumsum(neg, 1) - neg
            auc = (pos * (neg_below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
            # Descending thresholds: precision at each distinct score, weighted by new positives.
            tp, fp = np.cumsum(pos[:, ::-1], 1), np.cumsum(neg[:, ::-1], 1)
            precision = tp / np.maximum(tp + fp, 1)
            ap = (pos[:, ::-1] * precision).sum(1) / n_pos
        return np.where(defined, auc, np.nan), np.where(defined, ap, np.nan)


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    ok = np.isfinite(a)
    count = ok.sum(1)
    total = np.where(ok, a, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# -- helpers ----------------------------------------------------------------------------------


def _validate(y_true, probs, classes) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = [str(c) for c in classes]
    K = len(names)
    if K < 2:
        raise ValueError(f"need at least 2 classes, got {names}")
    y = np.asarray(y_true).ravel()
    P = np.asarray(probs, dtype=float)
    if y.size == 0:
        y = y.astype(int)
        P = P.reshape(0, K)
    if P.ndim != 2 or P.shape != (len(y), K):
        raise ValueError(f"probs has shape {P.shape}, expected ({len(y)}, {K})")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(int)
    if y.size and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"y_true holds class indices outside 0..{K - 1}")
    _check_finite(P)
    return y.astype(np.int64), P, names


def _check_finite(a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        raise CxrlabError("probabilities: contain NaN or infinity (did training diverge?)")


def _div0(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0 (scikit-learn's zero_division=0)."""
    den = np.asarray(den, dtype=float)
    return np.where(den == 0, 0.0, np.asarray(num, dtype=float) / np.where(den == 0, 1.0, den))


def _num(x) -> float | None:
    """A JSON-safe float: None for missing, NaN or infinite values."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


# -- printing ---------------------------------------------------------------------------------

_LABELS = {
    "accuracy": "accuracy",
    "precision": "precision",
    "recall": "recall (sensitivity)",
    "specificity": "specificity",
    "f1": "F1",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (avg. precision)",
}


def format_metrics_table(metrics: dict[str, Any], at_half: bool = False) -> Table:
    """A rich table (metric, value, 95% CI) of what `compute_metrics` returned; `at_half`
    adds a column with the metrics at threshold 0.5 (`at_0_5`, 2 classes).

    The caption says how the intervals were drawn and, for validation figures, that the run's
    choices were made on the same images (callers replace the title, not the caption).
    """
    binary = metrics.get("positive_class") is not None
    title = f"{metrics.get('n', '?')} cases"
    title += f", positive class: {metrics['positive_class']}" if binary else ", macro averages"
    caption = f"95% CI: {metrics.get('interval_method') or 'image bootstrap'}"
    if metrics.get("selection_biased"):
        caption += f"; optimistic: {metrics['selection_biased']}"
    table = Table(title=title, caption=caption)
    table.add_column("metric")
    half = metrics.get("at_0_5") if at_half and metrics.get("threshold") is not None else None
    table.add_column(f"at {metrics['threshold']:.3g}" if half else "value", justify="right")
    table.add_column("95% CI", justify="right")
    if half:
        table.add_column("at 0.5", justify="right")
    ci = metrics.get("ci") or {}
    for key in METRIC_KEYS:
        label = _LABELS[key] if binary or key == "accuracy" else f"{_LABELS[key]}, macro"
        interval = ci.get(key)
        shown = f"{interval[0]:.3f} – {interval[1]:.3f}" if interval else "—"
        more = [_fmt(half.get(key)) if key in half else ""] if half else []
        table.add_row(label, _fmt(metrics.get(key)), shown, *more)
    if metrics.get("threshold") is not None:
        stability = metrics.get("threshold_stability") or {}  # operating_point's, at training
        moved = stability.get("interval")
        shown = f"{moved[0]:.3g} – {moved[1]:.3g}" if moved else ""
        shown += " [bold red]unstable[/]" if stability.get("unstable") else ""
        table.add_row("threshold", f"{metrics['threshold']:.4g}", shown,
                      *(["0.5"] if half else []))
    return table


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"
