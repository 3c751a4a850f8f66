"""Small sets: a pretrained recipe whose epochs would take too few optimizer steps trains the
head on frozen features for longer; an explicit --epochs, a chosen schedule, a from-scratch
recipe and a big set are left as they were."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import cxrlab
from cxrlab.config import RunConfig
from cxrlab.data.sources import load_source
from cxrlab.data.split import assign_splits
from cxrlab.training import small_sets
from cxrlab.training.small_sets import HEAD_EPOCHS, SMALL_STEPS, for_folds, small_set_recipe
from tests.conftest import make_kermany_folder
from tests.test_cli import run_cli


def recipe(**given) -> RunConfig:
    return RunConfig.build({"data": "x", **given})


def test_a_small_set_trains_a_frozen_backbone_s_head_and_says_why():
    chosen = small_set_recipe(recipe(), 201)  # covid19, one 1/5 validation split
    assert (chosen.steps_per_epoch, chosen.recipe_epochs, chosen.epochs, chosen.augment) == \
        (6, 9, HEAD_EPOCHS, "none")
    assert ("small set: 201 training images, 6 optimizer steps an epoch (the recipe's 9 "
            f"epochs: 54 steps, fewer than {SMALL_STEPS})") in chosen.reason
    cfg = small_sets.with_recipe(recipe(), chosen)
    assert (cfg.epochs, cfg.freeze_backbone, cfg.unfreeze_after, cfg.augment) == \
        (HEAD_EPOCHS, True, None, "none")
    assert chosen.to_dict()["reason"] == chosen.reason and chosen.to_dict()["frozen"]


def test_an_augmentation_asked_for_is_kept():
    chosen = small_set_recipe(recipe(augment="light"), 201)
    assert chosen.augment == "light" and "light augmentation" in chosen.reason
    assert small_sets.with_recipe(recipe(augment="light"), chosen).augment == "light"


def test_what_the_user_chose_is_kept():
    for given in ({"epochs": 9}, {"unfreeze_after": 2}, {"freeze_backbone": False},
                  {"wise_ft": 0.5}, {"model": "cnn"}):  # cnn: from scratch, not measured
        assert small_set_recipe(recipe(**given), 201) is None, given
    saved = RunConfig(**recipe().model_dump())  # a config.yaml names every field
    assert small_set_recipe(saved, 201) is None
    assert small_sets.with_recipe(recipe(), None) == recipe()


def test_a_big_set_is_unchanged():
    # Kermany's training split (4173 images): 130 steps an epoch, 9 epochs are 1170 steps
    assert small_set_recipe(recipe(), 4173) is None
    smallest = -(-SMALL_STEPS // 9) * 32  # the smallest set whose 9 epochs take SMALL_STEPS
    assert small_set_recipe(recipe(), smallest) is None
    assert small_set_recipe(recipe(), smallest - 32) is not None
    assert small_set_recipe(recipe(), 0).steps_per_epoch == 1  # never a division by zero


def test_kermany_keeps_the_recipe(shared_data):
    cfg = recipe(data=str(shared_data / "chest_xray" / "train"))
    split = assign_splits(load_source(cfg.data), cfg.val_fraction, cfg.seed)
    n_train = split.splits.count("train")
    assert n_train == 4173 and small_set_recipe(cfg, n_train) is None


def test_folds_share_the_smallest_fold_s_recipe(tmp_path):
    data = make_kermany_folder(tmp_path / "x", 30, 30, size=16, images_per_patient=1)
    chosen = for_folds(recipe(data=str(data), folds=3))
    assert chosen.n_train == 40 and chosen.steps_per_epoch == 1
    assert for_folds(recipe(data=str(data), folds=3, epochs=4)) is None


def twelve_demo_films(data: Path) -> Path:
    """6 NORMAL + 6 PNEUMONIA training films of the shipped demo set, copied to `data`."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (data / cls).mkdir(parents=True)
        for f in sorted((cxrlab.demo_data() / "train" / cls).iterdir())[:6]:
            shutil.copy(f, data / cls / f.name)
    return data


def test_a_tiny_run_trains_and_records_the_small_set_recipe(tmp_path, capsys, monkeypatch,
                                                            caplog):
    """The default recipe (pretrained EfficientNet-Lite0) on 12 demo images at 32 px: the
    head trains (a lowered) 3 epochs on the frozen backbone's features; run.json, plan.json
    and the log say so."""
    data = twelve_demo_films(tmp_path / "demo")
    monkeypatch.setattr(small_sets, "HEAD_EPOCHS", 3)
    caplog.set_level(logging.INFO, logger="cxrlab")
    run = tmp_path / "run"
    code, _, err = run_cli(["train", data, "--out", run, "--image-size", "32", "--batch-size",
                            "8", "--time-budget", "10h", "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    info = json.loads((run / "run.json").read_text())
    assert (info["small_set"]["epochs"], info["small_set"]["recipe_epochs"]) == (3, 9)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["small_set"] == info["small_set"]
    assert plan["plan"]["epochs"] == 3 and plan["plan"]["head_epochs"] == 3
    assert plan["timings"]["features_cached"]
    cfg = RunConfig.load(run / "config.yaml")
    assert (cfg.epochs, cfg.freeze_backbone, cfg.unfreeze_after, cfg.augment) == \
        (3, True, None, "none")
    assert small_set_recipe(cfg, info["small_set"]["n_train"]) is None  # --config: as saved
    assert info["small_set"]["reason"] in " ".join(caplog.text.split())


def test_a_tiny_cross_validation_trains_every_fold_frozen_and_keeps_why(tmp_path, capsys,
                                                                        monkeypatch):
    """2 folds of 12 demo images: one decision for both folds, in crossval.json, and still
    there after --resume (which reads the chosen recipe back from crossval.yaml)."""
    data = twelve_demo_films(tmp_path / "demo")
    monkeypatch.setattr(small_sets, "HEAD_EPOCHS", 2)
    out = tmp_path / "cv"
    args = ["--image-size", "32", "--batch-size", "4", "--quiet"]
    assert run_cli(["train", data, "--out", out, "--folds", "2", *args], capsys,
                   monkeypatch)[0] == 0
    chosen = json.loads((out / "crossval.json").read_text())["small_set"]
    assert chosen["epochs"] == 2 and chosen["n_train"] == 6
    for fold in ("fold-1", "fold-2"):
        cfg = RunConfig.load(out / fold / "config.yaml")
        assert (cfg.epochs, cfg.freeze_backbone, cfg.augment) == (2, True, "none")
    code, _, err = run_cli(["train", "--resume", out, "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads((out / "crossval.json").read_text())["small_set"] == chosen


def test_the_record_reads_back(tmp_path):
    from cxrlab.run import RunInfo, load_info, save_info

    info = RunInfo(["a", "b"], 1, 1, small_set=small_set_recipe(recipe(), 100).to_dict())
    save_info(Path(tmp_path), info)
    assert load_info(tmp_path).small_set == info.small_set
