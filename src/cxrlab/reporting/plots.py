"""Figures for a run, one function per PNG.

Figures are built as `matplotlib.figure.Figure` objects drawn by the Agg canvas, never through
pyplot: headless by construction, no process-wide backend switch for whoever imported us, and
no global figure registry to leak or to share between threads (the server draws too).
Every function writes its PNG atomically and returns the path; given no path, it returns the
Figure instead (what a notebook displays inline: `cxrlab.Run.plot_history` and friends).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

# Imported inside the functions that need them: matplotlib (heavy or
# optional; importing them here would slow every command that imports this module).

DPI = 110
TRAIN_COLOR, VAL_COLOR, WRONG_COLOR = "tab:blue", "tab:orange", "tab:red"


def plot_history(history: Sequence[dict[str, Any]],
                 path: str | Path | None = None) -> Path | Figure:
    """Loss, accuracy, precision and recall per epoch, train beside val, best epoch marked.

    Missing, None, empty or NaN values are skipped, so a history.csv read back as strings works.
    """
    rows = list(history)
    epochs = [_value(r.get("epoch")) for r in rows]
    epochs = [i + 1 if e is None else e for i, e in enumerate(epochs)]
    fig = _figure((10, 7))
    axes = fig.subplots(2, 2, sharex=True).ravel()  # shared: an empty panel keeps the epochs
    best = _best_epoch(rows, epochs)
    for ax, (key, title) in zip(
        axes, (("loss", "loss"), ("acc", "accuracy"), ("precision", "precision"),
               ("recall", "recall")), strict=True,
    ):
        drawn = False
        for split, color in (("train", TRAIN_COLOR), ("val", VAL_COLOR)):
            pts = [(e, _value(r.get(f"{split}_{key}"))) for e, r in zip(epochs, rows, strict=True)]
            pts = [(e, v) for e, v in pts if v is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", markersize=4, color=color, label=split)
                drawn = True
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1,
                       label=f"best val loss (epoch {best:g})")
        if not drawn:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
            ax.set_yticks([])
        ax.set_title(title)
        ax.tick_params(labelbottom=True)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
    return fig if path is None else _save(fig, path)


def plot_confusion(
    cm: Sequence[Sequence[int]] | np.ndarray,
    classes: Sequence[str],
    path: str | Path | None = None,
    title: str = "Confusion matrix",
) -> Path | Figure:
    """Counts and share of each true class per cell; colour by that share, so rare classes show."""
    cm = np.asarray(cm, dtype=int)
    K = len(classes)
    if cm.shape != (K, K):
        raise ValueError(f"confusion matrix has shape {cm.shape}, expected ({K}, {K})")
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    side = max(4.5, 1.0 * K + 2.5)
    fig = _figure((side + 1.0, side))
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fontsize = max(6, 12 - K // 2)
    for i in range(K):
        for j in range(K):
            ax.text(j, i, f"{cm[i, j]}\n{share[i, j]:.1%}", ha="center", va="center",
                    fontsize=fontsize, color="white" if share[i, j] > 0.5 else "black")
    names = [str(c) for c in classes]
    long_names = max(map(len, names)) > 8
    ax.set_xticks(range(K), names, rotation=30 if long_names else 0,
                  ha="right" if long_names else "center")
    ax.set_yticks(range(K), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title} (n = {int(cm.sum())})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig if path is None else _save(fig, path)


def plot_roc(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: str | Path | None = None,
    positive: int | None = None,
    threshold: float | None = None,
) -> Path | Figure:
    """ROC curve with its AUC (one-vs-rest per class for K > 2); for two classes the operating
    point at `threshold` is marked, so the chosen trade-off is visible on the curve."""
    fig = _figure((6, 6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    curves = _one_vs_rest(y_true, probs, classes, positive)
    for label, is_pos, score in curves:
        if is_pos.all() or not is_pos.any():
            ax.plot([], [], " ", label=f"{label}: undefined (one class only)")
            continue
        fpr, tpr, _ = roc_curve(is_pos, score)
        ax.plot(fpr, tpr, linewidth=2, label=f"{label} (AUC = {auc(fpr, tpr):.3f})")
        if threshold is not None and len(curves) == 1:
            called = score >= threshold
            sens, fpr_t = called[is_pos].mean(), called[~is_pos].mean()
            ax.plot([fpr_t], [sens], "o", color="black", markersize=8, zorder=3,
                    label=f"threshold {threshold:.3g}: sensitivity {sens:.2f}, "
                          f"specificity {1 - fpr_t:.2f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC curve" + ("" if len(curves) == 1 else "s (one vs rest)"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig if path is None else _save(fig, path)


def plot_pr(
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    path: str | Path | None = None,
    positive: int | None = None,
) -> Path | Figure:
    """Precision-recall curve(s) with average precision; the dashed line is the prevalence, what
    a useless classifier scores, which matters more than the diagonal when classes are rare."""
    fig = _figure((6, 6))
    ax = fig.subplots()
    curves = _one_vs_rest(y_true, probs, classes, positive)
    for label, is_pos, score in curves:
        if is_pos.all() or not is_pos.any():
            ax.plot([], [], " ", label=f"{label}: undefined (one class only)")
            continue
        precision, recall, _ = precision_recall_curve(is_pos, score)
        ap = average_precision_score(is_pos, score)
        (line,) = ax.step(recall, precision, where="post", linewidth=2,
                          label=f"{label} (AP = {ap:.3f})")
        ax.axhline(is_pos.mean(), linestyle="--", linewidth=1, color=line.get_color(),
                   label="prevalence" if len(curves) == 1 else None)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall curve" + ("" if len(curves) == 1 else "s (one vs rest)"))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig if path is None else _save(fig, path)


def plot_prediction_grid(
    images: np.ndarray,
    y_true: Sequence[int] | np.ndarray | None,
    y_pred: Sequence[int] | np.ndarray,
    p: Sequence[float] | np.ndarray,
    classes: Sequence[str],
    path: str | Path | None = None,
    max_images: int = 32,
    wrong_first: bool = True,
) -> Path | Figure:
    """Images with "pred: X (0.93) | true: Y" titles, mistakes first and framed in red.

    images is uint8 (N, C, H, W) with C 1 or 3; p is the probability of the predicted class
    (N,) or the full (N, K) matrix. Mistakes come most-confident first, like fastai's "top
    losses": those are the ones worth looking at (wrong_first=False: in the order given).
    y_true None (unlabelled images) shows
    predictions only.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images has shape {images.shape}, expected (N, 1 or 3, H, W)")
    n = len(images)
    y_pred = np.asarray(y_pred, dtype=int).ravel()
    p = np.asarray(p, dtype=float)
    conf = p[np.arange(n), y_pred] if p.ndim == 2 else p.ravel()
    truth = None if y_true is None else np.asarray(y_true, dtype=int).ravel()
    if len(y_pred) != n or len(conf) != n or (truth is not None and len(truth) != n):
        raise ValueError("images, y_true, y_pred and p must have the same length")
    wrong = np.zeros(n, dtype=bool) if truth is None else truth != y_pred
    wrong_idx = np.flatnonzero(wrong)
    wrong_idx = wrong_idx[np.argsort(-conf[wrong_idx], kind="stable")]
    order = np.concatenate([wrong_idx, np.flatnonzero(~wrong)]) if wrong_first else np.arange(n)
    order = order[: max(0, max_images)]

    cols = max(1, min(8, len(order)))
    rows = max(1, math.ceil(len(order) / cols))
    fig = _figure((2.1 * cols, 2.35 * rows + 0.5))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for ax, i in zip(axes, order, strict=False):
        img = images[i]
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(np.transpose(img, (1, 2, 0)))
        title = f"pred: {classes[y_pred[i]]} ({conf[i]:.2f})"
        if truth is not None:
            sep = "\n" if len(title) + len(str(classes[truth[i]])) > 24 else " | "
            title += f"{sep}true: {classes[truth[i]]}"
        ax.set_title(title, fontsize=8, color=WRONG_COLOR if wrong[i] else "black")
        if wrong[i]:
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_edgecolor(WRONG_COLOR)
                spine.set_linewidth(3)
    if n == 0:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center",
                     transform=axes[0].transAxes)
    summary = f"{len(order)} of {n} images"
    if truth is not None:
        summary += f", {int(wrong.sum())} wrong (shown first, red)"
    fig.suptitle(summary)
    return fig if path is None else _save(fig, path)


