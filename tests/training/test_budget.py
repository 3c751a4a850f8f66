"""Time budget: parsing, the pure planner with given timings, and real tiny runs planned by it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from cxrlab.config import RunConfig, parse_budget
from cxrlab.errors import CxrlabError
from cxrlab.training.budget import (
    AUTO_SECONDS,
    Timings,
    head_epochs,
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


def _fake_clock(seconds: list[float]):
    """(fn, clock): each call of fn takes the next of `seconds` on the clock."""
    now, it = [0.0], iter(seconds)

    def fn():
        now[0] += next(it)

    return fn, lambda: now[0]


def test_warmup_takes_the_best_timing_and_says_how_they_spread():
    """Other work only ever adds time: the fastest step is this machine's own speed."""
    import torch

    from cxrlab.training.budget import _time

    fn, clock = _fake_clock([9.0, 1.2, 5.0, 1.2, 1.3, 1.2])  # untimed first call, then 5
    best, spread = _time(fn, torch.device("cpu"), 5, clock=clock)
    assert best == pytest.approx(1.2) and spread == pytest.approx(5.0 / 1.2)


# the default recipe's steps on a CPU where its 9 epochs fit the automatic 30 minutes
QUIET = Timings(image_size=192, full_step=1.2, head_step=0.9, val_image=0.02,
                epoch_overhead=1.0, fixed=60.0)
BUSY_STEPS = [9.0, 1.2, 5.0, 1.2, 1.2, 1.2]  # one step shares the machine with something


def test_a_busy_warmup_step_plans_the_quiet_run():
    import torch

    from cxrlab.training.budget import _time, busy, describe, plan_for

    fn, clock = _fake_clock(BUSY_STEPS)
    best, spread = _time(fn, torch.device("cpu"), 5, clock=clock)
    seen = replace(QUIET, full_step=best, spread=spread)
    cfg = RunConfig(data="x", accelerator="cpu")  # the default recipe: 9 epochs, 1 head-only
    assert resolve_budget(cfg) == AUTO_SECONDS and (cfg.epochs, head_epochs(cfg)) == (9, 1)
    n = dict(n_train=4173, n_val=1043)
    quiet = plan_for(cfg, AUTO_SECONDS, QUIET, **n)
    plan = plan_for(cfg, AUTO_SECONDS, seen, **n)
    assert (plan.epochs, plan.image_size, plan.fits) == (quiet.epochs, quiet.image_size,
                                                        True) == (9, 192, True)
    assert plan.predicted_s == pytest.approx(quiet.predicted_s)
    # the mean of the same five steps (what the warm-up took before) cut the recipe
    mean = replace(QUIET, full_step=sum(BUSY_STEPS[1:]) / 5)
    assert plan_for(cfg, AUTO_SECONDS, mean, **n).epochs < 9
    # the plan line says the machine looked busy, and only then
    assert busy(seen) and not busy(QUIET)
    line = describe(plan, seen, time.time(), auto=True)
    assert "looked busy (the warm-up's step times spread 4.2x)" in line
    assert "the first full epoch decides" in line
    assert "busy" not in describe(quiet, QUIET, time.time(), auto=True)
    assert "busy" in describe(plan, replace(QUIET, load=3.0), time.time())  # load average


def test_a_busy_warmup_cuts_nothing_under_the_automatic_budget():
    """Even its best step too slow: a busy warm-up leaves the decision to the first epoch;
    an explicit budget (a deadline the user set) is planned from the warm-up as ever."""
    from cxrlab.training.budget import plan_for

    slow = replace(QUIET, full_step=3.0, spread=3.0)
    n = dict(n_train=4173, n_val=1043)
    auto = plan_for(RunConfig(data="x", accelerator="cpu"), AUTO_SECONDS, slow, **n)
    assert (auto.epochs, auto.image_size, auto.fits) == (9, 192, False)
    assert auto.budget_s == AUTO_SECONDS
    assert plan_for(RunConfig(data="x", accelerator="cpu", time_budget="30m"),
                    AUTO_SECONDS, slow, **n).epochs < 9
    assert plan_for(RunConfig(data="x", accelerator="cpu"), AUTO_SECONDS,
                    replace(slow, spread=1.0), **n).epochs < 9  # quiet and slow: planned


