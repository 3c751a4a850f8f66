"""Fine-tuning: a frozen backbone stays frozen (weights and BN statistics), unfreezing happens
at the epoch with the lower backbone learning rate, the feature cache trains the same head,
and more than two classes work end to end through the CLI."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cxrlab.config import RunConfig
from cxrlab.models import create_model
from cxrlab.training.finetune import head_parameters
from cxrlab.training.loop import fit
from tests.test_cli import run_cli


def tiny_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(90, 20, (n, 1, 32, 32))
    x[y == 1, :, 8:20, 8:20] += 100
    return x.clip(0, 255).astype(np.uint8), y


def run_fit(tmp_path, name: str, model=None, cache: bool = True, **options):
    tx, ty = tiny_arrays(24, 0)
    vx, vy = tiny_arrays(8, 1)
    cfg = RunConfig.build(dict(data="unused", model="resnet18", image_size=32, batch_size=8,
                               precision="fp32", patience=10, **options))
    torch.manual_seed(0)
    model = model or create_model("resnet18", num_classes=1, in_chans=1, head=cfg.head)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (tmp_path / name).mkdir()
    res = fit(model, cfg, tx, ty, vx, vy, 2, 1, tmp_path / name, progress=False,
              cache_features=cache)
    return before, res


def backbone_keys(model) -> list[str]:
    head = tuple(f"{n}." for n in model.trainable_head_names())
    return [k for k in model.state_dict() if not k.startswith(head)]


def test_frozen_backbone_keeps_weights_and_bn_statistics(tmp_path):
    # augmentation on: no feature cache, the backbone really runs every batch
    before, res = run_fit(tmp_path, "frozen", epochs=2, freeze_backbone=True, augment="light")
    after = res.module.model.state_dict()
    keys = backbone_keys(res.module.model)
    assert any("running_mean" in k for k in keys)
    for k in keys:
        assert torch.equal(before[k], after[k]), k  # weights, running stats, counters
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert not res.module.features_cached


def test_unfreeze_after_switches_at_the_epoch_with_lower_lr(tmp_path):
    opts = dict(freeze_backbone=False, unfreeze_after=1, backbone_lr_mult=0.1,
                augment="none", schedule="none", lr=1e-3)
    _, res = run_fit(tmp_path, "two", epochs=2, **opts)
    assert res.module.cfg.freeze_backbone  # unfreeze_after implies a frozen start
    assert not res.module.features_cached  # the backbone changes later: nothing to cache
    opt = res.module.trainer.optimizers[0]
    head, backbone = opt.param_groups
    assert [head["lr"], backbone["lr"]] == pytest.approx([1e-3, 1e-4])
    assert {id(p) for p in head["params"]} == {id(p) for p in head_parameters(res.module.model)}
    # 3 batches per epoch: the head stepped in both epochs, the backbone only in the second
    steps = lambda p: int(opt.state[p]["step"]) if p in opt.state else 0  # noqa: E731
    assert {steps(p) for p in head["params"]} == {6}
    assert {steps(p) for p in backbone["params"]} == {3}
    assert all(p.requires_grad for p in res.module.model.parameters())


def test_feature_cache_trains_the_same_head(tmp_path):
    opts = dict(epochs=3, freeze_backbone=True, augment="none", head="mlp-bn")
    _, cached = run_fit(tmp_path, "cached", cache=True, **opts)
    _, plain = run_fit(tmp_path, "plain", cache=False, **opts)
    assert cached.module.features_cached and not plain.module.features_cached
    a, b = cached.module.model.state_dict(), plain.module.model.state_dict()
    for k in ("head_mlp.0.weight", "head_mlp.2.running_mean", "fc.weight", "fc.bias"):
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert not torch.equal(a["fc.weight"], create_model("resnet18", 1, 1).fc.weight)


def test_three_classes_end_to_end(tmp_path, capsys, monkeypatch, caplog):
    """3 colour classes: softmax head, macro + per-class metrics, no threshold, names in the
    confusion matrix; frozen random backbone warns; cached features; evaluate and predict."""
    caplog.set_level(logging.INFO, logger="cxrlab")
    rng = np.random.default_rng(0)
    names = ["covid", "normal", "viral"]
    for folder in ("data", "held"):  # held: other images of each class, for evaluate
        for k, c in enumerate(names):
            (tmp_path / folder / c).mkdir(parents=True)
            for i in range(10):
                img = rng.normal(90, 20, (32, 32, 3))
                img[..., k] += 90
                Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                    tmp_path / folder / c / f"{c}{i}.png")
    run = tmp_path / "run"
    args = ["train", tmp_path / "data", "--out", run, "--model", "resnet18", "--image-size",
            "32", "--epochs", "3", "--batch-size", "8", "--freeze-backbone", "--augment",
            "none", "--head", "vgg", "-q"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    assert "random weights" in caplog.text and "computed once" in caplog.text
    assert not (run / "threshold").exists()
    m = json.loads((run / "metrics.json").read_text())
    assert m["classes"] == names and m["threshold"] is None and m["positive_class"] is None
    assert set(m["per_class"]) == set(names)
    assert np.array(m["confusion_matrix"]).shape == (3, 3)
    for f in ("roc.png", "confusion_matrix.png"):
        assert (run / f).stat().st_size > 0
    code, _, err = run_cli(["evaluate", run, tmp_path / "held", "--json", tmp_path / "e.json"],
                           capsys, monkeypatch)
    assert code == 0, err
    e = json.loads((tmp_path / "e.json").read_text())
    assert e["n"] == 30 and set(e["per_class"]) == set(names)
    # each class is one colour channel brighter: separable, so it must be learned (1.0 here)
    assert e["accuracy"] >= 0.9 and min(np.diag(e["confusion_matrix"])) >= 8
    code, out, err = run_cli(["predict", run, tmp_path / "data" / "viral", "--json"],
                             capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 10 and all(set(r["probabilities"]) == set(names) for r in rows)
    assert sum(r["class"] == "viral" for r in rows) >= 9
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows)


def test_unfreeze_applies_to_a_run_resumed_after_the_unfreeze_epoch():
    # A run resumed at epoch 3 of `--unfreeze-after 1` never sees epoch 1 start: the backbone
    # must still train from the first resumed epoch on.
    from types import SimpleNamespace

    from cxrlab.training.finetune import UnfreezeBackbone
    from cxrlab.training.loop import ClassifierModule

    cfg = RunConfig(data="x", model="resnet18", freeze_backbone=True, unfreeze_after=1)
    model = create_model("resnet18", num_classes=1, in_chans=1)
    module = ClassifierModule(model, cfg, 2, None, 1)
    assert module.backbone_frozen
    one_process = {"world_size": 1}
    UnfreezeBackbone(1).on_train_epoch_start(SimpleNamespace(current_epoch=0, **one_process),
                                             module)
    assert module.backbone_frozen
    UnfreezeBackbone(1).on_train_epoch_start(SimpleNamespace(current_epoch=3, **one_process),
                                             module)
    assert not module.backbone_frozen
    assert all(p.requires_grad for p in model.parameters())


def test_wise_ft_ends_halfway_between_the_unfreeze_and_the_best_epoch(tmp_path):
    opts = dict(freeze_backbone=False, unfreeze_after=1, backbone_lr_mult=0.1, augment="none",
                schedule="none", lr=1e-2, wise_ft=0.5)
    before, res = run_fit(tmp_path, "wise", epochs=2, **opts)
    start = torch.load(tmp_path / "wise" / "checkpoints" / "head_trained.pt", weights_only=True)
    best = torch.load(res.best_path, map_location="cpu", weights_only=False)["state_dict"]
    best = {k.removeprefix("model."): v for k, v in best.items() if k.startswith("model.")}
    final = res.module.model.state_dict()
    # at the unfreeze the backbone was still the starting one; the head had trained an epoch
    assert torch.equal(start["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(start["fc.weight"], before["fc.weight"])
    assert not torch.equal(best["conv1.weight"], start["conv1.weight"])  # fine-tuned
    for k in ("conv1.weight", "bn1.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"):
        assert torch.allclose(final[k], 0.5 * best[k] + 0.5 * start[k], atol=1e-6), k

    # BatchNorm statistics: those of a fresh pass of the mixed network over the training
    # batches (epoch 1's order, not augmented), not the linear mix of the two ends' statistics
    from torch.optim.swa_utils import update_bn

    from cxrlab.training.loop import ArrayDataset, make_loader

    mixed = create_model("resnet18", num_classes=1, in_chans=1)
    mixed.load_state_dict({k: 0.5 * best[k] + 0.5 * start[k] if v.is_floating_point() else v
                           for k, v in best.items()})
    tx, ty = tiny_arrays(24, 0)
    batches = [x.float() / 255 for x, _ in make_loader(ArrayDataset(tx, ty), 8, train=True,
                                                       seed=0)]
    update_bn(batches, mixed)  # momentum None: the plain average over the 3 batches
    fresh = mixed.state_dict()
    bn = [k for k in final if k.endswith(("running_mean", "running_var"))]
    assert len(bn) == 2 * 20  # every BN layer of resnet18
    for k in bn:
        assert torch.allclose(final[k], fresh[k], rtol=1e-4, atol=1e-5), k
    lin = {k: 0.5 * best[k] + 0.5 * start[k] for k in bn}
    assert max(float((lin[k] - fresh[k]).abs().max()) for k in bn) > 1e-2  # the fix matters


def test_reestimate_bn_runs_the_model_in_eval_mode_but_its_trained_bn():
    """Dropout off while the statistics are gathered; the BN of a frozen stage keeps its own
    (and normalises with them); every module's train/eval mode and each BN's momentum come
    back as they were."""
    from torch import nn

    from cxrlab.training.finetune import reestimate_bn

    class Tiny(nn.Sequential):
        def stage_names(self):
            return [("0", "1"), ("2", "3", "4", "5")]

    torch.manual_seed(0)
    model = Tiny(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Dropout(0.5),
                 nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model.frozen_stages = 1
    model.train()
    model[1].eval()  # as frozen_bn_eval leaves it
    frozen = {k: v.clone() for k, v in model[1].state_dict().items()}
    batches = [torch.rand(5, 1, 8, 8) for _ in range(3)]
    with torch.no_grad():  # by hand: the frozen BN with its statistics, no dropout
        h = [model[2](model[1](model[0](x))) for x in batches]
    want_mean = torch.stack([t.mean(dim=(0, 2, 3)) for t in h]).mean(0)
    want_var = torch.stack([t.var(dim=(0, 2, 3)) for t in h]).mean(0)  # unbiased, as BN

    assert reestimate_bn(model, iter(batches)) == 3
    for k, v in frozen.items():
        assert torch.equal(model[1].state_dict()[k], v), k
    assert torch.allclose(model[4].running_mean, want_mean, atol=1e-6)
    assert torch.allclose(model[4].running_var, want_var, atol=1e-6)
    assert int(model[4].num_batches_tracked) == 3
    assert [m.training for m in model] == [True, False, True, True, True, True]
    assert model[4].momentum == 0.3
    before = model[4].running_mean.clone()
    assert reestimate_bn(model, iter([])) == 0  # nothing to learn from: left as it was
    assert torch.equal(model[4].running_mean, before)


def test_wise_ft_needs_a_head_only_phase():
    from cxrlab.errors import CxrlabError

    with pytest.raises(CxrlabError, match="--wise-ft .*--unfreeze-after"):
        RunConfig.build(dict(data="x", model="resnet18", wise_ft=0.5))
    assert RunConfig.build(dict(data="x", wise_ft=0.5)).unfreeze_after == 1  # the default recipe



# -- frozen stages ---------------------------------------------------------------------------


def test_frozen_stages_keep_weights_and_bn_statistics_through_the_unfreeze(tmp_path):
    """resnet18's stages: conv1+bn1, layer1..4. Two frozen: the stem and layer1 end the run
    as they started (weights and BN statistics), through the head-only epoch and the
    unfreeze; layer2 on trains; the optimizer never holds a frozen parameter."""
    opts = dict(freeze_backbone=False, unfreeze_after=1, backbone_lr_mult=0.1,
                augment="light", frozen_stages=2)
    before, res = run_fit(tmp_path, "frozen2", epochs=2, **opts)
    model = res.module.model
    after = model.state_dict()
    frozen = [k for k in after if k.startswith(("conv1.", "bn1.", "layer1."))]
    assert any("running_mean" in k for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    for k in ("layer2.0.conv1.weight", "layer2.0.bn1.running_mean", "fc.weight"):
        assert not torch.equal(before[k], after[k]), k
    opt = res.module.trainer.optimizers[0]
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen_ids = {id(p) for n, p in model.named_parameters()
                  if n.startswith(("conv1.", "bn1.", "layer1."))}
    assert frozen_ids and not held & frozen_ids
    # after the run the model is whole again: every parameter takes gradients (Grad-CAM)
    assert all(p.requires_grad for p in model.parameters()) and model.frozen_stages == 0


def test_frozen_stages_without_a_head_only_phase(tmp_path):
    """Everything but the frozen stem trains from the first step."""
    before, res = run_fit(tmp_path, "plain", epochs=1, freeze_backbone=False,
                          unfreeze_after=None, augment="none", frozen_stages=1)
    after = res.module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith(("conv1.", "bn1.")))
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])


@pytest.mark.parametrize("n, needles", [
    ("6", ("--frozen-stages 6", "resnet18 has 5 stages", "layer4")),
    # frozen random weights are noise the rest must learn around: a mistake, said at once
    ("2", ("--frozen-stages 2", "random weights", "--pretrained")),
])
def test_frozen_stages_refused_in_one_line_writing_nothing(tmp_path, capsys, monkeypatch, n,
                                                          needles):
    from tests.conftest import make_kermany_folder
    from tests.test_cli import assert_user_error

    data = make_kermany_folder(tmp_path / "xray", 4, 4, size=32)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", data, "--out", out, "--model", "resnet18",
                            "--frozen-stages", n, "--quiet"], capsys, monkeypatch)
    assert_user_error(code, err, *needles)
    assert not out.exists()
