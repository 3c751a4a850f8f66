"""Grad-CAM localises: a model that learnt 'a bright square means positive' points at it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cxrlab.config import RunConfig
from cxrlab.deploy.cam import GradCam, gradcam, overlay
from cxrlab.errors import CxrlabError
from cxrlab.models.base import ImageClassifier
from cxrlab.training.lifecycle import train_run
from tests.conftest import make_kermany_folder

SIDE, SQUARE = 32, 8


class TinyFCN(ImageClassifier):
    """Three convs, one pool, global average pool: a 16x16 last feature map at 32 px."""

    feature_layer = "features"

    def __init__(self, num_classes: int = 1):
        super().__init__(num_classes, in_chans=1, num_features=16)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.init_head("linear", None)

    def forward_backbone(self, x):
        return self.features(x)


def squares(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (n, 1, 32, 32) noise; odd ones carry a bright 8x8 square anywhere."""
    x = rng.normal(80, 20, (n, 1, SIDE, SIDE)).clip(0, 255)
    y = np.arange(n) % 2
    corners = rng.integers(0, SIDE - SQUARE + 1, (n, 2))
    for i in np.flatnonzero(y):
        r, c = corners[i]
        x[i, 0, r : r + SQUARE, c : c + SQUARE] = 230
    return x.astype(np.uint8), y, corners


@pytest.fixture(scope="module")
def square_model():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = TinyFCN()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        x, y, _ = squares(32, rng)
        loss = nn.functional.binary_cross_entropy_with_logits(
            model(torch.as_tensor(x).float() / 255)[:, 0], torch.as_tensor(y).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, corners = squares(40, np.random.default_rng(1))
    with torch.no_grad():
        acc = ((model(torch.as_tensor(x).float() / 255)[:, 0] > 0).numpy() == y).mean()
    assert acc >= 0.9, acc  # the model learnt the task; otherwise the CAM test means nothing
    return model, x, y, corners


def test_heatmap_peak_falls_inside_the_square(square_model):
    model, x, y, corners = square_model
    heat = gradcam(model, x)
    assert heat.shape == (len(x), SIDE, SIDE) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1
    hits = []
    for i in np.flatnonzero(y):
        r, c = np.unravel_index(heat[i].argmax(), heat[i].shape)
        r0, c0 = corners[i]
        hits.append(r0 <= r < r0 + SQUARE and c0 <= c < c0 + SQUARE)
    assert np.mean(hits) >= 0.8, np.mean(hits)


def test_gradcam_leaves_the_model_alone(square_model):
    model, x, _, _ = square_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(torch.as_tensor(x[:4]).float() / 255)
    gradcam(model, x[:4])
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():  # works under no_grad callers too, same answer
        assert torch.equal(model(torch.as_tensor(x[:4]).float() / 255), logits)
        again = gradcam(model, x[:4])
    assert np.allclose(again, gradcam(model, x[:4]))


def test_targets_layers_and_multiclass(square_model):
    model, x, y, _ = square_model
    pos = np.flatnonzero(y)[:4]
    for_pos = gradcam(model, x[pos], target=1)
    assert np.array_equal(for_pos, gradcam(model, x[pos]))  # default: the positive logit
    assert not np.allclose(gradcam(model, x[pos], target=0), for_pos)
    # --positive naming class 0: its evidence is the default, not class 1's
    assert np.array_equal(gradcam(model, x[pos], positive=0), gradcam(model, x[pos], target=0))
    early = gradcam(model, x[pos], layer="features.1")
    assert early.shape == (4, SIDE, SIDE) and not np.allclose(early, for_pos)
    with pytest.raises(CxrlabError, match="--layer nope"):
        gradcam(model, x[:2], layer="nope")
    with pytest.raises(CxrlabError, match="target 5"):
        gradcam(model, x[:2], target=5)
    # 3 classes, a mixed batch: each image is explained for its own predicted class
    torch.manual_seed(0)
    three = TinyFCN(num_classes=3).eval()
    levels = np.repeat([20.0, 128.0, 235.0], 2)[:, None, None, None]
    noise = np.random.default_rng(0).normal(0, 10, (6, 1, SIDE, SIDE))
    imgs = (levels + noise).clip(0, 255).astype(np.uint8)
    with torch.no_grad():  # class k = "looks like brightness level k": a mixed batch
        f = three.forward_features(torch.as_tensor(imgs).float() / 255).mean((2, 3))
        three.fc.weight.copy_(f[::2] - f.mean(0))
        three.fc.bias.copy_(-three.fc.weight @ f.mean(0))
        pred = three(torch.as_tensor(imgs).float() / 255).argmax(1).numpy()
    cam = GradCam(three)
    mixed = cam(imgs)
    assert len(set(pred.tolist())) > 1  # really a mixed batch
    for i in range(len(imgs)):
        assert np.allclose(mixed[i], cam(imgs[i : i + 1], target=int(pred[i]))[0], atol=1e-5)


def test_overlay():
    img = np.full((1, 20, 30), 100, np.uint8)
    heat = np.zeros((10, 15), np.float32)
    heat[0, 0] = 1.0
    out = overlay(img, heat)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert (out[-1, -1] == 100).all()  # no evidence: the X-ray shows through
    assert tuple(out[0, 0]) != (100, 100, 100)
    assert overlay(img[0], np.zeros((20, 30), np.float32)).shape == (20, 30, 3)


@pytest.fixture(scope="module")
def cam_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cam")
    data = make_kermany_folder(root / "data", 8, 8, size=48)
    cfg = RunConfig(data=str(data), model="cnn", image_size=32, epochs=1, batch_size=8)
    train_run(cfg, root / "run", progress=False)
    return data, root / "run"


def test_predict_cam_writes_one_png_per_image(cam_run, tmp_path, capsys, monkeypatch):
    from cxrlab.cli import main

    data, run = cam_run
    out = tmp_path / "cams"
    (tmp_path / "cams").mkdir()
    (out / "mine.png").write_bytes(b"a user's file")
    monkeypatch.setattr(sys, "argv", ["cxrlab", "predict", str(run), str(data / "PNEUMONIA"),
                                      "--cam", str(out), "--json"])
    main()
    rows = [__import__("json").loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(rows) == 8
    pngs = sorted(out.glob("*.cam.png"))
    assert len(pngs) == 8 and (out / "mine.png").read_bytes() == b"a user's file"
    for r in rows:
        with Image.open(r["cam"]) as im:
            assert im.format == "PNG" and im.size[0] > 100
    monkeypatch.setattr(sys, "argv", ["cxrlab", "predict", str(run), str(data / "NORMAL"),
                                      "--cam", str(out), "--layer", "bogus"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "--layer bogus" in capsys.readouterr().err
