"""Models: shapes, the features/head split, training, torchvision weights, sizes and costs."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.models import create_model, list_models
from cxrlab.models.base import IMAGENET_MEAN, IMAGENET_STD
from cxrlab.models.resnet import load_torchvision_state_dict
from cxrlab.models.summary import (
    build_on_meta,
    count_macs,
    count_parameters,
    model_summary,
    render_summary,
)

SMALL = 64  # px: the cnn halves 5 times, so 64 -> a 2x2 feature map


def small(name: str, num_classes: int = 1, in_chans: int = 1, **kw) -> nn.Module:
    return create_model(name, num_classes, in_chans, image_size=SMALL, **kw)


def torchvision_resnet_keys(layers: list[int], bottleneck: bool) -> list[str]:
    """torchvision's exact state-dict keys, written out independently of our code."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight", *(f"bn1.{s}" for s in bn)]
    for li, n in enumerate(layers, 1):
        for b in range(n):
            p = f"layer{li}.{b}."
            for c in range(1, (3 if bottleneck else 2) + 1):
                keys += [f"{p}conv{c}.weight", *(f"{p}bn{c}.{s}" for s in bn)]
            if b == 0 and (li > 1 or bottleneck):
                keys += [f"{p}downsample.0.weight", *(f"{p}downsample.1.{s}" for s in bn)]
    return [*keys, "fc.weight", "fc.bias"]


ARCH = {"resnet18": ([2, 2, 2, 2], False), "resnet50": ([3, 4, 6, 3], True)}


def torchvision_like_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A 3-channel, 1000-class state dict in torchvision's layout, with random values (so that
    a weight copied to the wrong place cannot pass by being equal to its neighbour)."""
    torch.manual_seed(123)
    model = create_model(name, 1000, 3)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("pixel_")}
    assert list(sd) == torchvision_resnet_keys(*ARCH[name])
    return {k: (torch.randint(0, 100, v.shape) if k.endswith("num_batches_tracked")
                else torch.randn(v.shape)) for k, v in sd.items()}


# -- registry ---------------------------------------------------------------------------


def test_registry_lists_models_and_rejects_unknown_names_and_options():
    assert {"cnn", "resnet18", "resnet50"} <= set(list_models())
    with pytest.raises(CxrlabError, match="unknown model 'vgg99'; choose from: cnn, .*resnet18"):
        create_model("vgg99", 1)
    with pytest.raises(CxrlabError, match="unknown option 'depth'"):
        create_model("resnet18", 1, depth=34)
    with pytest.raises(CxrlabError, match="dropout"):
        create_model("resnet18", 1, dropout=1.5)


# -- shapes and the features / head split -------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet18", "resnet50"])
def test_shapes_for_channels_and_classes(name):
    x = torch.rand(2, 3, SMALL, SMALL)
    for in_chans in (1, 3):
        for k in (1, 3):
            m = small(name, k, in_chans).eval()
            assert (m.num_classes, m.in_chans) == (k, in_chans)
            assert m.pixel_mean.shape == m.pixel_std.shape == (1, in_chans, 1, 1)
            with torch.no_grad():
                feats = m.forward_features(x[:, :in_chans])
                logits = m(x[:, :in_chans])
            assert feats.ndim == 4 and feats.shape[:2] == (2, m.num_features)
            assert logits.shape == (2, k)
            assert torch.allclose(m.forward_head(feats), logits)


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_feature_layer_is_the_last_feature_map(name):
    """Grad-CAM hooks `feature_layer`; its output must be exactly forward_features'."""
    m = small(name).eval()
    seen = {}
    m.get_submodule(m.feature_layer).register_forward_hook(lambda mod, i, o: seen.update(o=o))
    with torch.no_grad():
        feats = m.forward_features(torch.rand(2, 1, SMALL, SMALL))
    assert torch.equal(seen["o"], feats)


@pytest.mark.parametrize("name", list_models())
def test_stages_split_the_backbone_in_order(name):
    """`stage_names()` (what --frozen-stages counts) covers every backbone parameter once,
    input end first: the output stride never falls, and the last stage ends where
    forward_features does."""
    from cxrlab.models.stages import stage_strides

    model = create_model(name, num_classes=1, in_chans=1)
    stages = model.stage_names()
    params = [p for stage in stages for n in stage for p in model.get_submodule(n).parameters()]
    head = [p for n in model.trainable_head_names() for p in model.get_submodule(n).parameters()]
    assert len({id(p) for p in params}) == len(params)  # no parameter in two stages
    assert {id(p) for p in params + head} == {id(p) for p in model.parameters()}
    strides = stage_strides(model)
    assert strides == sorted(strides) and strides[0] == 2
    with torch.no_grad():
        side = model.eval().forward_features(torch.zeros(1, 1, 64, 64)).shape[-1]
    assert strides[-1] == 64 // side


def test_scratch_models_normalise_with_xray_stats():
    m = small("resnet18")
    assert torch.allclose(m.pixel_mean, torch.tensor(0.5))
    assert torch.allclose(m.pixel_std, torch.tensor(0.25))
    assert {"pixel_mean", "pixel_std"} <= set(m.state_dict())  # saved with the weights


