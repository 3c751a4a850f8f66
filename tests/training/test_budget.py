"""Time budget: parsing, the pure planner with given timings, and real tiny runs planned by it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import yaml

from cxrlab.config import RunConfig, parse_budget
from cxrlab.errors import CxrlabError
from cxrlab.training.budget import (
    AUTO_SECONDS,
    Timings,
    plan_run,
    predict_seconds,
    remaining_seconds,
    resolve_budget,
)
from tests.conftest import make_kermany_folder
from tests.test_cli import assert_user_error, run_cli
from tests.training.test_resume import history_without_timing, metrics_without_timing

# the default recipe on a 2-core CPU without bf16: 130 steps, 1043 validation images
CPU = Timings(image_size=192, full_step=2.4, head_step=0.9, val_image=0.05,
              epoch_overhead=1.0, fixed=60.0)
RECIPE = dict(epochs=9, n_head=1, image_size=192, steps=130, n_val=1043)


# -- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, norm", [
    ("90s", "90s"), ("30m", "30m"), ("1.5h", "90m"), ("45", "45m"), ("2h", "2h"),
    ("none", "none"), ("AUTO", "auto"), (" 10 min ", "10m"), ("0.5", "30s"), (45, "45m"),
])
def test_parse_budget(text, norm):
    assert parse_budget(text) == norm


@pytest.mark.parametrize("text", ["abc", "", "-5m", "0", "10d", "5 m s", "inf"])
def test_parse_budget_rejects(text):
    with pytest.raises(CxrlabError, match="--time-budget"):
        parse_budget(text)


def test_config_normalises_and_rejects(tmp_path):
    cfg = RunConfig(data="x", time_budget=45)  # YAML `time_budget: 45` is an int
    assert cfg.time_budget == "45m"
    (tmp_path / "c.yaml").write_text("data: x\ntime_budget: soon\n")
    with pytest.raises(CxrlabError, match="time_budget"):
        RunConfig.load(tmp_path / "c.yaml")


def test_auto_resolves():
    assert RunConfig(data="x").time_budget == "auto"
    assert resolve_budget(RunConfig(data="x", accelerator="cpu")) == AUTO_SECONDS
    assert resolve_budget(RunConfig(data="x", accelerator="cpu", epochs=3)) is None
    assert resolve_budget(RunConfig(data="x", accelerator="cpu", epochs=3,
                                    time_budget="90s")) == 90
    assert resolve_budget(RunConfig(data="x", accelerator="cpu", time_budget="none")) is None
    # a saved config.yaml names every field: it is retrained as it is, never re-planned
    saved = RunConfig(**RunConfig(data="x", accelerator="cpu").model_dump())
    assert resolve_budget(saved) is None


# -- the planner --------------------------------------------------------------------------


def test_plan_keeps_everything_when_it_fits():
    p = plan_run(3 * 3600, CPU, **RECIPE)
    assert (p.epochs, p.image_size, p.head_epochs, p.fits) == (9, 192, 1, True)
    assert p.predicted_s == pytest.approx(predict_seconds(CPU, 9, 1, 130, 1043, 192))


def test_plan_cuts_epochs_and_keeps_head_epoch():
    full = predict_seconds(CPU, 9, 1, 130, 1043, 192)
    p = plan_run(0.6 * full, CPU, **RECIPE)
    assert p.fits and p.image_size == 192 and p.head_epochs == 1
    assert 3 <= p.epochs < 9
    assert p.predicted_s <= 0.6 * full
    assert predict_seconds(CPU, p.epochs + 1, 1, 130, 1043, 192) > 0.6 * full  # the most
    # time already spent counts against the budget
    later = plan_run(0.6 * full, CPU, **RECIPE, spent=0.2 * full)
    assert later.epochs < p.epochs


def test_plan_shrinks_images_quadratically_when_minimum_does_not_fit():
    minimum = predict_seconds(CPU, 3, 1, 130, 1043, 192)
    p = plan_run(0.7 * minimum, CPU, **RECIPE)
    assert p.fits and p.image_size < 192 and p.image_size % 32 == 0 and p.epochs >= 3
    scale = (p.image_size / 192) ** 2
    head = (130 * 0.9 + 1043 * 0.05) * scale + 1.0
    full = (130 * 2.4 + 1043 * 0.05) * scale + 1.0
    assert p.predicted_s == pytest.approx(head + (p.epochs - 1) * full + 60.0 * scale)
    assert p.predicted_s <= 0.7 * minimum


def test_plan_warns_when_nothing_fits():
    p = plan_run(1.0, CPU, **RECIPE)
    assert not p.fits
    assert (p.epochs, p.head_epochs, p.image_size) == (3, 1, 128)  # the minimum, smallest size
    small = plan_run(1.0, CPU, **{**RECIPE, "image_size": 32})
    assert (small.epochs, small.image_size) == (3, 32)  # never larger, floor not imposed


@pytest.mark.parametrize("epochs, n_head", [(1, 0), (2, 1), (5, 0), (4, 4), (9, 1)])
def test_plan_never_more_epochs_than_asked(epochs, n_head):
    for budget in (1.0, 1e3, 1e9):
        p = plan_run(budget, CPU, **{**RECIPE, "epochs": epochs, "n_head": n_head})
        assert 1 <= p.epochs <= epochs and p.image_size <= 192
        assert p.head_epochs == min(n_head, p.epochs)


def test_warmup_timing_counts_the_slow_calls():
    """A run's time is the sum of its steps: a slow one among them must count."""
    import torch

    from cxrlab.training.budget import _time

    delays = iter([0.0, 0.01, 0.01, 0.1, 0.01, 0.01])  # untimed first call, then 5
    seconds = _time(lambda: time.sleep(next(delays)), torch.device("cpu"), 5)
    assert 0.028 <= seconds < 0.06  # the mean (0.028); the median would say 0.01


