"""Test-time augmentation (cxrlab.models.tta) on real demo X-rays: the mean of the views'
probabilities, a run setting that sets the threshold, overridable, baked into ONNX."""

from __future__ import annotations

import json
import logging
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

import cxrlab
from cxrlab.config import RunConfig
from cxrlab.data.cache import load_images
from cxrlab.deploy.export import OnnxPredictor, export_onnx, make_predictor
from cxrlab.deploy.inference import predict_probs
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.metrics import choose_threshold
from cxrlab.models import create_model
from cxrlab.models.tta import TTA, passes, with_tta, without_tta
from cxrlab.run import load_run, read_predictions
from cxrlab.training.lifecycle import train_run
from tests.deploy.test_export import cli

PER_CLASS = 12


def demo_files(n: int = PER_CLASS) -> list[Path]:
    root = Path(cxrlab.demo_data()) / "train"
    return [f for c in ("NORMAL", "PNEUMONIA") for f in sorted((root / c).iterdir())[:n]]


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    x, bad = load_images(demo_files(4), 64, 1, cache_dir=None)
    assert not bad
    return x


@pytest.mark.parametrize("num_classes", [1, 3])
def test_flip_is_the_mean_probability_of_image_and_mirror(images, num_classes):
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=num_classes, in_chans=1).eval()
    plain = predict_probs(model, images)
    mirror = predict_probs(model, np.ascontiguousarray(images[..., ::-1]))
    assert np.abs(plain - mirror).max() > 1e-4  # the mirror is seen differently: a real test
    flipped = predict_probs(with_tta(model, "flip"), images)
    np.testing.assert_allclose(flipped, (plain + mirror) / 2, atol=2e-6)
    np.testing.assert_allclose(flipped.sum(1), 1, atol=1e-6)


def test_settings_cost_and_wrapping():
    model = create_model("resnet18", num_classes=1, in_chans=1)
    assert with_tta(model, "none") is model
    flip = with_tta(model, "flip")
    assert without_tta(with_tta(flip, "flip")) is model  # re-wrapped, never twice
    assert with_tta(flip, "none") is model
    assert [passes(s) for s in TTA] == [1, 2]
    assert set(typing.get_args(RunConfig.model_fields["tta"].annotation)) == set(TTA)
    with pytest.raises(CxrlabError, match="--tta spin"):
        with_tta(model, "spin")


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory) -> Path:
    """A tiny resnet18 trained one epoch on 24 demo X-rays with `tta: flip`."""
    root = tmp_path_factory.mktemp("tta")
    for f in demo_files():
        (root / "data" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "data" / f.parent.name / f.name).symlink_to(f)
    cfg = RunConfig(data=str(root / "data"), model="resnet18", image_size=64, epochs=1,
                    batch_size=8, pretrained="none", time_budget="none", tta="flip",
                    val_fraction=0.5)
    train_run(cfg, root / "run", progress=False)
    return root / "run"


def val_images(run_dir: Path):
    paths, y, probs = read_predictions(run_dir / "val_predictions.csv", ["NORMAL", "PNEUMONIA"])
    x, bad = load_images([Path(p) for p in paths], 64, 1, cache_dir=None)
    assert not bad
    return paths, y, probs, x


def test_a_flip_run_chooses_its_threshold_on_flip_scores(flip_run):
    run = load_run(flip_run)
    assert run.config.tta == "flip" and run.tta == "flip"
    assert json.loads((flip_run / "metrics.json").read_text())["tta"] == "flip"
    paths, y, saved, x = val_images(flip_run)
    base = without_tta(run.model)
    mean = (predict_probs(base, x) + predict_probs(base, np.ascontiguousarray(x[..., ::-1]))) / 2
    np.testing.assert_allclose(saved, mean, atol=2e-6)
    np.testing.assert_array_equal(saved, predict_probs(run.model, x))
    assert run.threshold == choose_threshold(y, saved[:, 1], run.config.threshold_rule,
                                             run.config.target_sensitivity)


