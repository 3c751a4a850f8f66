"""VGG-19, DenseNet-121 and EfficientNet-Lite: shapes, the features/head split, the heads,
and torchvision-layout weights the tests build themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.models import create_model, load_pretrained
from cxrlab.models.heads import HEADS

NEW = ["vgg19", "vgg19_bn", "densenet121", "efficientnet_lite0", "efficientnet_lite1",
       "efficientnet_lite2"]
SIZE = {"efficientnet_lite0": 64, "efficientnet_lite1": 64, "efficientnet_lite2": 64}


@pytest.mark.parametrize(("name", "in_chans"), [(n, 1) for n in NEW] + [
    ("vgg19", 3), ("densenet121", 3), ("efficientnet_lite0", 3)])  # the rest share the code
def test_shapes_and_features_head_split(name, in_chans):
    torch.manual_seed(0)
    size = SIZE.get(name, 32)
    m = create_model(name, num_classes=3, in_chans=in_chans).eval()
    x = torch.rand(2, in_chans, size, size)
    seen = {}
    m.get_submodule(m.feature_layer).register_forward_hook(lambda mod, i, o: seen.update(o=o))
    with torch.no_grad():
        feats = m.forward_features(x)
        logits = m(x)
    assert feats.shape[:2] == (2, m.num_features)
    assert torch.equal(seen["o"], feats)  # Grad-CAM's layer is the last feature map
    assert logits.shape == (2, 3)
    assert torch.allclose(m.forward_head(feats), logits)
    # pooled features (what the feature cache stores) give the same logits
    assert torch.allclose(m.forward_head(feats.mean((2, 3))), logits, atol=1e-6)


def test_heads_are_the_notebooks():
    m = create_model("resnet18", num_classes=3, in_chans=1, head="mlp-bn")
    layers = list(m.head_mlp)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout]
    assert layers[0].in_features == 512 and layers[0].out_features == 128
    assert layers[3].p == 0.2 and m.fc.in_features == 128 and m.fc.out_features == 3
    v = create_model("vgg19", num_classes=3, in_chans=3, head="vgg")
    layers = list(v.head_mlp)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Dropout]
    assert (layers[0].in_features, layers[0].out_features, layers[2].p) == (512, 256, 0.1)
    assert (v.fc.in_features, v.fc.out_features) == (256, 3)
    lin = create_model("densenet121", num_classes=1, in_chans=1)
    assert isinstance(lin.head_mlp, nn.Identity) and lin.fc.in_features == 1024
    # the default head keeps torchvision's names: fc.weight / fc.bias, nothing else
    assert [k for k in create_model("resnet18", 1).state_dict() if "fc" in k or "head" in k] \
        == ["fc.weight", "fc.bias"]
    assert HEADS == ("linear", "mlp-bn", "vgg")
    with pytest.raises(CxrlabError, match="--head big: unknown head"):
        create_model("resnet18", num_classes=1, head="big")
    with pytest.raises(CxrlabError, match="--head vgg"):
        create_model("cnn", num_classes=1, head="vgg", image_size=64)


# -- torchvision-layout state dicts, built here from torchvision's naming rules ----------


def torchvision_vgg19(gen: torch.Generator) -> dict[str, torch.Tensor]:
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
           512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
    sd, i, ch = {}, 0, 3
    for v in cfg:
        if v == "M":
            i += 1
            continue
        sd[f"features.{i}.weight"] = torch.randn(v, ch, 3, 3, generator=gen) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(v, generator=gen)
        i += 2  # conv, ReLU
        ch = v
    # torchvision's classifier (replaced by our head; small stand-ins keep the test light)
    for j in (0, 3, 6):
        sd[f"classifier.{j}.weight"] = torch.zeros(4, 4)
        sd[f"classifier.{j}.bias"] = torch.zeros(4)
    return sd


def torchvision_densenet121(gen: torch.Generator, old_names: bool) -> dict[str, torch.Tensor]:
    def bn(prefix, ch):
        return {f"{prefix}.weight": torch.rand(ch, generator=gen) + 0.5,
                f"{prefix}.bias": torch.randn(ch, generator=gen),
                f"{prefix}.running_mean": torch.randn(ch, generator=gen),
                f"{prefix}.running_var": torch.rand(ch, generator=gen) + 0.5}

    sd = {"features.conv0.weight": torch.randn(64, 3, 7, 7, generator=gen) * 0.05,
          **bn("features.norm0", 64)}
    ch = 64
    for b, layers in enumerate((6, 12, 24, 16), start=1):
        for j in range(1, layers + 1):
            p = f"features.denseblock{b}.denselayer{j}"
            n1, c1, n2, c2 = ((f"{p}.norm.1", f"{p}.conv.1", f"{p}.norm.2", f"{p}.conv.2")
                              if old_names else
                              (f"{p}.norm1", f"{p}.conv1", f"{p}.norm2", f"{p}.conv2"))
            sd.update(bn(n1, ch))
            sd[f"{c1}.weight"] = torch.randn(128, ch, 1, 1, generator=gen) * 0.05
            sd.update(bn(n2, 128))
            sd[f"{c2}.weight"] = torch.randn(32, 128, 3, 3, generator=gen) * 0.05
            ch += 32
        if b < 4:
            t = f"features.transition{b}"
            sd.update(bn(f"{t}.norm", ch))
            sd[f"{t}.conv.weight"] = torch.randn(ch // 2, ch, 1, 1, generator=gen) * 0.05
            ch //= 2
    sd.update(bn("features.norm5", ch))
    sd["classifier.weight"] = torch.zeros(1000, ch)
    sd["classifier.bias"] = torch.zeros(1000)
    return sd


def test_vgg19_loads_torchvision_layout(tmp_path):
    sd = torchvision_vgg19(torch.Generator().manual_seed(0))
    torch.save(sd, tmp_path / "vgg19.pth")
    m = create_model("vgg19", num_classes=2, in_chans=3, pretrained=tmp_path / "vgg19.pth")
    got = m.state_dict()
    for k, v in sd.items():
        if not k.startswith("classifier."):
            assert torch.equal(got[k], v), k
    grey = create_model("vgg19", num_classes=2, in_chans=1, pretrained=tmp_path / "vgg19.pth")
    assert torch.allclose(grey.state_dict()["features.0.weight"],
                          sd["features.0.weight"].sum(1, keepdim=True))
    bad = {**sd, "features.34.weight": torch.zeros(512, 256, 3, 3)}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CxrlabError, match=r"key 'features.34.weight' has shape \(512, 256"):
        create_model("vgg19", num_classes=2, in_chans=3, pretrained=tmp_path / "bad.pth")


@pytest.mark.parametrize("old_names", [False, True])
def test_densenet121_loads_torchvision_layout(tmp_path, old_names):
    sd = torchvision_densenet121(torch.Generator().manual_seed(1), old_names)
    torch.save(sd, tmp_path / "d121.pth")
    m = create_model("densenet121", num_classes=3, in_chans=1, pretrained=tmp_path / "d121.pth")
    got = m.state_dict()
    c1 = "features.denseblock3.denselayer7.{}.weight"
    theirs = c1.format("conv.1" if old_names else "conv1")
    assert torch.equal(got[c1.format("layers.conv1")], sd[theirs])
    assert torch.equal(got["features.norm5.running_var"], sd["features.norm5.running_var"])
    assert torch.allclose(got["features.conv0.weight"],
                          sd["features.conv0.weight"].sum(1, keepdim=True))
    n_loaded = sum(1 for k in got if not k.startswith(("fc.", "pixel_"))
                   and not k.endswith("num_batches_tracked"))
    assert n_loaded == len(sd) - 2  # everything but torchvision's classifier
    del sd["features.norm5.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(CxrlabError, match="missing key 'features.norm5.bias'"):
        load_pretrained(create_model("densenet121", 3), tmp_path / "missing.pth")
