"""Same config and seed on the same machine: the same run, bit for bit (on CPU)."""

from __future__ import annotations

from tests.conftest import make_kermany_folder
from tests.test_cli import run_cli
from tests.test_resume import assert_same_run, history_without_timing

RECIPE = ["--model", "cnn", "--image-size", "32", "--epochs", "2", "--batch-size", "8",
          "--augment", "notebook", "--seed", "11", "--quiet"]


def test_two_runs_with_one_seed_are_identical(tmp_path, capsys, monkeypatch):
    data = make_kermany_folder(tmp_path / "data", 16, 16, size=32)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        code, _, err = run_cli(["train", data, "--out", run, *RECIPE], capsys, monkeypatch)
        assert code == 0, err
    assert len(history_without_timing(runs[0])) == 2
    assert_same_run(*runs)  # history, metrics, threshold and every weight