def test_per_image_intensity_ignores_exposure_and_contrast():
    """intensity="image": a brighter or flatter copy of a film gives the same output; the fixed
    normalisation does not (and an unknown mode is a user error)."""
    x = torch.rand(3, 1, SMALL, SMALL) * 0.6 + 0.2
    shifted = x * 0.7 + 0.2  # flatter and brighter, still inside [0, 1]
    torch.manual_seed(0)
    m = create_model("resnet18", num_classes=1, in_chans=1, intensity="image").eval()
    fixed = create_model("resnet18", num_classes=1, in_chans=1).eval()
    fixed.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.allclose(m(x), m(shifted), atol=1e-4)
        assert not torch.allclose(fixed(x), fixed(shifted), atol=1e-2)
        blank = m(torch.full((1, 1, SMALL, SMALL), 0.3))
    assert torch.isfinite(blank).all()
    with pytest.raises(CxrlabError, match="intensity 'auto': choose from fixed, image"):
        create_model("resnet18", num_classes=1, intensity="auto")


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_adam_steps_lower_the_loss(name):
    torch.manual_seed(0)
    x = torch.rand(8, 1, SMALL, SMALL)
    y = torch.tensor([0, 1] * 4, dtype=torch.float32)
    x[y == 1, :, 20:40, 20:40] += 0.5  # a visible class signal
    m = small(name, dropout=0.0).train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = nn.functional.binary_cross_entropy_with_logits(m(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "resnet18", "resnet50"])
def test_batchnorm_false_has_no_batchnorm_and_still_runs(name):
    m = small(name, batchnorm=False).eval()
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in m.modules())
    with torch.no_grad():
        out = m(torch.rand(2, 1, SMALL, SMALL))
    assert torch.isfinite(out).all()


def dropout_rates(m: nn.Module) -> list[float]:
    return [mod.p for mod in m.modules() if isinstance(mod, nn.Dropout)]


@pytest.mark.parametrize("name", ["cnn", "resnet18", "resnet50"])
def test_dropout_zero_leaves_no_dropout(name):
    assert dropout_rates(small(name, dropout=0.0)) == []


def test_dropout_defaults_and_overrides():
    assert dropout_rates(small("cnn")) == [0.2, 0.2, 0.7, 0.5, 0.3]  # the notebook's
    assert dropout_rates(small("cnn", dropout=0.4)) == [0.4] * 5  # replaced, not scaled
    assert dropout_rates(small("resnet18")) == []
    assert dropout_rates(small("resnet18", dropout=0.2)) == [0.2]


def test_cnn_says_which_image_size_it_was_built_for():
    m = small("cnn")
    with pytest.raises(CxrlabError, match="image_size 64"):
        m(torch.rand(1, 1, 96, 96))
    with pytest.raises(CxrlabError, match="at least 32 px"):
        create_model("cnn", 1, image_size=24)


# -- pretrained weights -------------------------------------------------------------------


@pytest.fixture(scope="module")
def r18_weights(tmp_path_factory) -> tuple[dict, str]:
    sd = torchvision_like_state_dict("resnet18")
    path = tmp_path_factory.mktemp("w") / "resnet18-tv.pth"
    torch.save(sd, path)
    return sd, str(path)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_torchvision_layout_loads_backbone_and_leaves_head(r18_weights, in_chans):
    sd, path = r18_weights
    torch.manual_seed(7)
    fresh = create_model("resnet18", 2, in_chans)
    torch.manual_seed(7)
    m = create_model("resnet18", 2, in_chans, pretrained=path)
    got = m.state_dict()
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        want = v.sum(1, keepdim=True) if (k == "conv1.weight" and in_chans == 1) else v
        assert torch.equal(got[k], want), k
    assert torch.equal(got["fc.weight"], fresh.state_dict()["fc.weight"])
    assert torch.equal(got["fc.bias"], fresh.state_dict()["fc.bias"])
    mean = torch.tensor(IMAGENET_MEAN)
    std = torch.tensor(IMAGENET_STD)
    if in_chans == 1:
        mean, std = mean.mean(0, keepdim=True), std.mean(0, keepdim=True)
    assert torch.allclose(m.pixel_mean.flatten(), mean)
    assert torch.allclose(m.pixel_std.flatten(), std)


def test_grey_conv1_sum_equals_three_channel_net_on_repeated_grey(r18_weights):
    """The 3 -> 1 rule: summed weights on grey == original weights on grey repeated 3x."""
    sd, _ = r18_weights
    grey = create_model("resnet18", 1, 1)
    colour = create_model("resnet18", 1, 3)
    load_torchvision_state_dict(grey, sd)
    load_torchvision_state_dict(colour, sd)
    g = torch.rand(1, 1, 32, 32)
    a = nn.functional.conv2d(g, grey.conv1.weight, stride=2, padding=3)
    b = nn.functional.conv2d(g.expand(1, 3, 32, 32), colour.conv1.weight, stride=2, padding=3)
    assert torch.allclose(a, b, atol=1e-5)


