"""cxrlab.reporting.plots: every figure writes a PNG that opens, at a sensible size, for 2 and 3
classes, and draws the numbers it is given (read back from the Figure before it is saved)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from PIL import Image
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from cxrlab.reporting import plots
from cxrlab.reporting.plots import (
    plot_confusion,
    plot_history,
    plot_pr,
    plot_prediction_grid,
    plot_roc,
)

CLASSES = {2: ["NORMAL", "PNEUMONIA"], 3: ["NORMAL", "BACTERIA", "VIRUS"]}


def check_png(path: Path, min_px: int = 300, max_px: int = 4000) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        w, h = im.size
    assert min_px <= w <= max_px and min_px <= h <= max_px, (w, h)
    assert not list(path.parent.glob(".*.tmp"))  # atomic write left nothing behind
    return w, h


def _axes(ax) -> SimpleNamespace:
    return SimpleNamespace(
        title=ax.get_title(), title_color=to_rgba(ax.title.get_color()),
        lines={ln.get_label(): (np.asarray(ln.get_xdata(), float),
                                np.asarray(ln.get_ydata(), float)) for ln in ax.get_lines()},
        texts=[t.get_text() for t in ax.texts],
        images=[np.asarray(im.get_array()) for im in ax.get_images()])


@pytest.fixture
def drawn(monkeypatch) -> list[SimpleNamespace]:
    """Per figure saved: its axes (title, lines by label, texts, images) and suptitle."""
    figs: list[SimpleNamespace] = []
    real = plots._save

    def save(fig, path):
        sup = fig._suptitle.get_text() if fig._suptitle is not None else ""
        figs.append(SimpleNamespace(axes=[_axes(ax) for ax in fig.axes], suptitle=sup))
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return figs


def curve(ax: SimpleNamespace, prefix: str) -> tuple[str, np.ndarray, np.ndarray]:
    """The one line whose label starts with `prefix`: (label, x, y)."""
    found = [(label, *xy) for label, xy in ax.lines.items() if label.startswith(prefix)]
    assert len(found) == 1, (prefix, list(ax.lines))
    return found[0]


def predictions(k: int, n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    y[:k] = np.arange(k)  # every class present
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, probs


def history(n: int = 6) -> list[dict]:
    return [
        {"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.1 / (e + 1) + 0.05 * e,
         "train_acc": 0.6 + 0.05 * e, "val_acc": 0.55 + 0.04 * e,
         "train_precision": 0.7, "val_precision": 0.65,
         "train_recall": 0.6 + 0.02 * e, "val_recall": 0.5 + 0.03 * e}
        for e in range(n)
    ]


def test_plot_history(tmp_path, drawn):
    rows = history()
    check_png(plot_history(rows, tmp_path / "history.png"))
    (fig,) = drawn
    epochs = [r["epoch"] for r in rows]
    best = min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert best == 4  # the val loss turns up after epoch 4
    for ax, key in zip(fig.axes, ("loss", "acc", "precision", "recall"), strict=True):
        for split in ("train", "val"):
            x, y = ax.lines[split]
            assert list(x) == epochs and y == pytest.approx([r[f"{split}_{key}"] for r in rows])
        assert list(ax.lines[f"best val loss (epoch {best})"][0]) == [best, best]
    assert [ax.title for ax in fig.axes] == ["loss", "accuracy", "precision", "recall"]


def test_plot_history_tolerates_missing_columns(tmp_path, drawn):
    full = history()
    rows = history()
    for r in rows:
        del r["train_precision"], r["val_precision"]  # never recorded
        r["val_recall"] = None
    rows[0]["train_recall"] = ""  # as read back from a CSV
    rows[1]["val_acc"] = float("nan")
    rows[2] = {k: str(v) for k, v in rows[2].items()}  # strings from csv.DictReader
    del rows[3]["val_loss"]
    check_png(plot_history(rows, tmp_path / "history.png"))
    loss, acc, precision, recall = drawn[0].axes
    x, y = loss.lines["val"]  # epoch 3's missing value is skipped, the string one is read
    assert list(x) == [0, 1, 2, 4, 5]
    assert y == pytest.approx([full[e]["val_loss"] for e in (0, 1, 2, 4, 5)])
    assert list(acc.lines["val"][0]) == [0, 2, 3, 4, 5]  # NaN skipped
    assert precision.texts == ["not recorded"] and "train" not in precision.lines
    assert list(recall.lines["train"][0]) == [1, 2, 3, 4, 5] and "val" not in recall.lines
    check_png(plot_history([{"epoch": 1, "train_loss": 0.5}], tmp_path / "one.png"))
    assert list(drawn[1].axes[0].lines["train"][1]) == [0.5]
    check_png(plot_history([], tmp_path / "empty.png"))
    assert all(ax.texts == ["not recorded"] for ax in drawn[2].axes)


@pytest.mark.parametrize("k", [2, 3])
def test_plot_confusion(tmp_path, k, drawn):
    y, probs = predictions(k)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, probs.argmax(1)), 1)
    check_png(plot_confusion(cm.tolist(), CLASSES[k], tmp_path / "cm.png", title="Validation"))
    ax = drawn[0].axes[0]
    share = cm / cm.sum(1, keepdims=True)
    assert ax.title == "Validation (n = 60)"
    assert np.allclose(ax.images[0], share)  # colour: the share of each true class
    assert ax.texts == [f"{cm[i, j]}\n{share[i, j]:.1%}" for i in range(k) for j in range(k)]
    cm[0] = 0  # a class with no cases: no division by zero
    check_png(plot_confusion(cm, CLASSES[k], tmp_path / "cm0.png"))
    ax = drawn[1].axes[0]
    assert np.all(ax.images[0][0] == 0) and ax.texts[:k] == ["0\n0.0%"] * k
    assert np.allclose(ax.images[0][1:], share[1:])


@pytest.mark.parametrize("k", [2, 3])
def test_plot_roc_and_pr(tmp_path, k, drawn):
    y, probs = predictions(k)
    check_png(plot_roc(y, probs, CLASSES[k], tmp_path / "roc.png", positive=1,
                       threshold=0.4 if k == 2 else None))
    check_png(plot_pr(y, probs, CLASSES[k], tmp_path / "sub" / "pr.png", positive=1))
    roc, pr = drawn[0].axes[0], drawn[1].axes[0]
    # two classes: one curve, of the positive class; more: one per class against the rest
    ones = [("PNEUMONIA vs NORMAL", 1)] if k == 2 else [(c, i) for i, c in enumerate(CLASSES[k])]
    for name, c in ones:
        is_c, score = y == c, probs[:, c]
        label, fpr, tpr = curve(roc, name + " (AUC")
        assert label == f"{name} (AUC = {roc_auc_score(is_c, score):.3f})"
        want_fpr, want_tpr, _ = roc_curve(is_c, score)
        assert np.allclose(fpr, want_fpr) and np.allclose(tpr, want_tpr)
        label, recall, precision = curve(pr, name + " (AP")
        assert label == f"{name} (AP = {average_precision_score(is_c, score):.3f})"
        want_p, want_r, _ = precision_recall_curve(is_c, score)
        assert np.allclose(recall, want_r) and np.allclose(precision, want_p)
    if k == 2:  # the operating point at the threshold, and the prevalence baseline
        called, pos = probs[:, 1] >= 0.4, y == 1
        _, x, sens = curve(roc, "threshold 0.4")
        assert x == pytest.approx([called[~pos].mean()])
        assert sens == pytest.approx([called[pos].mean()])
        assert pr.lines["prevalence"][1] == pytest.approx([pos.mean()] * 2)
        check_png(plot_roc(y, probs, CLASSES[k], tmp_path / "roc0.png", positive=0))
        _, fpr, tpr = curve(drawn[2].axes[0], "NORMAL vs PNEUMONIA")  # positive 0: its column
        want_fpr, want_tpr, _ = roc_curve(y == 0, probs[:, 0])
        assert np.allclose(fpr, want_fpr) and np.allclose(tpr, want_tpr)


@pytest.mark.parametrize("k", [2, 3])
def test_curves_with_a_missing_class_do_not_crash(tmp_path, k, drawn):
    y, probs = predictions(k)
    keep = y != 0
    check_png(plot_roc(y[keep], probs[keep], CLASSES[k], tmp_path / "roc.png", threshold=0.5))
    check_png(plot_pr(y[keep], probs[keep], CLASSES[k], tmp_path / "pr.png"))
    absent = "PNEUMONIA vs NORMAL" if k == 2 else "NORMAL"
    for fig in drawn:
        assert f"{absent}: undefined (one class only)" in fig.axes[0].lines
    if k == 3:  # the classes that are present still get their curves
        curve(drawn[0].axes[0], "BACTERIA (AUC")


@pytest.mark.parametrize(("k", "channels"), [(2, 1), (3, 3)])
def test_plot_prediction_grid(tmp_path, k, channels, drawn):
    y, probs = predictions(k, n=40)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, channels, 48, 40), dtype=np.uint8)
    y_pred = probs.argmax(1)
    assert (y_pred != y).any()
    conf = probs.max(1)
    w, h = check_png(plot_prediction_grid(images, y, y_pred, conf, CLASSES[k],
                                          tmp_path / "grid.png", max_images=32))
    assert w > h  # 8 columns, 4 rows
    # mistakes first, most confident first, in red; then the right ones in dataset order
    wrong = np.flatnonzero(y_pred != y)
    order = [*wrong[np.argsort(-conf[wrong], kind="stable")], *np.flatnonzero(y_pred == y)][:32]
    fig = drawn[0]
    assert fig.suptitle == f"32 of 40 images, {len(wrong)} wrong (shown first, red)"
    for ax, i in zip(fig.axes, order, strict=True):
        assert ax.title.startswith(f"pred: {CLASSES[k][y_pred[i]]} ({conf[i]:.2f})")
        assert ax.title.endswith(f"true: {CLASSES[k][y[i]]}")
        assert (ax.title_color == to_rgba(plots.WRONG_COLOR)) == (y_pred[i] != y[i])
        want = images[i][0] if channels == 1 else np.transpose(images[i], (1, 2, 0))
        assert np.array_equal(ax.images[0], want)
    # Full probability matrix, unlabelled images, and fewer images than a row.
    check_png(plot_prediction_grid(images[:3], None, y_pred[:3], probs[:3], CLASSES[k],
                                   tmp_path / "few.png"), min_px=200)


def test_plot_prediction_grid_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plot_prediction_grid(np.zeros((2, 48, 48), np.uint8), [0, 1], [0, 1], [0.9, 0.8],
                             CLASSES[2], tmp_path / "bad.png")
