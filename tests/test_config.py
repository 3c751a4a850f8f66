from __future__ import annotations

import pytest

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError


def test_round_trip(tmp_path):
    c = RunConfig.build({"data": "x", "model": "cnn", "epochs": 3, "augment": "notebook"})
    c.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == c


@pytest.mark.parametrize("bad, needle", [
    ({"epochs": 0}, "epochs"),
    ({"augment": "sideways"}, "augment"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"colour": 3}, "colour"),
    ({"image_col": "path"}, "label-col"),
])
def test_bad_values_name_the_option(bad, needle):
    with pytest.raises(CxrlabError, match=needle):
        RunConfig.build({"data": "x", **bad})


def test_balanced_sampler_turns_class_weights_off():
    c = RunConfig.build({"data": "x", "sampler": "balanced"})
    assert c.class_weights is False
    assert RunConfig.build({"data": "x", "sampler": "balanced", "class_weights": False}) == c


def test_class_weights_asked_for_are_not_dropped_by_the_sampler():
    # An explicit class_weights=True was silently turned off by sampler=balanced.
    with pytest.raises(CxrlabError) as e:
        RunConfig.build({"data": "x", "sampler": "balanced", "class_weights": True})
    assert "--class-weights and --sampler balanced" in str(e.value)
    assert "\n" not in str(e.value)
    c = RunConfig.build({"data": "x", "class_weights": True})
    with pytest.raises(CxrlabError, match="--sampler balanced"):
        RunConfig.build({**c.model_dump(), "sampler": "balanced"})


def test_load_errors(tmp_path):
    with pytest.raises(CxrlabError, match="not found"):
        RunConfig.load(tmp_path / "none.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(CxrlabError, match="mapping"):
        RunConfig.load(p)


@pytest.mark.parametrize("given, expect", [
    # (epochs, freeze_backbone, unfreeze_after, backbone_lr_mult, frozen_stages)
    ({}, (9, True, 1, 0.1, 4)),  # the default: packaged ImageNet weights, early stages kept
    ({"model": "resnet18"}, (14, False, None, 1.0, 0)),  # from scratch: everything trains
    ({"pretrained": "none"}, (14, False, None, 1.0, 0)),
    ({"model": "resnet18", "pretrained": "w.pth"}, (9, True, 1, 0.1, 3)),  # stem, layer1, 2
    ({"model": "vgg19", "pretrained": "w.pth"}, (9, True, 1, 0.1, 3)),
    ({"freeze_backbone": True}, (9, True, None, 0.1, 4)),  # frozen throughout
    ({"freeze_backbone": False}, (9, False, None, 0.1, 4)),  # everything from epoch 1
    ({"frozen_stages": 0}, (9, True, 1, 0.1, 0)),  # the user's word wins
    ({"unfreeze_after": 3, "backbone_lr_mult": 0.5, "epochs": 4}, (4, True, 3, 0.5, 4)),
])
def test_left_out_values_follow_where_the_weights_start(given, expect, tmp_path):
    c = RunConfig.build({"data": "x", **given})
    got = (c.epochs, c.freeze_backbone, c.unfreeze_after, c.backbone_lr_mult, c.frozen_stages)
    assert got == expect
    c.save(tmp_path / "config.yaml")  # a saved run names every value: it reloads unchanged
    assert RunConfig.load(tmp_path / "config.yaml") == c
    assert RunConfig.build({**c.model_dump(), "model": c.model}) == c


@pytest.mark.parametrize("args, needle", [
    (["--frozen-stages", "-1"], "--frozen-stages -1: Input should be greater than or equal to 0"),
    (["--val-fraction", "0.9"], "--val-fraction 0.9: Input should be less than or equal to 0.5"),
])
def test_a_bad_flag_is_named_as_typed(tmp_path, capsys, monkeypatch, args, needle):
    from tests.test_cli import assert_user_error, run_cli

    out = tmp_path / "run"
    code, _, err = run_cli(["train", tmp_path, "--out", out, *args, "--quiet"], capsys,
                           monkeypatch)
    assert_user_error(code, err, needle)
    assert not out.exists()