def test_torchvision_files_without_num_batches_tracked_load(r18_weights):
    # Older torchvision files lack the BN counters: they load, and every weight is copied.
    sd, _ = r18_weights
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    m = create_model("resnet18", 1, 3)
    load_torchvision_state_dict(m, old)
    got = m.state_dict()
    copied = [k for k in old if not k.startswith("fc.")]
    assert any("running_var" in k for k in copied) and "conv1.weight" in copied
    for k in copied:
        assert torch.equal(got[k], old[k]), k


def test_bad_weights_raise_naming_the_key(r18_weights, tmp_path):
    sd, _ = r18_weights
    wrong = dict(sd)
    wrong["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    with pytest.raises(CxrlabError, match=r"'layer2\.0\.conv1\.weight' has shape \(128, 32"):
        load_torchvision_state_dict(create_model("resnet18", 1), wrong)
    missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(CxrlabError, match=r"missing key 'layer3\.1\.bn2\.running_var'"):
        load_torchvision_state_dict(create_model("resnet18", 1), missing)
    with pytest.raises(CxrlabError, match="unexpected key 'extra.weight'"):
        extra = {**sd, "extra.weight": sd["fc.bias"]}
        load_torchvision_state_dict(create_model("resnet18", 1), extra)
    with pytest.raises(CxrlabError, match="batchnorm=True"):
        load_torchvision_state_dict(create_model("resnet18", 1, batchnorm=False), sd)


def test_pretrained_file_errors(tmp_path):
    with pytest.raises(CxrlabError, match="not found"):
        create_model("resnet18", 1, pretrained=tmp_path / "nope.pth")
    with pytest.raises(CxrlabError, match="could not be reached"):  # .invalid never resolves
        create_model("resnet18", 1, pretrained="https://cxrlab.invalid/never-cached-w.pth")
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(CxrlabError, match="junk.pth: not a PyTorch state dict"):
        create_model("resnet18", 1, pretrained=junk)


def test_resnet50_torchvision_layout(tmp_path):
    sd = torchvision_like_state_dict("resnet50")
    path = tmp_path / "r50.pth"
    torch.save(sd, path)
    m = create_model("resnet50", 3, 1, pretrained=path)
    got = m.state_dict()
    assert torch.equal(got["conv1.weight"], sd["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(got["layer4.2.bn3.weight"], sd["layer4.2.bn3.weight"])
    assert torch.equal(got["layer3.0.downsample.0.weight"], sd["layer3.0.downsample.0.weight"])
    assert got["fc.weight"].shape == (3, 2048)


def test_a_cxrlab_model_transfers_with_its_pixel_stats(tmp_path):
    """A finished run's model.pt can start another task: backbone + its normalisation."""
    src = small("cnn", 3)
    src.set_pixel_stats(0.4, 0.2)
    torch.save(src.state_dict(), tmp_path / "model.pt")
    m = small("cnn", 1, pretrained=tmp_path / "model.pt")
    assert torch.equal(m.state_dict()["dense.0.weight"], src.state_dict()["dense.0.weight"])
    assert torch.allclose(m.pixel_mean, torch.tensor(0.4))


# -- sizes and costs ------------------------------------------------------------------------


def test_parameter_counts_match_torchvision():
    assert count_parameters(create_model("resnet18", 1000, 3)) == 11_689_512
    assert count_parameters(create_model("resnet50", 1000, 3)) == 25_557_032


def test_resnet18_macs():
    gmacs = count_macs(create_model("resnet18", 1000, 3), 224) / 1e9
    assert 1.80 < gmacs < 1.83  # torchvision quotes 1.81 GFLOPS (multiply-adds)


@pytest.mark.parametrize("name", list_models())
def test_counts_on_the_meta_device_equal_the_real_models(name):
    """`cxrlab models` builds on the meta device (no memory, no init, no arithmetic): the
    parameters, multiply-adds and layer table must be the real model's."""
    real = small(name, 2)
    meta = build_on_meta(name, num_classes=2, in_chans=1, image_size=SMALL)
    assert all(p.is_meta for p in meta.parameters())
    assert count_parameters(meta) == count_parameters(real)
    assert count_macs(meta, SMALL) == count_macs(real, SMALL)
    assert model_summary(meta, SMALL) == model_summary(real, SMALL)


@pytest.mark.parametrize("name", ["cnn", "resnet18", "resnet50"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_summary_at_224(name, in_chans):
    m = create_model(name, 2, in_chans, image_size=224)
    m.train()
    rows = model_summary(m, 224)
    assert m.training  # mode restored
    assert rows[0].name == m.first_conv and rows[0].type == "Conv2d"
    assert rows[-1].name == "fc" and rows[-1].output_shape == (2,)
    assert sum({r.name: r.params for r in rows}.values()) == count_parameters(m)
    assert count_macs(m, 224) > 0
    buf = io.StringIO()
    render_summary(rows, Console(file=buf, width=120))
    assert f"{count_parameters(m):,} parameters" in buf.getvalue()
