"""cxrlab.plots: every figure writes a PNG that opens, at a sensible size, for 2 and 3 classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab.plots import (
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


def test_plot_history(tmp_path):
    check_png(plot_history(history(), tmp_path / "history.png"))


def test_plot_history_tolerates_missing_columns(tmp_path):
    rows = history()
    for r in rows:
        del r["train_precision"], r["val_precision"]  # never recorded
        r["val_recall"] = None
    rows[0]["train_recall"] = ""  # as read back from a CSV
    rows[1]["val_acc"] = float("nan")
    rows[2] = {k: str(v) for k, v in rows[2].items()}  # strings from csv.DictReader
    del rows[3]["val_loss"]
    check_png(plot_history(rows, tmp_path / "history.png"))
    check_png(plot_history([{"epoch": 1, "train_loss": 0.5}], tmp_path / "one.png"))
    check_png(plot_history([], tmp_path / "empty.png"))


@pytest.mark.parametrize("k", [2, 3])
def test_plot_confusion(tmp_path, k):
    y, probs = predictions(k)
    cm = np.zeros((k, k), dtype=int)
    np.add.at(cm, (y, probs.argmax(1)), 1)
    check_png(plot_confusion(cm.tolist(), CLASSES[k], tmp_path / "cm.png", title="Validation"))
    cm[0] = 0  # a class with no cases: no division by zero
    check_png(plot_confusion(cm, CLASSES[k], tmp_path / "cm0.png"))


@pytest.mark.parametrize("k", [2, 3])
def test_plot_roc_and_pr(tmp_path, k):
    y, probs = predictions(k)
    check_png(plot_roc(y, probs, CLASSES[k], tmp_path / "roc.png", positive=1,
                       threshold=0.4 if k == 2 else None))
    check_png(plot_pr(y, probs, CLASSES[k], tmp_path / "sub" / "pr.png", positive=1))


@pytest.mark.parametrize("k", [2, 3])
def test_curves_with_a_missing_class_do_not_crash(tmp_path, k):
    y, probs = predictions(k)
    keep = y != 0
    check_png(plot_roc(y[keep], probs[keep], CLASSES[k], tmp_path / "roc.png", threshold=0.5))
    check_png(plot_pr(y[keep], probs[keep], CLASSES[k], tmp_path / "pr.png"))


@pytest.mark.parametrize(("k", "channels"), [(2, 1), (3, 3)])
def test_plot_prediction_grid(tmp_path, k, channels):
    y, probs = predictions(k, n=40)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, channels, 48, 40), dtype=np.uint8)
    y_pred = probs.argmax(1)
    assert (y_pred != y).any()
    conf = probs.max(1)
    w, h = check_png(plot_prediction_grid(images, y, y_pred, conf, CLASSES[k],
                                          tmp_path / "grid.png", max_images=32))
    assert w > h  # 8 columns, 4 rows
    # Full probability matrix, unlabelled images, and fewer images than a row.
    check_png(plot_prediction_grid(images[:3], None, y_pred[:3], probs[:3], CLASSES[k],
                                   tmp_path / "few.png"), min_px=200)


def test_plot_prediction_grid_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        plot_prediction_grid(np.zeros((2, 48, 48), np.uint8), [0, 1], [0, 1], [0.9, 0.8],
                             CLASSES[2], tmp_path / "bad.png")
