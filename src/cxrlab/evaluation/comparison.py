"""Two runs on the same validation images: paired differences with bootstrap intervals.

Each run's own interval is mostly the luck of its validation images; two runs trained with the
same seed and data validate on the same images and share that luck, so their intervals
overlap even when one model is clearly better. Resampling the images once for both runs (a
paired bootstrap) cancels the shared part: B − A gets the interval it deserves. Where run A's
split.csv knows the patients, whole patients are resampled (their images are not independent
evidence). Each run decides with its own threshold, as it would in use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrlab.deploy.inference import decide
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.metrics import (
    _nanmean_rows,
    _RankKernel,
    group_codes,
    interval_method,
    resample_weights,
)
from cxrlab.run import load_info, patient_keys, read_predictions, read_threshold

# Imported inside the functions that need them: rich (heavy or
# optional; importing them here would slow every command that imports this module).

LABELS = {"roc_auc": "ROC AUC", "pr_auc": "PR AUC", "accuracy": "accuracy",
          "recall": "sensitivity", "specificity": "specificity",
          "balanced_accuracy": "balanced accuracy (macro recall)"}


class _Run:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        info = load_info(self.dir)
        self.classes, self.positive = info.classes, info.positive
        if not (self.dir / "metrics.json").is_file():
            raise CxrlabError(f"{self.dir}: no metrics.json (is the run complete?)")
        self.threshold = read_threshold(self.dir)
        self.paths, self.y, self.probs = read_predictions(self.dir / "val_predictions.csv",
                                                          self.classes)
        self.pred = decide(self.probs, self.positive, self.threshold)


def compare_runs(run_a: Path, run_b: Path, n_boot: int = 2000, seed: int = 0) -> dict:
    """B − A per metric on the images both validated on: observed difference, 95% paired
    percentile-bootstrap interval, and a verdict only when the interval excludes 0."""
    a, b = _Run(run_a), _Run(run_b)
    if a.classes != b.classes or a.positive != b.positive:
        raise CxrlabError(f"{b.dir}: classes or positive class differ from {a.dir}'s")
    where = {p: i for i, p in enumerate(b.paths)}
    if set(where) != set(a.paths):
        raise CxrlabError(f"{b.dir}: validated on other images than {a.dir} (train both with "
                          "the same data and seed, so they share the split)")
    order = np.array([where[p] for p in a.paths])
    if not np.array_equal(b.y[order], a.y):
        raise CxrlabError(f"{b.dir}: the same images carry other labels than in {a.dir}")
    b_probs, b_pred = b.probs[order], b.pred[order]
    stats_a = _stats(a.y, a.probs, a.pred, a.positive, len(a.classes))
    stats_b = _stats(a.y, b_probs, b_pred, a.positive, len(a.classes))
    observed_a = stats_a(np.ones((1, len(a.y))))
    observed_b = stats_b(np.ones((1, len(a.y))))
    codes = group_codes(patient_keys(a.dir, a.paths), len(a.y))
    diffs: dict[str, list[np.ndarray]] = {k: [] for k in observed_a}
    for w in resample_weights(len(a.y), n_boot, seed, codes):
        sa, sb = stats_a(w), stats_b(w)
        for k in diffs:
            diffs[k].append(sb[k] - sa[k])
    rows = []
    for k in observed_a:
        d = np.concatenate(diffs[k])
        d = d[np.isfinite(d)]
        lo, hi = (float(x) for x in np.percentile(d, [2.5, 97.5])) if d.size else (None, None)
        va, vb = float(observed_a[k][0]), float(observed_b[k][0])
        verdict = ("no interval" if lo is None else "B better" if lo > 0
                   else "B worse" if hi < 0 else "within noise")
        rows.append({"metric": k, "a": va, "b": vb, "difference": vb - va,
                     "ci": None if lo is None else [lo, hi], "verdict": verdict})
    return {"a": str(a.dir), "b": str(b.dir), "n": int(len(a.y)), "n_boot": n_boot,
            "interval_method": "paired " + interval_method(codes), "classes": a.classes,
            "rows": rows}


def _stats(y: np.ndarray, probs: np.ndarray, pred: np.ndarray, positive: int | None, k: int):
    """Per-resample metrics of one run; `w` (B, n) counts each image in each resample."""
    correct = pred == y
    if positive is not None:
        is_pos, kernel = y == positive, _RankKernel(probs[:, positive])
        called = pred == positive

        def binary(w: np.ndarray) -> dict[str, np.ndarray]:
            with np.errstate(invalid="ignore", divide="ignore"):
                recall = (w @ (is_pos & called)) / (w @ is_pos)
                specificity = (w @ (~is_pos & ~called)) / (w @ ~is_pos)
            auc, ap = kernel(w, is_pos)
            return {"roc_auc": auc, "pr_auc": ap, "accuracy": (w @ correct) / w.sum(1),
                    "recall": recall, "specificity": specificity}

        return binary
    kernels = [_RankKernel(probs[:, c]) for c in range(k)]

    def multiclass(w: np.ndarray) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            recalls = np.stack([(w @ (correct & (y == c))) / (w @ (y == c))
                                for c in range(k)], 1)
        aucs = np.stack([kernels[c](w, y == c)[0] for c in range(k)], 1)
        return {"roc_auc": _nanmean_rows(aucs), "accuracy": (w @ correct) / w.sum(1),
                "balanced_accuracy": _nanmean_rows(recalls)}

    return multiclass


def render(result: dict, console) -> None:
    from rich.table import Table

    table = Table("metric", "A", "B", "B − A", "95% CI (paired)", "verdict",
                  title=f"B = {result['b']} vs A = {result['a']}: {result['n']} validation "
                        f"images, {result['n_boot']} paired resamples",
                  caption=f"95% CI: {result.get('interval_method', 'paired image bootstrap')}")
    for r in result["rows"]:
        ci = "-" if r["ci"] is None else f"[{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}]"
        table.add_row(LABELS[r["metric"]], f"{r['a']:.4f}", f"{r['b']:.4f}",
                      f"{r['difference']:+.4f}", ci, r["verdict"])
    console.print(table)
