"""Cross-validation: k ordinary runs, each validating on one fold, and the pooled figures.

One validation split of a small set moves by whole points per image (covid19: 50 images, 2
points each). k folds of one seed validate on every training image exactly once, so the pooled
out-of-fold accuracy rests on all of them; the spread over folds says how much one split can
mislead. Each fold predicts with its own model, so pooling decisions (not probabilities) is
what is honest; AUC stays per fold. A fold's own threshold was chosen on the very images it
would decide, so the pooled decisions use the median of the other folds' thresholds instead:
no extra training, and no image is decided at a threshold fitted to it.

    OUT/crossval.yaml     the configuration (with `folds`); a continued run must match it
    OUT/fold-<i>/         an ordinary run directory (evaluate, report, export it as any run)
    OUT/crossval.json     per-fold and pooled figures, written when every fold is complete
    OUT/model.pt, run.json, ...  the folds' ensemble as a run (training/ensemble.py)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import balanced_accuracy_score, confusion_matrix

from cxrlab.config import RunConfig
from cxrlab.data.sources import load_source
from cxrlab.data.split import assign_splits
from cxrlab.deploy.inference import decide
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.metrics import group_codes, interval_method, resample_weights
from cxrlab.evaluation.operating_point import threshold_spread, warning
from cxrlab.evaluation.overlap import DIGESTS
from cxrlab.evaluation.stats import t_interval
from cxrlab.run import load_info, patient_keys, read_predictions, read_threshold, write_json
from cxrlab.training import small_sets
from cxrlab.training.ensemble import FOLDS_FILE, finish, member_config, member_dir, train_members

# Imported inside the functions that need them: rich (heavy or
# optional; importing them here would slow every command that imports this module).

log = logging.getLogger(__name__)
CONFIG_FILE = FOLDS_FILE
RESULT_FILE = "crossval.json"
POOLED_BINARY = ("each fold's images decided at the median of the other folds' thresholds, "
                 "none chosen on the images it decides (each fold's epoch still was)")
POOLED_ARGMAX = ("each fold's images decided by its own model's argmax: no threshold "
                 "(each fold's epoch was chosen on its images)")


def fold_config(config: RunConfig, fold: int) -> RunConfig:
    return member_config(config, fold)


def fold_dir(out: Path, fold: int) -> Path:
    return member_dir(out, "folds", fold)


def is_crossval_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def run_crossval(config: RunConfig, out: Path, progress: bool = True,
                 on_fold: Callable[[int, str], None] | None = None) -> dict:
    """Train (or continue) every fold under `out`, pool them, and make `out` the folds'
    ensemble run (training/ensemble.py); returns crossval.json's dict.

    A new `out` must be empty; one holding crossval.yaml continues only with the same
    configuration: complete folds are kept, a killed fold resumes from its checkpoint (or is
    set aside as `fold-<i>.failed-<time>` when it has none) — nothing trained is redone or lost.
    Under a time budget fold 1 plans for a K-th of it and every fold trains that plan.
    """
    if config.folds is None or config.fold is not None:
        raise CxrlabError("--folds: give the number of folds (2-20) for cross-validation")
    # a small set's recipe, the same for every fold, named before crossval.yaml is written:
    # continuing (the same command, or --resume from crossval.yaml) finds the same folds
    small_set = small_sets.for_folds(config)
    config = small_sets.with_recipe(config, small_set)
    trained = train_members(config, out, progress, on_fold, check=_check_folds)
    result = pool(out, config.folds)
    saved = Path(out) / RESULT_FILE
    if small_set is not None:
        result["small_set"] = small_set.to_dict()
    elif saved.is_file():  # --resume reads the chosen recipe back: keep why it was chosen
        previous = json.loads(saved.read_text()).get("small_set")
        if previous is not None:
            result["small_set"] = previous
    write_json(saved, result)
    finish(config, out, rebuild=trained > 0)
    return result


def _check_folds(config: RunConfig) -> None:
    source = load_source(Path(config.data), config.image_col, config.label_col)
    seed = config.seed if config.split_seed is None else config.split_seed
    assign_splits(source, config.val_fraction, seed, config.group_regex, config.folds, 1)


def pool(out: Path, folds: int) -> dict:
    """Per-fold figures with t-intervals, and pooled out-of-fold decisions over every image."""
    per_fold, seen, predictions, patients = [], {}, [], []
    classes = None
    for i in range(1, folds + 1):
        run_dir = fold_dir(out, i)
        info = load_info(run_dir)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if classes is None:
            classes = info.classes
        elif info.classes != classes:
            raise CxrlabError(f"{run_dir}: classes {info.classes} differ from fold 1's {classes}")
        paths, y, probs = read_predictions(run_dir / "val_predictions.csv", classes)
        for p in paths:
            if p in seen:
                raise CxrlabError(f"{p}: validated in fold {seen[p]} and fold {i}; the folds "
                                  "overlap (were they made with different seeds or data?)")
            seen[p] = i
        predictions.append((y, probs, info.positive))
        patients.append(patient_keys(run_dir, paths))
        per_fold.append({"fold": i, "n": len(y), "accuracy": metrics.get("accuracy"),
                         "roc_auc": metrics.get("roc_auc"), "threshold": read_threshold(run_dir),
                         "epochs": metrics.get("epochs"),
                         "copies_of_training": _copies(run_dir, metrics)})
    pred_all = []
    for i, (_, probs, positive) in enumerate(predictions):
        pooled_t = None
        if positive is not None:
            others = [f["threshold"] for j, f in enumerate(per_fold)
                      if j != i and f["threshold"] is not None]
            pooled_t = float(np.median(others)) if others else 0.5
        per_fold[i]["pooled_threshold"] = pooled_t
        pred_all.append(decide(probs, positive, pooled_t))
    binary = predictions[0][2] is not None
    y, pred = np.concatenate([p[0] for p in predictions]), np.concatenate(pred_all)
    spread = None
    if binary:  # the folds' thresholds, and what the lowest and highest decide out of fold
        pos = predictions[0][2]
        spread = threshold_spread([f["threshold"] for f in per_fold], y == pos,
                                  np.concatenate([p[1][:, pos] for p in predictions]))
        if warning(spread, "the folds' thresholds' range"):
            log.warning(warning(spread, "the folds' thresholds' range"))
    correct = int((y == pred).sum())
    ci, ci_method = accuracy_interval(y == pred, patients)
    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    recall = [float(cm[k, k] / cm[k].sum()) if cm[k].sum() else None for k in range(len(classes))]
    bounds = (0.0, 1.0)
    counts = [f["copies_of_training"] for f in per_fold]
    copies = None if None in counts else sum(counts)
    if copies:
        log.warning("%d out-of-fold image(s) are copies of their fold's training images (same "
                    "content, another name): the pooled figures are optimistic", copies)
    return {
        "folds": folds,
        "classes": classes,
        "per_fold": per_fold,
        "threshold_spread": spread,
        "fold_mean": {k: t_interval([f[k] for f in per_fold], bounds=bounds).to_dict()
                      for k in ("accuracy", "roc_auc")},
        "pooled": {"decisions": POOLED_BINARY if binary else POOLED_ARGMAX,
                   "n": int(len(y)), "correct": correct, "accuracy": correct / len(y),
                   "accuracy_ci": ci, "accuracy_ci_method": ci_method,
                   "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
                   "recall": dict(zip(classes, recall, strict=True)),
                   "confusion_matrix": cm.tolist(),
                   "copies_of_training": copies},
    }


def _copies(run_dir: Path, metrics: dict) -> int | None:
    """Validation images of a fold that are copies of its own training images (same content
    under another name, found by cxrlab.evaluation.overlap at training); None for a fold trained
    before training looked."""
    if "copies_of_training" in metrics:
        return int(metrics["copies_of_training"])
    return 0 if (run_dir / DIGESTS).is_file() else None


def accuracy_interval(correct: np.ndarray, patients: list[list[str] | None],
                      n_boot: int = 2000) -> tuple[list[float], str]:
    """95% interval of the pooled accuracy, and how it was drawn. A patient's images are not
    independent (one patient's films tend to be all right or all wrong), so where every fold's
    split.csv knows its patients, whole patients are resampled; Wilson's binomial interval
    over images only where none does."""
    if patients and all(keys is not None for keys in patients):
        codes = group_codes([k for keys in patients for k in keys], len(correct))
        hits = correct.astype(float)
        accs = np.concatenate([w @ hits / w.sum(1) for w in resample_weights(
            len(correct), n_boot, 0, codes)])
        return [float(x) for x in np.percentile(accs, [2.5, 97.5])], interval_method(codes)
    ci = binomtest(int(correct.sum()), len(correct)).proportion_ci(0.95, method="wilson")
    return [float(ci.low), float(ci.high)], "Wilson over images (no patient keys)"


def render(result: dict, console) -> None:
    """Per-fold table, then the pooled out-of-fold figures and confusion matrix."""
    from rich.table import Table

    def f(v, digits: int = 4) -> str:
        return "-" if v is None else f"{v:.{digits}f}"

    table = Table("fold", "images", "accuracy", "ROC AUC", "own threshold",
                  "pooled at", "epochs", title=f"Cross-validation, {result['folds']} folds",
                  caption="per fold: validation figures at the fold's own epoch and threshold "
                          "(selection-biased)")
    for r in result["per_fold"]:
        table.add_row(str(r["fold"]), str(r["n"]), f(r["accuracy"]), f(r["roc_auc"]),
                      f(r["threshold"], 3), f(r.get("pooled_threshold"), 3), str(r["epochs"]),
                      end_section=r is result["per_fold"][-1])
    def mean(key: str) -> str:
        e = result["fold_mean"][key]
        if e["ci_low"] is None:
            return f(e["mean"])
        return f"{f(e['mean'])} [{f(e['ci_low'])}, {f(e['ci_high'])}]"

    table.add_row("mean [95% t]", "", mean("accuracy"), mean("roc_auc"), "", "", "")
    console.print(table)
    spread = result.get("threshold_spread")
    if spread:
        from cxrlab.evaluation.operating_point import rate

        lo, hi = spread["at_low"], spread["at_high"]
        console.print(f"Folds' thresholds {spread['min']:.3g} to {spread['max']:.3g}: out of fold "
                      f"sensitivity {rate(lo['sensitivity'])} / {rate(hi['sensitivity'])}, "
                      f"specificity {rate(lo['specificity'])} / {rate(hi['specificity'])} at the "
                      "two ends"
                      + (" [bold red](unstable)[/]" if spread["unstable"] else "") + ".")
    p = result["pooled"]
    lo, hi = p["accuracy_ci"]
    method = p.get("accuracy_ci_method", "Wilson")  # crossval.json written before it said
    console.print(f"Pooled out-of-fold: {p['correct']}/{p['n']} correct, accuracy "
                  f"{p['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] (95%, {method}), balanced accuracy "
                  f"{p['balanced_accuracy']:.4f}")
    if p.get("decisions"):
        console.print(f"Pooled decisions: {p['decisions']}.")
    if p.get("copies_of_training"):
        console.print(f"[bold red]{p['copies_of_training']} of them are copies of their fold's "
                      "training images[/] (optimistic; `cxrlab data summary` lists them).")
    console.print("Recall per class: " + ", ".join(
        f"{c} {f(r, 3)}" for c, r in p["recall"].items()))
    cm = Table("true \\ predicted", *result["classes"], title="Pooled confusion matrix")
    for c, row in zip(result["classes"], p["confusion_matrix"], strict=True):
        cm.add_row(c, *map(str, row))
    console.print(cm)
