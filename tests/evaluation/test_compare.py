"""cxrlab.evaluation.comparison and `cxrlab compare`: paired differences between two
runs' validations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.comparison import compare_runs
from cxrlab.run import (
    RunInfo,
    read_split_csv,
    save_info,
    write_predictions_csv,
    write_threshold,
)
from cxrlab.training.lifecycle import train_run
from tests.conftest import make_kermany_folder

CLASSES = ["NORMAL", "PNEUMONIA"]


def _run(root: Path, y: np.ndarray, p1: np.ndarray, threshold: float = 0.5,
         classes=CLASSES, positive: int | None = 1) -> Path:
    """A finished run's files as the pipeline writes them (predictions chosen by the test)."""
    root.mkdir(parents=True)
    save_info(root, RunInfo(classes, positive, 1, state="complete"))
    (root / "metrics.json").write_text(json.dumps({"threshold": threshold}))
    if positive is not None:
        write_threshold(root, threshold)
    probs = np.stack([1 - p1, p1], 1) if p1.ndim == 1 else p1
    write_predictions_csv(root / "val_predictions.csv", [f"img{i}.png" for i in range(len(y))],
                          [classes[k] for k in y], probs, classes)
    return root


def _row(result: dict, metric: str) -> dict:
    return next(r for r in result["rows"] if r["metric"] == metric)


def test_paired_interval_finds_a_better_run_the_separate_intervals_cannot(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    noise = rng.normal(0, 1, 400)  # shared: the "hard images" both runs find hard
    a = _run(tmp_path / "a", y, 1 / (1 + np.exp(-(1.0 * (2 * y - 1) + noise))))
    b = _run(tmp_path / "b", y, 1 / (1 + np.exp(-(1.3 * (2 * y - 1) + noise))))
    res = compare_runs(a, b, n_boot=1000)
    auc = _row(res, "roc_auc")
    pa = 1 / (1 + np.exp(-(1.0 * (2 * y - 1) + noise)))
    assert auc["a"] == pytest.approx(roc_auc_score(y, pa))
    assert auc["verdict"] == "B better" and auc["ci"][0] > 0
    assert auc["ci"][0] <= auc["difference"] <= auc["ci"][1]
    acc = _row(res, "accuracy")
    assert acc["b"] - acc["a"] == pytest.approx(acc["difference"])
    # a run against itself: nothing to tell apart
    same = compare_runs(a, a, n_boot=200)
    assert all(r["difference"] == 0 and r["ci"] == [0.0, 0.0] for r in same["rows"])
    assert {r["verdict"] for r in same["rows"]} == {"within noise"}


def test_runs_are_aligned_by_path_and_use_their_own_threshold(tmp_path):
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.1, 0.25, 0.45, 0.8, 0.9, 0.2])
    a = _run(tmp_path / "a", y, p, threshold=0.5)
    b = _run(tmp_path / "b", y[::-1], p[::-1], threshold=0.3)  # same images, other order
    # rename b's rows so that b's img{i} is a's img{5 - i}: the same image, the same numbers
    text = (b / "val_predictions.csv").read_text().splitlines()
    rows = [text[0]] + [f"img{5 - i}.png," + ln.split(",", 1)[1]
                        for i, ln in enumerate(text[1:])]
    (b / "val_predictions.csv").write_text("\n".join(rows) + "\n")
    res = compare_runs(a, b, n_boot=100)
    assert _row(res, "roc_auc")["difference"] == 0
    # threshold 0.3 calls img2 (0.45) positive: one more correct, as a hand count says
    assert _row(res, "accuracy")["a"] == pytest.approx(5 / 6)
    assert _row(res, "accuracy")["b"] == pytest.approx(6 / 6)
    assert _row(res, "recall")["b"] == 1.0 and _row(res, "specificity")["b"] == 1.0


def test_multiclass_rows(tmp_path):
    classes = ["a", "b", "c"]
    y = np.array([0, 1, 2] * 10)
    good = np.eye(3)[y] * 0.8 + 0.2 / 3
    worse = good.copy()
    worse[:5] = np.eye(3)[(y[:5] + 1) % 3] * 0.8 + 0.2 / 3
    a = _run(tmp_path / "a", y, good, classes=classes, positive=None)
    b = _run(tmp_path / "b", y, worse, classes=classes, positive=None)
    res = compare_runs(a, b, n_boot=300)
    assert [r["metric"] for r in res["rows"]] == ["roc_auc", "accuracy", "balanced_accuracy"]
    assert _row(res, "accuracy")["difference"] == pytest.approx(-5 / 30)
    assert _row(res, "accuracy")["verdict"] == "B worse"