def plot_shift(result: dict[str, Any], path: str | Path) -> Path:
    """Stress test (cxrlab.site.shift): AUC, sensitivity and specificity against severity (0 = the
    unshifted images), one line per shift, so the shifts that hurt stand out."""
    import matplotlib as mpl

    rows = result["rows"]
    shifts = list(dict.fromkeys(r["shift"] for r in rows))
    keys = [("roc_auc", "ROC AUC"), ("sensitivity", "sensitivity"), ("specificity", "specificity")]
    keys = [(k, t) for k, t in keys if result["baseline"].get(k) is not None] or [
        ("accuracy", "accuracy")]
    fig = _figure((4.2 * len(keys) + 1.8, 4))
    axes = np.atleast_1d(fig.subplots(1, len(keys), sharey=True))
    colors = mpl.colormaps["tab10"]
    for ax, (key, title) in zip(axes, keys, strict=True):
        base = result["baseline"].get(key)
        for i, name in enumerate(shifts):
            pts = sorted((r["severity"], r.get(key)) for r in rows if r["shift"] == name)
            xs = [0] + [s for s, v in pts if v is not None]
            ys = [base] + [v for _, v in pts if v is not None]
            ax.plot(xs, ys, marker="o", markersize=3, color=colors(i % 10), label=name)
        ax.set_title(title)
        ax.set_xlabel("severity (0 = none)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"at threshold {result['threshold']:.3g}"
                       if result.get("threshold") is not None else "")
    axes[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle(f"Stress test: {result['n']} images under synthetic intake shifts")
    return _save(fig, path)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None,
                 recipe_lr: float | None, path: str | Path | None = None,
                 title: str = "") -> Path | Figure:
    """The learning-rate range test (training/lr_find.py): smoothed training loss against the
    rate (log scale), the suggestion marked, the recipe's own rate as a dashed line."""
    fig = _figure((7, 4.5))
    ax = fig.subplots()
    pts = [(x, y) for x, y in zip(lrs, losses, strict=True) if math.isfinite(y)]
    if pts:
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, color=TRAIN_COLOR, label="training loss (smoothed)")
        # the curve ends where the loss blew up: keep that rise from flattening the rest
        lowest = int(np.argmin(ys))
        low, start = ys[lowest], max(ys[: lowest + 1])
        if start > low:
            ax.set_ylim(low - 0.1 * (start - low), start + 0.5 * (start - low))
    if suggestion is not None:
        y = min(pts, key=lambda p: abs(math.log(p[0] / suggestion)))[1] if pts else None
        ax.plot([suggestion], [y], marker="o", markersize=9, color=WRONG_COLOR,
                linestyle="none", label=f"suggestion {suggestion:.2g} (steepest fall)")
    if recipe_lr is not None:
        ax.axvline(recipe_lr, color="grey", linestyle="--", linewidth=1,
                   label=f"recipe's lr {recipe_lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(f"Learning-rate finder: {title}" if title else "Learning-rate finder")
    return fig if path is None else _save(fig, path)


# -- helpers ----------------------------------------------------------------------------------


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Write the PNG beside its target, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600) and the report server should read these.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        fig.clear()
    return path


def _value(v: Any) -> float | None:
    """A finite float, or None for missing/empty/NaN (history rows may come from a CSV)."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _best_epoch(rows: list[dict[str, Any]], epochs: list[float]) -> float | None:
    losses = [(_value(r.get("val_loss")), e) for r, e in zip(rows, epochs, strict=True)]
    losses = [(v, e) for v, e in losses if v is not None]
    return min(losses, key=lambda t: t[0])[1] if losses else None


def _one_vs_rest(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, classes: Sequence[str],
    positive: int | None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, is_positive, score) per curve: one for two classes, one per class otherwise."""
    y = np.asarray(y_true, dtype=int).ravel()
    P = np.asarray(probs, dtype=float)
    K = len(classes)
    if P.ndim != 2 or P.shape != (len(y), K):
        raise ValueError(f"probs has shape {P.shape}, expected ({len(y)}, {K})")
    if K == 2:
        pos = 1 if positive is None else int(positive)
        return [(f"{classes[pos]} vs {classes[1 - pos]}", y == pos, P[:, pos])]
    return [(str(name), y == k, P[:, k]) for k, name in enumerate(classes)]