def test_the_report_says_a_run_scores_with_tta(flip_run, tmp_path):
    from cxrlab.reporting.report import write_report

    page = write_report(flip_run, tmp_path / "flip.html").read_text()
    assert "Scored with test-time augmentation <code>flip</code>" in page


def test_predict_uses_the_runs_tta_and_none_overrides_it(flip_run, monkeypatch, capsys, caplog):
    paths, _, saved, x = val_images(flip_run)
    code, out, err = cli(["predict", flip_run, *paths[:3], "--json"], monkeypatch, capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    got = [r["probabilities"]["PNEUMONIA"] for r in rows]
    np.testing.assert_allclose(got, saved[:3, 1], atol=1e-6)
    with caplog.at_level(logging.WARNING, logger="cxrlab"):
        code, out, err = cli(["predict", flip_run, *paths[:3], "--json", "--tta", "none"],
                             monkeypatch, capsys)
    assert code == 0, err
    notes = [r.getMessage() for r in caplog.records if "--tta none" in r.getMessage()]
    assert len(notes) == 1 and "threshold was chosen" in notes[0] and "flip" in notes[0]
    plain = predict_probs(without_tta(load_run(flip_run).model), x[:3])[:, 1]
    got = [json.loads(line)["probabilities"]["PNEUMONIA"] for line in out.splitlines()]
    np.testing.assert_allclose(got, plain, atol=1e-6)
    assert np.abs(plain - saved[:3, 1]).max() > 1e-6  # the override changed the scores
    code, _, err = cli(["predict", flip_run, paths[0], "--tta", "spin"], monkeypatch, capsys)
    assert code == 2 and "--tta spin" in err


def test_onnx_export_bakes_tta_in_and_matches_torch(flip_run, tmp_path):
    run = load_run(flip_run)
    _, _, saved, x = val_images(flip_run)
    onnx_file = export_onnx(run, tmp_path / "flip.onnx")
    ort = OnnxPredictor(onnx_file)
    assert ort.tta == "flip" and ort.metadata["tta"] == "flip"
    np.testing.assert_allclose(ort(x), saved, atol=2e-5)
    ort.check_matches(run)
    with pytest.raises(CxrlabError, match="test-time augmentation 'flip'.*'none'"):
        make_predictor(load_run(flip_run, tta="none"), "onnx", onnx_file)
    plain = export_onnx(load_run(flip_run, tta="none"), tmp_path / "none.onnx")
    assert OnnxPredictor(plain).tta == "none"
    np.testing.assert_allclose(OnnxPredictor(plain)(x),
                               predict_probs(without_tta(run.model), x), atol=2e-5)


def test_api_uses_the_runs_tta_or_the_one_asked_for(flip_run):
    paths, _, saved, x = val_images(flip_run)
    r = cxrlab.load(flip_run)
    assert r.tta == "flip"
    rows = r.predict(paths[:2])
    np.testing.assert_allclose([row["probabilities"]["PNEUMONIA"] for row in rows],
                               saved[:2, 1], atol=1e-6)
    plain = cxrlab.load(flip_run, tta="none")
    assert plain.tta == "none" and plain.loaded.tta == "none"
    arr = plain.predict([x[0, 0]])[0]["probabilities"]["PNEUMONIA"]
    assert arr == pytest.approx(float(predict_probs(without_tta(r.loaded.model), x[:1])[0, 1]),
                                abs=1e-6)
    with pytest.raises(CxrlabError, match="tta spin"):
        cxrlab.load(flip_run, tta="spin")


def test_every_setting_exports_to_onnx_as_torch_scores_it(images):
    """One graph holds every view, and ONNX Runtime scores it as torch does."""
    import io
    import warnings

    import onnxruntime as ort

    from cxrlab.deploy.export import ProbabilityModel

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=1, in_chans=1).eval()
    for setting in TTA:
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(ProbabilityModel(with_tta(model, setting)).eval(),
                              (torch.zeros(1, 1, 64, 64, dtype=torch.uint8),), buf,
                              dynamo=False, opset_version=17, input_names=["image"],
                              output_names=["probabilities"],
                              dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}})
        session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(OnnxPredictor.scores(session, images),
                                   predict_probs(with_tta(model, setting), images), atol=1e-5)