def test_other_images_or_labels_are_refused(tmp_path):
    y = np.array([0, 1, 0, 1])
    p = np.array([0.2, 0.7, 0.4, 0.9])
    a = _run(tmp_path / "a", y, p)
    with pytest.raises(CxrlabError, match="validated on other images"):
        compare_runs(a, _run(tmp_path / "b", np.array([0, 1, 0]), p[:3]))
    with pytest.raises(CxrlabError, match="other labels"):
        compare_runs(a, _run(tmp_path / "c", 1 - y, p))
    with pytest.raises(CxrlabError, match="classes or positive class differ"):
        compare_runs(a, _run(tmp_path / "d", y, p, positive=0))


def test_patients_from_split_csv_are_resampled_whole(tmp_path):
    # Each patient's image appears three times: the patient bootstrap must see 100 patients
    # and give the interval of the 100 originals, wider than 300 "independent" images give.
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    noise = rng.normal(0, 1, 100)
    pa = 1 / (1 + np.exp(-(1.0 * (2 * y - 1) + noise)))
    pb = 1 / (1 + np.exp(-(1.2 * (2 * y - 1) + noise)))
    a0, b0 = _run(tmp_path / "a0", y, pa), _run(tmp_path / "b0", y, pb)
    y3, pa3, pb3 = np.repeat(y, 3), np.repeat(pa, 3), np.repeat(pb, 3)
    a, b = _run(tmp_path / "a", y3, pa3), _run(tmp_path / "b", y3, pb3)
    with (a / "split.csv").open("w") as f:
        f.write("path,label,split,patient\n")
        for i, k in enumerate(y3):
            f.write(f"img{i}.png,{CLASSES[k]},val,patient{i // 3}\n")
    grouped, flat = compare_runs(a, b, n_boot=500), compare_runs(b, a, n_boot=500)
    originals = compare_runs(a0, b0, n_boot=500)
    assert grouped["interval_method"] == "paired patient bootstrap (100 patients)"
    assert flat["interval_method"] == "paired image bootstrap"  # b has no split.csv
    for metric in ("roc_auc", "accuracy"):
        lo, hi = _row(grouped, metric)["ci"]
        assert [lo, hi] == pytest.approx(_row(originals, metric)["ci"])
        flo, fhi = _row(flat, metric)["ci"]
        assert fhi - flo < 0.75 * (hi - lo), metric


def test_two_real_runs_from_the_cli(tmp_path, capsys, monkeypatch):
    from tests.test_cli import run_cli

    data = make_kermany_folder(tmp_path / "data", 12, 12, size=32)
    base = dict(data=str(data), model="cnn", image_size=32, batch_size=8, precision="fp32")
    ra = train_run(RunConfig.build({**base, "epochs": 1}), tmp_path / "a", progress=False)
    train_run(RunConfig.build({**base, "epochs": 3}), tmp_path / "b", progress=False)
    metrics_a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    n_patients = len({r["patient"] for r in read_split_csv(tmp_path / "a" / "split.csv")
                      if r["split"] == "val"})
    assert ra.n_val == 2 * n_patients  # make_kermany_folder: two images per patient
    assert metrics_a["interval_method"] == f"patient bootstrap ({n_patients} patients)"
    assert metrics_a["selection_biased"] == ("the threshold and the epoch were chosen on "
                                             "these images")
    out = tmp_path / "cmp.json"
    code, printed, err = run_cli(["compare", tmp_path / "a", tmp_path / "b", "--json", out,
                                  "--boot", "200"], capsys, monkeypatch)
    assert code == 0, err
    assert "ROC AUC" in printed and "paired resamples" in printed
    assert f"95% CI: paired patient bootstrap ({n_patients} patients)" in printed
    res = json.loads(out.read_text())
    assert res["n"] == ra.n_val
    assert res["interval_method"] == f"paired patient bootstrap ({n_patients} patients)"
    assert _row(res, "roc_auc")["a"] == pytest.approx(metrics_a["roc_auc"], abs=1e-5)
    assert _row(res, "accuracy")["a"] == pytest.approx(metrics_a["accuracy"], abs=1e-9)
    # evaluate on new data: patients read from the file names as the run's split read them
    evaluated = tmp_path / "eval.json"
    held = make_kermany_folder(tmp_path / "held", 12, 12, size=32, seed=1)  # not trained on
    code, printed, err = run_cli(["evaluate", tmp_path / "a", held, "--json", evaluated],
                                 capsys, monkeypatch)
    assert code == 0, err
    assert "95% CI: patient bootstrap (12 patients)" in " ".join(printed.split())
    assert json.loads(evaluated.read_text())["interval_method"] == \
        "patient bootstrap (12 patients)"
    code, _, err = run_cli(["compare", tmp_path / "a", tmp_path / "nope"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "nope" in err
