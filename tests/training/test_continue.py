"""Keep training a complete run (`train --resume RUN --epochs N`, `Run.fit`): epochs go on
counting, the previous result is kept, a killed continuation resumes to the same end, the
continued config.yaml retrains to the same run, and every refusal leaves the run untouched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cxrlab.config import RunConfig
from cxrlab.training.optim import cosine_schedule
from cxrlab.training.restarts import restarted_cosine
from tests.conftest import make_kermany_folder
from tests.test_cli import assert_user_error, run_cli
from tests.training.test_resume import KILLABLE, history_without_timing, metrics_without_timing

TINY = ["--model", "cnn", "--image-size", "32", "--batch-size", "8", "--seed", "3", "--quiet"]


def train(data: Path, out: Path, capsys, monkeypatch, *args: str) -> None:
    code, _, err = run_cli(["train", data, "--out", out, *TINY, *args], capsys, monkeypatch)
    assert code == 0, err


def files(run: Path) -> dict[str, bytes]:
    """Every file of the run, by relative path (the lock file aside)."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def assert_same_weights(a: Path, b: Path) -> None:
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_restarted_cosine_is_the_cosine_until_a_continuation_then_a_new_one():
    plain = RunConfig.build({"data": "x", "model": "cnn", "epochs": 3})
    f = restarted_cosine(30, plain)
    assert [f(s) for s in range(30)] == [cosine_schedule(30)(s) for s in range(30)]
    cont = RunConfig.build({"data": "x", "model": "cnn", "epochs": 5,
                            "continued": [{"at_epoch": 2, "epochs_before": 3}]})
    g = restarted_cosine(50, cont)  # 10 steps an epoch
    assert [g(s) for s in range(20)] == [cosine_schedule(30)(s) for s in range(20)]
    assert [g(s) for s in range(20, 50)] == [cosine_schedule(30)(s) for s in range(30)]
    assert g(19) < g(20) == 1.0  # from where the first cosine was cut back to the full rate


def test_early_stopping_state_restores_from_checkpoints_of_lightnings_own():
    from lightning.pytorch.callbacks import EarlyStopping

    from cxrlab.training.restarts import RestartingEarlyStopping

    ours = RestartingEarlyStopping([9], monitor="val_loss", mode="min")
    assert ours.state_key == EarlyStopping(monitor="val_loss", mode="min").state_key


@pytest.mark.timeout(600)
def test_continued_run_killed_midway_resumes_to_what_its_config_retrains(
        tmp_path, capsys, monkeypatch):
    data = make_kermany_folder(tmp_path / "data", 16, 16, size=32)
    run, fresh = tmp_path / "run", tmp_path / "fresh"
    train(data, run, capsys, monkeypatch, "--epochs", "1", "--augment", "light")
    before = files(run)

    # continue to 3 epochs; killed in the third (at its third batch), then resumed
    marker = tmp_path / "stalled"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(marker), "train", "--resume", str(run),
         "--epochs", "3", "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 200
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the continuation never reached epoch 3"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((run / "run.json").read_text())["state"] == "running"
    assert (run / "model.pt").read_bytes() == before["model.pt"]  # not replaced yet
    previous = run / "previous" / "epochs-1"  # the result before, a complete run of its own
    assert {k: v for k, v in files(previous).items()} == {
        k: v for k, v in before.items() if "/" not in k}

    code, _, err = run_cli(["train", "--resume", run], capsys, monkeypatch)
    assert code == 0, err
    assert [r["epoch"] for r in history_without_timing(run)] == ["1", "2", "3"]
    assert history_without_timing(run)[0] == history_without_timing(previous)[0]
    config = RunConfig.load(run / "config.yaml")
    assert config.epochs == 3 and config.continued[0].at_epoch == 1
    assert metrics_without_timing(run)["epochs"] == 3

    # the continued config.yaml, trained afresh in one go, is the same run
    code, _, err = run_cli(["train", "--config", run / "config.yaml", "--out", fresh, "--quiet"],
                           capsys, monkeypatch)
    assert code == 0, err
    # history's lr is the rate for the next step: at epoch 1's end the continued run recorded
    # where its first cosine was heading (0), the fresh run the restart's first rate
    a, b = history_without_timing(run), history_without_timing(fresh)
    assert float(a[0].pop("lr")) == 0.0 and float(b[0].pop("lr")) > 0.0
    assert a == b
    assert metrics_without_timing(run) == metrics_without_timing(fresh)
    assert (run / "threshold").read_text() == (fresh / "threshold").read_text()
    assert_same_weights(run, fresh)
    # model.pt: the best epoch of all three (lowest val loss), the old one if it stays best
    losses = [float(r["val_loss"]) for r in history_without_timing(run)]
    still_first = losses.index(min(losses)) == 0
    assert ((run / "model.pt").read_bytes() == before["model.pt"]) == still_first


