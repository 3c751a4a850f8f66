"""Crash and resume: a run killed with SIGKILL mid-epoch and resumed ends exactly like an
uninterrupted run with the same seed (metrics, history, weights)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import make_kermany_folder
from tests.test_cli import assert_user_error, run_cli

# dropout, augmentation, shuffling, plateau schedule and early stopping all carry state
RECIPE = ["--model", "cnn", "--image-size", "32", "--epochs", "3", "--batch-size", "8",
          "--augment", "notebook", "--schedule", "plateau", "--patience", "3", "--seed", "3",
          "--quiet"]

# Runs the real CLI, but the third epoch stops at its third batch and says so, to be killed
# there: a kill mid-epoch, every time, without timing guesses.
KILLABLE = """
import sys, time, pathlib
from cxrlab.training import loop as train
marker = pathlib.Path(sys.argv[1])
step = train.ClassifierModule.training_step
def stalling_step(self, batch, batch_idx):
    if self.current_epoch == 2 and batch_idx == 2:
        marker.write_text("epoch 3, batch 3")
        time.sleep(600)
    return step(self, batch, batch_idx)
train.ClassifierModule.training_step = stalling_step
from cxrlab.cli import main
sys.argv = ["cxrlab", *sys.argv[2:]]
main()
"""


def last_epoch(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"]


def history_without_timing(run: Path) -> list[dict]:
    with (run / "history.csv").open() as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def metrics_without_timing(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    m.pop("train_seconds")
    return m


def assert_same_run(a: Path, b: Path) -> None:
    assert history_without_timing(a) == history_without_timing(b)
    assert metrics_without_timing(a) == metrics_without_timing(b)
    assert (a / "threshold").read_text() == (b / "threshold").read_text()
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.timeout(240)
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, capsys, monkeypatch):
    data = make_kermany_folder(tmp_path / "data", 20, 20, size=32)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    marker = tmp_path / "stalled"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(marker), "train", str(data), "--out", str(killed),
         *RECIPE], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the run never reached its third epoch"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    # what a crash leaves: two epochs checkpointed, state still running
    assert json.loads((killed / "run.json").read_text())["state"] == "running"
    assert len(history_without_timing(killed)) == 2
    assert last_epoch(killed) == 1  # the second epoch's, improved on the first or not
    assert not (killed / "metrics.json").exists()

    code, _, err = run_cli(["train", "--resume", killed], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(["train", data, "--out", whole, *RECIPE], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((killed / "run.json").read_text())["state"] == "complete"
    assert_same_run(killed, whole)
    # a checkpoint after every epoch, whether or not it improved
    n_epochs = len(history_without_timing(whole))
    assert n_epochs >= 2
    assert last_epoch(whole) == n_epochs - 1

    # a complete run is not resumed again, nor continued to fewer epochs than it has (more:
    # tests/training/test_continue.py)
    code, _, err = run_cli(["train", "--resume", killed], capsys, monkeypatch)
    assert_user_error(code, err, "already complete")
    code, _, err = run_cli(["train", "--resume", whole, "--epochs", "2"], capsys, monkeypatch)
    assert_user_error(code, err, "--epochs", "--resume")


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["train", "--resume", tmp_path / "nope"], capsys, monkeypatch)
    assert_user_error(code, err, "not found")
    code, _, err = run_cli(["train", "--resume", tmp_path], capsys, monkeypatch)
    assert_user_error(code, err, "no run.json")
    code, _, err = run_cli(["train", str(tmp_path)], capsys, monkeypatch)
    assert_user_error(code, err, "--out")


def test_resume_refuses_any_given_value_the_run_does_not_have_zero_and_false_too(
        tmp_path, capsys, monkeypatch):
    """--seed 0, --no-class-weights and --label-smoothing 0 are values, refused like --seed 5
    when the run says otherwise (they used to be ignored as "not given"); the run's own values
    are accepted."""
    import cxrlab

    data = make_kermany_folder(tmp_path / "data", 8, 8, size=32)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", data, "--out", run, "--model", "cnn", "--image-size", "32",
                            "--epochs", "1", "--batch-size", "8", "--augment", "none",
                            "--seed", "1", "--label-smoothing", "0.1", "--quiet"],
                           capsys, monkeypatch)
    assert code == 0, err
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "state": "failed"}))  # to be resumed

    for given, needle in [(["--seed", "0"], "--seed"), (["--seed", "5"], "--seed"),
                          (["--no-class-weights"], "--class-weights"),
                          (["--label-smoothing", "0"], "--label-smoothing"),
                          (["--seed", "1", "--label-smoothing", "0"], "--label-smoothing")]:
        code, _, err = run_cli(["train", "--resume", run, *given], capsys, monkeypatch)
        assert_user_error(code, err, needle, "--resume")
    for given in ({"seed": 0}, {"class_weights": False}, {"label_smoothing": 0.0}):
        with pytest.raises(cxrlab.CxrlabError, match=f"{next(iter(given))}: resume continues"):
            cxrlab.train(resume=run, **given)
    assert json.loads((run / "run.json").read_text())["state"] == "failed"  # nothing touched

    code, _, err = run_cli(["train", "--resume", run, "--seed", "1", "--class-weights",
                            "--label-smoothing", "0.1", "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["state"] == "complete"
