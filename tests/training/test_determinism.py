"""Same config and seed on the same machine: the same run, bit for bit (on CPU)."""

from __future__ import annotations

import pytest

from tests.conftest import make_kermany_folder
from tests.test_cli import run_cli
from tests.training.test_resume import assert_same_run, history_without_timing

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


def test_training_is_deterministic_without_the_nan_fill_and_restores_the_flags(
        tmp_path, capsys, monkeypatch):
    # Lightning's deterministic=True switches on deterministic algorithms for the whole
    # process, which also fills every new tensor with NaN (a sixth of a default epoch). cxrlab
    # trains deterministically without the fill and leaves the flags as they were.
    import torch
    import torch.utils.deterministic as tud

    from cxrlab.training.loop import ClassifierModule

    seen = []
    step = ClassifierModule.training_step

    def recording(self, batch, batch_idx):
        seen.append((torch.are_deterministic_algorithms_enabled(), tud.fill_uninitialized_memory))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ClassifierModule, "training_step", recording)
    monkeypatch.setattr(tud, "fill_uninitialized_memory", True)  # PyTorch's defaults, so
    torch.use_deterministic_algorithms(False)  # that the test sees them change
    data = make_kermany_folder(tmp_path / "data", 8, 8, size=32)
    code, _, err = run_cli(["train", data, "--out", tmp_path / "run", *RECIPE], capsys,
                           monkeypatch)
    assert code == 0, err
    assert seen and set(seen) == {(True, False)}
    assert not torch.are_deterministic_algorithms_enabled()
    assert tud.fill_uninitialized_memory is True


@pytest.mark.parametrize("model, augment", [("cnn", "notebook"),
                                            ("efficientnet_lite0", "intake")])
def test_the_nan_fill_changes_no_number(tmp_path, capsys, monkeypatch, model, augment):
    """No kernel a run uses reads memory it did not write: with PyTorch's NaN fill of every
    new tensor (what deterministic mode does by default) the run is the same, bit for bit."""
    from contextlib import contextmanager

    import torch.utils.deterministic as tud

    import cxrlab.training.loop

    data = make_kermany_folder(tmp_path / "data", 12, 12, size=32)
    recipe = [*RECIPE, "--model", model, "--augment", augment, "--no-pretrained"]
    code, _, err = run_cli(["train", data, "--out", tmp_path / "without", *recipe], capsys,
                           monkeypatch)
    assert code == 0, err

    @contextmanager
    def with_fill():  # what training did before: deterministic mode's default fill
        monkeypatch.setattr(tud, "fill_uninitialized_memory", True)
        yield

    monkeypatch.setattr(cxrlab.training.loop, "deterministic_without_nan_fill", with_fill)
    code, _, err = run_cli(["train", data, "--out", tmp_path / "with", *recipe], capsys,
                           monkeypatch)
    assert code == 0, err
    assert_same_run(tmp_path / "without", tmp_path / "with")