@pytest.mark.timeout(240)
def test_fit_without_a_schedule_equals_the_longer_run(tmp_path):
    """Run.fit(epochs=1) on a 1-epoch run equals a 2-epoch run (constant lr: nothing
    restarts), and the Run it returns is the longer run."""
    import cxrlab

    data = make_kermany_folder(tmp_path / "data", 16, 16, size=32)
    opts = dict(model="cnn", image_size=32, batch_size=8, seed=3, schedule="none",
                augment="flip")
    short = cxrlab.train(data, tmp_path / "short", epochs=1, **opts)
    whole = cxrlab.train(data, tmp_path / "whole", epochs=2, **opts)
    assert short.fit(epochs=1) is short
    assert len(short.history) == 2 and short.metrics["epochs"] == 2
    assert metrics_without_timing(short.path) == metrics_without_timing(whole.path)
    assert_same_weights(short.path, whole.path)
    assert cxrlab.load(short.path / "previous" / "epochs-1").metrics["epochs"] == 1


@pytest.mark.timeout(240)
def test_refusals_leave_the_run_untouched(tmp_path, capsys, monkeypatch):
    import cxrlab

    data = make_kermany_folder(tmp_path / "data", 8, 8, size=32)
    run = tmp_path / "run"
    train(data, run, capsys, monkeypatch, "--epochs", "2", "--augment", "none")
    before = files(run)

    for args, needles in [
        (["--epochs", "2"], ["--epochs 2", "trained 2 epochs"]),  # not more than done
        (["--epochs", "1"], ["--epochs 1", "more than 2"]),
        (["--epochs", "4", "--lr", "0.01"], ["--lr", "--resume"]),  # another recipe option
        (["--epochs", "4", "--out", tmp_path / "x"], ["--out", "--resume"]),
        ([], ["already complete", "--epochs N"]),
    ]:
        code, _, err = run_cli(["train", "--resume", run, *args], capsys, monkeypatch)
        assert_user_error(code, err, *needles)
    with pytest.raises(cxrlab.CxrlabError, match="whole number"):
        cxrlab.load(run).fit(epochs=0)
    # other images than the run was trained on: refused once they are read, still untouched
    make_kermany_folder(data, 9, 8, size=32, seed=1)
    code, _, err = run_cli(["train", "--resume", run, "--epochs", "3"], capsys, monkeypatch)
    assert_user_error(code, err, "differ")
    assert files(run) == before

    # a cross-validation's folder
    cv = tmp_path / "cv"
    cv.mkdir()
    from cxrlab.training.crossval import CONFIG_FILE

    RunConfig.build({"data": str(data), "model": "cnn", "epochs": 2, "folds": 2}).save(
        cv / CONFIG_FILE)
    cv_before = files(cv)
    code, _, err = run_cli(["train", "--resume", cv, "--epochs", "4"], capsys, monkeypatch)
    assert_user_error(code, err, "cross-validation")
    assert files(cv) == cv_before


@pytest.mark.timeout(240)
def test_head_only_run_on_cached_features_continues(tmp_path):
    """A frozen backbone without augmentation trains its head on pooled features cached once;
    continued, it caches them again from the same weights and ends as the longer run."""
    import cxrlab

    data = make_kermany_folder(tmp_path / "data", 8, 8, size=32)
    opts = dict(model="resnet18", pretrained="none", image_size=32, batch_size=8, seed=1,
                schedule="none", augment="none", freeze_backbone=True)
    short = cxrlab.train(data, tmp_path / "short", epochs=1, **opts)
    whole = cxrlab.train(data, tmp_path / "whole", epochs=2, **opts)
    short.fit(epochs=1)
    assert [r["epoch"] for r in short.history] == [1, 2]
    assert metrics_without_timing(short.path) == metrics_without_timing(whole.path)
    assert_same_weights(short.path, whole.path)