def test_recheck_after_the_first_full_epoch_cuts_only_when_it_must():
    from cxrlab.training.budget import recheck_epochs

    warmup = 60.0  # data preparation and warm-up
    plan = plan_run(AUTO_SECONDS, QUIET, **RECIPE, spent=warmup)
    assert plan.epochs == 9 and plan.head_epochs == 1
    head = predict_seconds(QUIET, 1, 1, 130, 1043, 192) - QUIET.fixed  # epoch 1, head-only
    full = plan.full_epoch_s  # epoch 2, the first full one, as the warm-up predicted it

    def after(epoch_s: float) -> tuple[int, float]:
        return recheck_epochs(plan, QUIET, warmup + head + epoch_s, epoch_s, done=2)

    assert after(full)[0] == 9  # as planned
    assert after(1.05 * full)[0] == 9  # slower, still inside the budget: nothing cut
    epochs, predicted = after(2 * full)  # twice as slow: the most that still fit
    assert 3 <= epochs < 9 and predicted <= AUTO_SECONDS
    one_more = warmup + head + 2 * full + QUIET.epoch_overhead + (epochs + 1 - 2) * (
        2 * full + QUIET.epoch_overhead) + QUIET.fixed
    assert one_more > AUTO_SECONDS
    assert after(100 * full)[0] == 3  # hopeless: the plan's minimum, 1 head-only + 2 full


# -- the feature cache ---------------------------------------------------------------------

# a frozen backbone without augmentation: the pooled features of the 4173 + 1043 images once
# (a backbone forward, 0.05 s an image), then the head on them (2 ms a step)
CACHED = Timings(image_size=192, full_step=0.0, head_step=0.002, val_image=0.05,
                 epoch_overhead=1.0, fixed=60.0, features_cached=True,
                 feature_pass=5216 * 0.05, cached_val_image=1e-5)
FROZEN = dict(epochs=30, n_head=30, image_size=192, steps=130, n_val=1043)


def test_plan_charges_cached_features_once():
    epoch = 130 * 0.002 + 1043 * 1e-5 + 1.0
    assert predict_seconds(CACHED, 30, 30, 130, 1043, 192) == pytest.approx(
        5216 * 0.05 + 30 * epoch + 60.0)
    # smaller images: the backbone pass and the final evaluation shrink, the head's steps not
    assert predict_seconds(CACHED, 30, 30, 130, 1043, 96) == pytest.approx(
        (5216 * 0.05 + 60.0) / 4 + 30 * epoch)
    p = plan_run(10 * 60, CACHED, **FROZEN)
    assert (p.epochs, p.image_size, p.fits) == (30, 192, True)
    assert p.full_epoch_s == pytest.approx(epoch)  # the ETA's epoch: head-only on features
    # a backbone forward per step of every epoch (what the plan charged) cut it to the least
    per_step = replace(CACHED, features_cached=False, feature_pass=0.0,
                       head_step=32 * 0.05 + 0.002)
    assert plan_run(10 * 60, per_step, **FROZEN).epochs == 3


def test_warmup_of_a_frozen_backbone_times_the_feature_cache(monkeypatch):
    """plan_config: the frozen, unaugmented run trains on cached features (as fit decides),
    and the plan charges what that costs (timings replaced by a fixed 1 s a call)."""
    from types import SimpleNamespace

    import numpy as np

    from cxrlab.models import create_model
    from cxrlab.training import budget
    from cxrlab.training.finetune import can_cache_features

    cfg = RunConfig(data="x", model="resnet18", image_size=32, batch_size=8, epochs=5,
                    freeze_backbone=True, augment="none", accelerator="cpu", precision="fp32",
                    time_budget="10m")
    model = create_model("resnet18", num_classes=1, in_chans=1, image_size=32)
    assert can_cache_features(model, cfg) and head_epochs(cfg) == 5
    timed = []

    def one_second(fn, device, repeats, clock=None):
        fn()
        timed.append(fn)
        return 1.0, 1.0

    monkeypatch.setattr(budget, "_time", one_second)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 1, 32, 32), dtype=np.uint8)
    splits = np.array(["train"] * 24 + ["val"] * 16)
    data = SimpleNamespace(splits=splits, subset=lambda s: (x[splits == s], None, None))
    started = time.time()
    planned, b = budget.plan_config(cfg, 600.0, model, data, started)
    t = b.timings
    assert t.features_cached and t.full_step == 0.0  # no full step: it never trains one
    assert t.feature_pass == pytest.approx(1.0 / 16 * 40)  # a 16-image pass: 40 images once
    assert (t.head_step, t.cached_val_image, t.val_image) == (1.0, 1.0 / 16, 1.0 / 16)
    epoch = 3 * 1.0 + 16 / 16 + 2.0  # 3 head steps on features, validation, 2 checkpoints
    fixed = 10.0 + 2.0 + 16 / 16  # plots and metrics, model.pt, final validation forward
    spent = b.plan.predicted_s - (40 / 16 + 5 * epoch + fixed)  # the warm-up's own seconds
    assert 0 <= spent <= time.time() - started
    assert (planned.epochs, b.plan.epochs) == (5, 5)


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