def test_remaining_seconds():
    assert remaining_seconds([], 0, 9) is None
    assert remaining_seconds([], 0, 9, planned_epoch=10.0) == 90.0
    assert remaining_seconds([100.0, 300.0], 2, 5) == 900.0  # the latest (full) epoch's time
    assert remaining_seconds([100.0], 1, 5, current_fraction=0.5) == 350.0
    # a head-only epoch is no guide to the full ones: the plan's, then the first full one's
    assert remaining_seconds([20.0], 1, 5, planned_epoch=100.0, head_epochs=1) == 400.0
    assert remaining_seconds([20.0], 1, 5, head_epochs=1) is None
    assert remaining_seconds([20.0, 90.0], 2, 5, planned_epoch=100.0, head_epochs=1) == 270.0
    assert remaining_seconds([20.0], 1, 3, head_epochs=3) == 40.0  # frozen throughout


def test_progress_bar_eta():
    from types import SimpleNamespace

    from cxrlab.training.budget import RunProgressBar

    trainer = SimpleNamespace(current_epoch=0, max_epochs=3, num_training_batches=10,
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                                  batch_progress=SimpleNamespace(
                                      current=SimpleNamespace(completed=5)))))
    assert RunProgressBar(planned_end=123.0).run_end(trainer) == 123.0  # the plan, at first
    bar = RunProgressBar()
    assert bar.run_end(trainer) is None  # nothing to go on yet
    now = time.time()
    bar._t0 = now - 10  # half of the first epoch's batches in 10 s: 20 s an epoch
    assert bar.run_end(trainer) == pytest.approx(now + 50, abs=1)
    bar.durations, trainer.current_epoch, bar._t0 = [100.0], 1, now  # then the latest epoch
    assert bar.run_end(trainer) == pytest.approx(now + 200, abs=1)
    # after a head-only epoch (20 s): the plan's full epoch (100 s), not 20 s an epoch
    bar = RunProgressBar(planned_end=now + 300, planned_epoch=100.0, head_epochs=1)
    bar.durations, bar._t0 = [20.0], now
    assert bar.run_end(trainer) == pytest.approx(now + 200, abs=1)
    bar = RunProgressBar(head_epochs=1)  # no plan: the first full epoch's own pace
    bar.durations, bar._t0 = [20.0], now - 10  # half its batches in 10 s
    assert bar.run_end(trainer) == pytest.approx(now + 30, abs=1)


# -- real tiny runs -----------------------------------------------------------------------

TINY = ["--model", "cnn", "--image-size", "32", "--batch-size", "8", "--seed", "1", "--quiet"]


@pytest.fixture(scope="module")
def xray(tmp_path_factory) -> Path:
    return make_kermany_folder(tmp_path_factory.mktemp("budget") / "xray", 8, 8, size=32)


def test_tiny_budget_plans_fewer_epochs(xray, tmp_path, capsys, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="cxrlab")
    run = tmp_path / "run"
    code, _, err = run_cli(["train", xray, "--out", run, *TINY, "--epochs", "4",
                            "--time-budget", "1s"], capsys, monkeypatch)
    assert code == 0, err
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["epochs"] == 2 and cfg["time_budget"] == "none"  # retrains without planning
    plan = json.loads((run / "plan.json").read_text())
    assert plan["time_budget"] == "1s"
    assert plan["plan"]["epochs"] == 2 and plan["plan"]["asked_epochs"] == 4
    assert not plan["plan"]["fits"]
    text = " ".join(caplog.text.split())
    assert "time budget 1s: 2 of 4 epochs at 32 px" in text and "ending about" in text
    assert "will exceed its budget" in text
    assert text.count("the run is predicted to take") == 1  # the overrun warning, once
    assert resolve_budget(RunConfig.load(run / "config.yaml")) is None  # --config: no re-plan
    assert len(history_without_timing(run)) == 2


def test_warmup_does_not_change_the_run(xray, tmp_path, capsys, monkeypatch):
    args = [*TINY, "--epochs", "2", "--augment", "notebook"]
    a, b = tmp_path / "budget", tmp_path / "none"
    assert run_cli(["train", xray, "--out", a, *args, "--time-budget", "10h"],
                   capsys, monkeypatch)[0] == 0
    assert (a / "plan.json").is_file()
    assert run_cli(["train", xray, "--out", b, *args, "--time-budget", "none"],
                   capsys, monkeypatch)[0] == 0
    assert not (b / "plan.json").exists()
    assert history_without_timing(a) == history_without_timing(b)
    assert metrics_without_timing(a) == metrics_without_timing(b)


def test_bad_budget_is_one_line(xray, tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(["train", xray, "--out", tmp_path / "r", "--time-budget", "abc"],
                           capsys, monkeypatch)
    assert_user_error(code, err, "--time-budget abc")
    assert not (tmp_path / "r").exists()


def test_sweeps_are_never_budgeted():
    from cxrlab.evaluation.ablation import parse_spec, plan

    spec = {"base": {"data": "x", "model": "cnn", "accelerator": "cpu"},
            "factors": {"lr": [1e-3, 1e-4]}, "seeds": 1}
    assert all(resolve_budget(r.config) is None for r in plan(parse_spec(spec)))
    with pytest.raises(CxrlabError, match="base.time_budget"):
        parse_spec({**spec, "base": {**spec["base"], "time_budget": "30m"}})
    with pytest.raises(CxrlabError, match="time_budget"):
        parse_spec({**spec, "factors": {"time_budget": ["10m", "20m"]}})
