"""Your own model: `cxrlab.register_model` puts a student's network through the whole story
(train, evaluate, predict, Grad-CAM, export) and refuses what would break it, in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cxrlab
from cxrlab.models import BackboneClassifier, ImageClassifier, create_model
from cxrlab.models.base import _REGISTRY
from cxrlab.models.custom import _CUSTOM
from cxrlab.models.stages import model_stages


@pytest.fixture
def registry():
    """Names a test registers are gone after it."""
    before = set(_REGISTRY)
    yield
    for name in set(_REGISTRY) - before:
        del _REGISTRY[name]
        _CUSTOM.discard(name)


class TinyNet(nn.Module):
    """What a student writes: two conv blocks, no cxrlab in sight."""

    def __init__(self, in_chans: int, width: int = 8):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=2, padding=1),
                                    nn.BatchNorm2d(width), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                    nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


def test_own_backbone_trains_evaluates_predicts_and_explains(registry, tmp_path):
    seen = []

    def tiny(in_chans, image_size):  # names only what it needs
        seen.append((in_chans, image_size))
        return TinyNet(in_chans)

    cxrlab.register_model("tiny", tiny)
    train = cxrlab.demo_data() / "train"
    run = cxrlab.train(train, tmp_path / "run", model="tiny", image_size=32, epochs=1,
                       augment="none", batch_size=32)
    assert run.config.model == "tiny" and (1, 32) in seen
    assert 0.0 <= run.metrics["roc_auc"] <= 1.0 and run.metrics["n"] > 0
    test = cxrlab.demo_data() / "test"
    metrics = run.evaluate(test)
    assert metrics["n"] == sum(map(sum, metrics["confusion_matrix"])) > 0
    images = sorted((test / "PNEUMONIA").iterdir())[:2]
    rows = run.predict(images)
    assert len(rows) == 2
    probs = np.array([[r["probabilities"][c] for c in run.classes] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    cam = run.gradcam(images[0])  # hooks feature_layer: the backbone's output
    assert cam.shape == (32, 32) and 0 <= cam.min() <= cam.max() <= 1
    onnx = run.export_onnx(tmp_path / "tiny.onnx")
    assert onnx.is_file()
    del _REGISTRY["tiny"]  # another process, which never registered it
    _CUSTOM.discard("tiny")
    with pytest.raises(cxrlab.CxrlabError, match="unknown model 'tiny'.*register_model"):
        cxrlab.load(run.path).predict(images)


def test_what_the_factory_receives_and_the_wrapper_it_gets(registry):
    got = {}

    def anything(**kwargs):
        got.update(kwargs)
        return TinyNet(kwargs["in_chans"])

    cxrlab.register_model("anything", anything)
    m = create_model("anything", num_classes=3, in_chans=3, dropout=0.25, head="mlp-bn",
                     image_size=48)
    assert {k: got[k] for k in ("num_classes", "in_chans", "dropout", "batchnorm", "head",
                                "image_size")} == {"num_classes": 3, "in_chans": 3,
                                                   "dropout": 0.25, "batchnorm": True,
                                                   "head": "mlp-bn", "image_size": 48}
    assert isinstance(m, BackboneClassifier) and m.num_features == 16
    assert m.head_names() == ("head_drop", "head_mlp", "fc")
    assert m.stage_names() == [("backbone.block1",), ("backbone.block2",)]
    assert m.first_conv == "backbone.block1.0"
    x = torch.rand(2, 3, 48, 48)
    feats = m.forward_features(x)
    assert feats.shape == (2, 16, 12, 12)
    assert m.eval()(x).shape == (2, 3)
    assert torch.allclose(m.forward_head(feats), m.forward_head(feats.mean(dim=(2, 3))))


def test_an_image_classifier_subclass_is_used_as_it_is(registry):
    class Flat(ImageClassifier):  # a flattening head must say it does not pool
        feature_layer, first_conv, classifier = "conv", "conv", "fc"
        pooled_head = False

        def __init__(self, num_classes, in_chans, image_size):
            super().__init__(num_classes, in_chans, num_features=4)
            self.conv = nn.Conv2d(in_chans, 4, 3, stride=4, padding=1)
            self.fc = nn.Linear(4 * (image_size // 4) ** 2, num_classes)

        def forward_backbone(self, x):
            return self.conv(x)

        def forward_head(self, feats, pre_logits=False):
            return self.fc(feats.flatten(1))

    cxrlab.register_model("flat", Flat)
    m = create_model("flat", num_classes=1, in_chans=1, image_size=32)
    assert type(m) is Flat and m(torch.rand(2, 1, 32, 32)).shape == (2, 1)
    Flat.pooled_head = True  # a lie the feature cache would trip on: caught at build time
    with pytest.raises(cxrlab.CxrlabError, match="pooled_head = False"):
        create_model("flat", num_classes=1, in_chans=1, image_size=32)


def test_bad_registrations_and_models_are_one_line_errors(registry):
    with pytest.raises(cxrlab.CxrlabError, match="built-in"):
        cxrlab.register_model("resnet18", TinyNet)
    cxrlab.register_model("mine", TinyNet)
    assert len(model_stages("mine")[0]) == 2
    with pytest.raises(cxrlab.CxrlabError, match="replace=True"):
        cxrlab.register_model("mine", TinyNet)
    cxrlab.register_model("mine", lambda in_chans: nn.Sequential(
        nn.Conv2d(in_chans, 4, 3, stride=2), nn.ReLU()), replace=True)
    assert create_model("mine", 1, 1).num_features == 4  # the replacement, not a cached one
    assert len(model_stages("mine")[0]) == 1  # and its stages, not the old ones
    with pytest.raises(cxrlab.CxrlabError, match="callable"):
        cxrlab.register_model("x", "TinyNet")
    cxrlab.register_model("flat_out", lambda in_chans: nn.Sequential(
        nn.Conv2d(in_chans, 4, 3), nn.Flatten()))
    with pytest.raises(cxrlab.CxrlabError, match=r"feature map \(B, C, h, w\), got \(2, "):
        create_model("flat_out", 1, 1)
    cxrlab.register_model("not_module", lambda: "a string")
    with pytest.raises(cxrlab.CxrlabError, match="returned str"):
        create_model("not_module", 1, 1)
    with pytest.raises(cxrlab.CxrlabError, match="unknown model 'gone'"):
        create_model("gone", 1, 1)


STUDENT_MODULE = '''
from torch import nn


def make_net(in_chans):
    return nn.Sequential(nn.Conv2d(in_chans, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8),
                         nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
'''


def test_module_factory_name_works_in_every_cxrlab_process(tmp_path, registry):
    """A run of a network named "module:factory" is evaluated by another `cxrlab` process
    that never registered it: the name in config.yaml says where to import it from."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "studentnets.py").write_text(STUDENT_MODULE)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    data = cxrlab.demo_data()
    cli = [sys.executable, "-m", "cxrlab.cli"]
    run = tmp_path / "run"
    subprocess.run([*cli, "train", str(data / "train"), "--out", str(run), "--model",
                    "studentnets:make_net", "--image-size", "32", "--epochs", "1", "--quiet"],
                   env=env, check=True, capture_output=True, timeout=600)
    assert "studentnets:make_net" in (run / "config.yaml").read_text()
    out = subprocess.run([*cli, "evaluate", str(run), str(data / "test"), "--json",
                          str(tmp_path / "m.json")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 120
    # without the module on the path: one line naming the model, exit 2
    bad = subprocess.run([*cli, "evaluate", str(run), str(data / "test")],
                         env={k: v for k, v in env.items() if k != "PYTHONPATH"},
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "studentnets:make_net" in bad.stderr
    assert "Traceback" not in bad.stderr