def test_progress_bar_reads_as_people_do(monkeypatch):
    """'run: ends in 4m12s, ~03:58' (a duration and a clock time, not a bare clock time that
    reads like one), and epochs counted from 1 as in the plots and logs."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import RichProgressBar

    from cxrlab.training.budget import RunProgressBar, _duration

    assert [_duration(s) for s in (-3, 45.4, 252, 3600 + 5 * 60 + 40)] == [
        "0s", "45s", "4m12s", "1h05m"]
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, trainer, module: {})
    end = time.time() + 252.4
    bar = RunProgressBar(planned_end=end)
    shown = bar.get_metrics(SimpleNamespace(current_epoch=0, max_epochs=9), None)["run"]
    assert shown in (f"ends in {d}, ~{time.strftime('%H:%M', time.localtime(end))}"
                     for d in ("4m12s", "4m11s"))
    bar._trainer = SimpleNamespace(max_epochs=9)
    assert bar._get_train_description(0).strip() == "Epoch 1/9"
    assert bar._get_train_description(8).strip() == "Epoch 9/9"


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


def test_recheck_cuts_a_run_that_resumes_as_it_was_cut(xray, tmp_path, capsys, monkeypatch,
                                                       caplog):
    """The first epoch as if it took 500 s of a 30-minute budget: 5 planned epochs become 3
    (the cosine schedule re-aimed at epoch 3, config.yaml and plan.json saying so), and a run
    killed after the cut resumes to exactly the same end."""
    from cxrlab.training import budget
    from cxrlab.training import loop as training
    from tests.training.test_resume import assert_same_run

    real = budget.recheck_epochs
    monkeypatch.setattr(budget, "recheck_epochs", lambda plan, t, elapsed, epoch_s, done:
                        real(plan, t, elapsed - epoch_s + 500.0, 500.0, done))
    caplog.set_level(logging.INFO, logger="cxrlab")
    args = [*TINY, "--epochs", "5", "--time-budget", "30m", "--augment", "notebook"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    code, _, err = run_cli(["train", xray, "--out", whole, *args], capsys, monkeypatch)
    assert code == 0, err
    plan = json.loads((whole / "plan.json").read_text())
    assert plan["plan"]["epochs"] == 5  # the warm-up's plan, then the first epoch's word
    assert plan["recheck"]["after_epoch"] == 1 and plan["recheck"]["epochs"] == 3
    assert yaml.safe_load((whole / "config.yaml").read_text())["epochs"] == 3
    assert "cut to 3 of 5 epochs" in " ".join(caplog.text.split())
    history = history_without_timing(whole)
    assert len(history) == 3
    assert float(history[-1]["lr"]) == pytest.approx(0.0, abs=1e-12)  # the cosine's end

    step = training.ClassifierModule.training_step

    def dies_in_epoch_3(self, batch, batch_idx):
        if self.current_epoch == 2:
            raise RuntimeError("killed")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(training.ClassifierModule, "training_step", dies_in_epoch_3)
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(["train", xray, "--out", killed, *args], capsys, monkeypatch)
    assert len(history_without_timing(killed)) == 2
    assert yaml.safe_load((killed / "config.yaml").read_text())["epochs"] == 3
    monkeypatch.setattr(training.ClassifierModule, "training_step", step)
    code, _, err = run_cli(["train", "--resume", killed], capsys, monkeypatch)
    assert code == 0, err
    assert_same_run(killed, whole)
