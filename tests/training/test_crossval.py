"""cxrlab.training.crossval and `cxrlab train --folds`: real tiny runs, pooled figures checked
by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError
from cxrlab.training.crossval import fold_dir, pool, render, run_crossval
from tests.conftest import make_kermany_folder
from tests.test_cli import run_cli

BASE = dict(model="cnn", image_size=32, epochs=1, batch_size=8, precision="fp32")


@pytest.fixture(scope="module")
def three_folds(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("cv")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRLAB_CACHE", str(root / "cache"))
        data = make_kermany_folder(root / "data", 12, 18, size=32)
        cfg = RunConfig.build({"data": str(data), "folds": 3, **BASE})
        out = root / "cv"
        result = run_crossval(cfg, out, progress=False)
    return data, out, result


def _val_rows(run: Path) -> list[dict]:
    with (run / "split.csv").open() as f:
        return [r for r in csv.DictReader(f) if r["split"] == "val"]


def test_folds_are_ordinary_runs_that_validate_every_image_once(three_folds):
    data, out, result = three_folds
    vals = [{r["path"] for r in _val_rows(fold_dir(out, k))} for k in (1, 2, 3)]
    assert sum(map(len, vals)) == 30 and len(set().union(*vals)) == 30
    patients = [{r["patient"] for r in _val_rows(fold_dir(out, k))} for k in (1, 2, 3)]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
    for k in (1, 2, 3):
        saved = yaml.safe_load((fold_dir(out, k) / "config.yaml").read_text())
        assert saved["folds"] == 3 and saved["fold"] == k
        assert json.loads((fold_dir(out, k) / "run.json").read_text())["state"] == "complete"
    assert json.loads((out / "crossval.json").read_text()) == result


def test_pooled_figures_by_hand(three_folds):
    _, out, result = three_folds
    y, pred, accs = [], [], []
    thresholds = [json.loads((fold_dir(out, k) / "metrics.json").read_text())["threshold"]
                  for k in (1, 2, 3)]
    for k in (1, 2, 3):
        run = fold_dir(out, k)
        with (run / "val_predictions.csv").open() as f:
            rows = list(csv.DictReader(f))
        yk = [r["label"] == "PNEUMONIA" for r in rows]
        own = [float(r["p_PNEUMONIA"]) >= thresholds[k - 1] for r in rows]
        others = float(np.median([t for j, t in enumerate(thresholds) if j != k - 1]))
        assert result["per_fold"][k - 1]["pooled_threshold"] == pytest.approx(others)
        y += yk
        pred += [float(r["p_PNEUMONIA"]) >= others for r in rows]
        accs.append(np.mean(np.array(yk) == np.array(own)))
        assert result["per_fold"][k - 1]["accuracy"] == pytest.approx(accs[-1])
    y, pred = np.array(y), np.array(pred)
    p = result["pooled"]
    assert p["n"] == 30 and p["correct"] == int((y == pred).sum())
    assert p["confusion_matrix"] == [[int((~y & ~pred).sum()), int((~y & pred).sum())],
                                     [int((y & ~pred).sum()), int((y & pred).sum())]]
    assert p["recall"]["PNEUMONIA"] == pytest.approx((y & pred).sum() / y.sum())
    assert p["accuracy_ci"][0] <= p["accuracy"] <= p["accuracy_ci"][1]
    n_patients = len({r["patient"] for k in (1, 2, 3) for r in _val_rows(fold_dir(out, k))})
    assert p["accuracy_ci_method"] == f"patient bootstrap ({n_patients} patients)"
    mean = result["fold_mean"]["accuracy"]
    assert mean["n"] == 3 and mean["mean"] == pytest.approx(np.mean(accs))
    assert 0.0 <= mean["ci_low"] <= mean["mean"] <= mean["ci_high"] <= 1.0


def _fold(out: Path, k: int, y: list[int], p: list[float], threshold: float,
          patients: list[str] | None = None) -> None:
    """A finished fold's files as the pipeline writes them (predictions chosen by the test;
    with `patients`, a split.csv naming each validation image's patient)."""
    from cxrlab.run import RunInfo, save_info, write_predictions_csv, write_threshold

    run = fold_dir(out, k)
    run.mkdir(parents=True)
    save_info(run, RunInfo(["NORMAL", "PNEUMONIA"], 1, 1, state="complete"))
    (run / "metrics.json").write_text(json.dumps({"threshold": threshold, "accuracy": None,
                                                  "roc_auc": None, "epochs": 1}))
    write_threshold(run, threshold)
    write_predictions_csv(run / "val_predictions.csv", [f"f{k}-{i}.png" for i in range(len(y))],
                          [["NORMAL", "PNEUMONIA"][c] for c in y],
                          np.c_[1 - np.array(p), p], ["NORMAL", "PNEUMONIA"])
    if patients is not None:
        with (run / "split.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "split", "patient"])
            w.writerows([f"f{k}-{i}.png", ["NORMAL", "PNEUMONIA"][c], "val", patients[i]]
                        for i, c in enumerate(y))


def test_pooled_decisions_use_thresholds_not_chosen_on_the_fold(tmp_path, capsys):
    # Each fold's own threshold separates its images perfectly (it was fitted to them); the
    # pooled decisions must instead use the median of the other folds' thresholds.
    y = [0, 0, 1, 1]
    _fold(tmp_path, 1, y, [0.10, 0.15, 0.25, 0.30], threshold=0.2)
    _fold(tmp_path, 2, y, [0.40, 0.45, 0.55, 0.60], threshold=0.5)
    _fold(tmp_path, 3, y, [0.70, 0.75, 0.85, 0.90], threshold=0.8)
    result = pool(tmp_path, 3)
    assert [f["pooled_threshold"] for f in result["per_fold"]] == [0.65, 0.5, 0.35]
    # fold 1 at 0.65: all negative; fold 2 at 0.5: right; fold 3 at 0.35: all positive
    assert result["pooled"]["confusion_matrix"] == [[2 + 2 + 0, 0 + 0 + 2], [2 + 0 + 0, 0 + 2 + 2]]
    assert result["pooled"]["correct"] == 8  # own thresholds would have made it 12 of 12
    assert "median of the other folds' thresholds" in result["pooled"]["decisions"]
    from rich.console import Console

    console = Console(record=True, width=140)
    render(result, console)
    text = console.export_text()
    assert "pooled at" in text and "0.650" in text and "median of the other folds'" in text


def test_pooled_accuracy_interval_resamples_patients_not_images(tmp_path):
    # 4 patients of 10 films each, 2 folds: each patient's films all right or all wrong. The
    # 40 films are 4 observations, not 40: a Wilson interval over images would be far too
    # narrow; the patient bootstrap can only land on 0, 1/4, .., 1.
    from scipy.stats import binomtest

    right, wrong = [0.1] * 5 + [0.9] * 5, [0.9] * 5 + [0.1] * 5
    y = [0] * 5 + [1] * 5
    for k, probs in ((1, right + wrong), (2, right + wrong)):
        _fold(tmp_path / "patients", k, y + y, probs, threshold=0.5,
              patients=[f"p{k}a"] * 10 + [f"p{k}b"] * 10)
        _fold(tmp_path / "images", k, y + y, probs, threshold=0.5)
    grouped, flat = pool(tmp_path / "patients", 2), pool(tmp_path / "images", 2)
    assert grouped["pooled"]["accuracy"] == flat["pooled"]["accuracy"] == 0.5
    assert grouped["pooled"]["accuracy_ci_method"] == "patient bootstrap (4 patients)"
    lo, hi = grouped["pooled"]["accuracy_ci"]
    assert lo in (0.0, 0.25) and hi in (0.75, 1.0)
    wilson = binomtest(20, 40).proportion_ci(0.95, method="wilson")
    assert flat["pooled"]["accuracy_ci"] == pytest.approx([wilson.low, wilson.high])
    assert "Wilson" in flat["pooled"]["accuracy_ci_method"]
    assert hi - lo > 2 * (wilson.high - wilson.low)


def test_continuing_keeps_finished_folds_and_sets_aside_a_killed_one(three_folds, tmp_path):
    _, out, result = three_folds
    import shutil

    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    kept = (fold_dir(copy, 1) / "model.pt").stat().st_mtime_ns
    # fold 3 as a kill before its first checkpoint leaves it: running, no model, no checkpoint
    info = json.loads((fold_dir(copy, 3) / "run.json").read_text())
    (fold_dir(copy, 3) / "run.json").write_text(json.dumps({**info, "state": "running"}))
    shutil.rmtree(fold_dir(copy, 3) / "checkpoints", ignore_errors=True)
    events = []
    cfg = RunConfig.load(copy / "crossval.yaml")
    again = run_crossval(cfg, copy, progress=False, on_fold=lambda i, w: events.append((i, w)))
    assert (fold_dir(copy, 1) / "model.pt").stat().st_mtime_ns == kept
    assert events[0] == (1, "complete: kept") and events[1] == (2, "complete: kept")
    assert events[2][1].startswith("set aside as fold-3.failed-") and events[3] == (3, "training")
    assert len(list(copy.glob("fold-3.failed-*"))) == 1  # nothing a user made is lost
    assert again["pooled"]["n"] == 30
    assert again["per_fold"][:2] == result["per_fold"][:2]
    with pytest.raises(CxrlabError, match="another configuration"):
        run_crossval(RunConfig.build({**cfg.model_dump(), "epochs": 2}), copy, progress=False)


def test_overlapping_folds_are_refused(three_folds, tmp_path):
    import shutil

    _, out, _ = three_folds
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    shutil.copy(fold_dir(copy, 1) / "val_predictions.csv", fold_dir(copy, 2))
    with pytest.raises(CxrlabError, match="validated in fold 1 and fold 2"):
        pool(copy, 3)


def test_cli_folds_prints_the_table_and_resumes(tmp_path, capsys, monkeypatch):
    data = make_kermany_folder(tmp_path / "data", 10, 10, size=32)
    out = tmp_path / "cv"
    fast = ["--model", "cnn", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
            "--precision", "fp32", "--quiet"]
    code, so, err = run_cli(["train", data, "--out", out, "--folds", "2", *fast], capsys,
                         monkeypatch)
    assert code == 0, err
    assert "Cross-validation, 2 folds" in so and "Pooled out-of-fold: " in so
    assert "/20 correct" in so and "true \\ predicted" in so
    code, so, err = run_cli(["train", "--resume", out], capsys, monkeypatch)
    assert code == 0 and "/20 correct" in so, err  # every fold complete: pooled again, kept
    code, _, err = run_cli(["train", data, "--out", tmp_path / "x", "--folds", "1", *fast], capsys,
                        monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "folds" in err
    assert not (tmp_path / "x").exists()
    code, _, err = run_cli(["train", data, "--out", tmp_path / "y", "--folds", "11", *fast], capsys,
                        monkeypatch)
    assert code == 2 and "--folds 11" in err and "only 10 patients" in err, err
    assert not (tmp_path / "y").exists()  # refused before anything is written


def test_budgeted_folds_train_one_plan_and_continue(tmp_path, monkeypatch):
    """--folds K --time-budget: fold 1 plans once, for a K-th of the budget; every fold trains
    that plan (a second warm-up here would find a slower machine and plan fewer epochs), and
    continuing finds the planned folds complete instead of stopping at fold 1."""
    from cxrlab.training import budget
    from cxrlab.training.budget import Timings

    monkeypatch.setenv("CXRLAB_CACHE", str(tmp_path / "cache"))
    warmups = []

    def warm_up(model, config, train_x, val_x, n_head, repeats=5, cached=False):
        warmups.append(config.fold)
        step = 1e-4 if len(warmups) == 1 else 1000.0
        return Timings(config.image_size, step, 0.0, 1e-5)

    monkeypatch.setattr(budget, "measure", warm_up)
    data = make_kermany_folder(tmp_path / "data", 10, 10, size=32)
    cfg = RunConfig.build({"data": str(data), "folds": 2, **BASE, "epochs": 4,
                           "time_budget": "20m"})
    out = tmp_path / "cv"
    run_crossval(cfg, out, progress=False)
    assert warmups == [1]
    plan = json.loads((fold_dir(out, 1) / "plan.json").read_text())
    assert plan["time_budget"] == "10m" and plan["plan"]["epochs"] == 4  # its share
    assert not (fold_dir(out, 2) / "plan.json").exists()
    saved = [yaml.safe_load((fold_dir(out, k) / "config.yaml").read_text()) for k in (1, 2)]
    assert saved[0]["epochs"] == saved[1]["epochs"] == 4
    assert saved[0]["time_budget"] == saved[1]["time_budget"] == "none"
    assert {**saved[0], "fold": 0} == {**saved[1], "fold": 0}  # one recipe
    events = []
    again = RunConfig.load(out / "crossval.yaml")
    run_crossval(again, out, progress=False, on_fold=lambda i, w: events.append((i, w)))
    assert events == [(1, "complete: kept"), (2, "complete: kept")]
    # a fold killed before its first checkpoint is retrained with the plan, not re-planned
    info = json.loads((fold_dir(out, 2) / "run.json").read_text())
    (fold_dir(out, 2) / "run.json").write_text(json.dumps({**info, "state": "running"}))
    import shutil

    shutil.rmtree(fold_dir(out, 2) / "checkpoints")
    run_crossval(again, out, progress=False)
    assert warmups == [1]
    assert yaml.safe_load((fold_dir(out, 2) / "config.yaml").read_text()) == saved[1]
