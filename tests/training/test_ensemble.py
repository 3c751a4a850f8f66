"""Ensembles as runs (`--seeds N`, `--folds K`): real tiny members, the ensemble checked
against the members loaded one by one, and every command that takes a run taking it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cxrlab
from cxrlab.config import RunConfig
from cxrlab.data.cache import load_images
from cxrlab.deploy.cam import gradcam
from cxrlab.deploy.inference import predict_probs
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.metrics import choose_threshold
from cxrlab.models import create_model
from cxrlab.models.ensemble import EnsembleModel
from cxrlab.run import load_run, read_predictions, read_threshold
from cxrlab.training.crossval import run_crossval
from cxrlab.training.ensemble import run_seeds
from tests.conftest import make_kermany_folder
from tests.test_cli import run_cli

# tests/site/test_calibration.py's recipe: learns the synthetic task in seconds (a frozen
# pretrained backbone), so the members rank the classes and differ in their scores
BASE = dict(model="efficientnet_lite0", image_size=32, batch_size=16, epochs=3, lr=3e-2,
            freeze_backbone=True, augment="none", precision="fp32")


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory) -> dict[str, Path]:
    """Two members each way on one 24-image set, and 24 other images held out."""
    root = tmp_path_factory.mktemp("ensemble")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CXRLAB_CACHE", str(root / "cache"))
        data = make_kermany_folder(root / "data", 12, 12, size=32)
        held = make_kermany_folder(root / "held", 12, 12, size=32, seed=7)
        for p in held.rglob("*.png"):  # other names too: nothing matches the training images
            p.rename(p.with_name("h" + p.name))
        run_seeds(RunConfig.build({"data": str(data), "seeds": 2, **BASE}), root / "seeds",
                  progress=False)
        run_crossval(RunConfig.build({"data": str(data), "folds": 2, **BASE}), root / "folds",
                     progress=False)
    return {"data": data, "held": held, "seeds": root / "seeds", "folds": root / "folds"}


def _images(run, paths: list[str]) -> np.ndarray:
    return load_images([Path(p) for p in paths], run.config.image_size, run.info.in_chans,
                       cache_dir=None, bit_depth=run.bit_depth)[0]


def _split(run_dir: Path) -> list[dict]:
    with (run_dir / "split.csv").open() as f:
        return list(csv.DictReader(f))


def test_seeds_make_a_run_whose_scores_are_the_members_mean(ensembles):
    out = ensembles["seeds"]
    info = json.loads((out / "run.json").read_text())
    assert info["state"] == "complete"
    assert info["ensemble"] == {"kind": "seeds", "members": ["seed-1", "seed-2"]}
    members = [load_run(out / m) for m in info["ensemble"]["members"]]
    assert [m.config.seed for m in members] == [0, 1]  # other weights ...
    assert _split(out / "seed-1") == _split(out / "seed-2") == _split(out)  # ... one split
    run = load_run(out)
    assert isinstance(run.model, EnsembleModel) and run.config.seeds == 2
    paths, y, probs = read_predictions(out / "val_predictions.csv", run.classes)
    assert len(paths) == sum(r["split"] == "val" for r in _split(out))
    images = _images(run, paths)
    mean = np.mean([predict_probs(m.model, images) for m in members], axis=0)
    np.testing.assert_allclose(probs, mean, atol=1e-6)
    np.testing.assert_array_equal(probs, predict_probs(run.model, images))  # model.pt's own
    pos = run.info.positive
    assert read_threshold(out) == choose_threshold(y == pos, probs[:, pos],
                                                   run.config.threshold_rule,
                                                   run.config.target_sensitivity)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble"]["scored_by"] == "ensemble" and metrics["n"] == len(y)
    # how far the members' thresholds lie apart (evaluation.operating_point.threshold_spread)
    assert metrics["threshold_spread"]["thresholds"] == [read_threshold(m.run_dir)
                                                         for m in members]
    assert metrics["threshold_stability"]["rule"] == run.config.threshold_rule


def test_folds_make_a_run_from_out_of_fold_scores(ensembles):
    out = ensembles["folds"]
    info = json.loads((out / "run.json").read_text())
    assert info["ensemble"] == {"kind": "folds", "members": ["fold-1", "fold-2"]}
    assert (out / "crossval.json").is_file()  # the cross-validation's figures stay
    run = load_run(out)
    paths, y, probs = read_predictions(out / "val_predictions.csv", run.classes)
    oof = [read_predictions(out / f / "val_predictions.csv", run.classes) for f in
           ("fold-1", "fold-2")]
    assert paths == oof[0][0] + oof[1][0] and len(set(paths)) == 24  # every image, once
    np.testing.assert_array_equal(probs, np.concatenate([o[2] for o in oof]))
    pos = run.info.positive
    assert read_threshold(out) == choose_threshold(y == pos, probs[:, pos],
                                                   run.config.threshold_rule,
                                                   run.config.target_sensitivity)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble"]["scored_by"] == "out-of-fold member"
    assert "no held-out images" in metrics["selection_biased"]
    # every image trained one of the members: evaluate must treat all as training images
    with (out / "digests.csv").open() as f:
        train = {r["path"] for r in csv.DictReader(f) if r["split"] == "train"}
    assert train == set(paths)
    with pytest.raises(CxrlabError, match="all 24 images are the run's own training images"):
        cxrlab.load(out).evaluate(ensembles["data"])
    cv = cxrlab.CrossVal(json.loads((out / "crossval.json").read_text()), out)  # train(folds=2)
    assert [r.path.name for r in cv.runs] == ["fold-1", "fold-2"]
    assert cv.ensemble.path == out and cv.ensemble.threshold == read_threshold(out)


def test_evaluate_predict_gradcam_report_take_the_ensemble(ensembles):
    out = ensembles["seeds"]
    run = cxrlab.load(out)
    members = [load_run(out / m) for m in ("seed-1", "seed-2")]
    files = sorted(ensembles["held"].rglob("*.png"))
    rows = run.predict(files[:4])
    images = _images(members[0], [str(p) for p in files[:4]])
    mean = np.mean([predict_probs(m.model, images) for m in members], axis=0)
    got = np.array([[r["probabilities"][c] for c in run.classes] for r in rows])
    np.testing.assert_allclose(got, mean, atol=1e-6)
    metrics = run.evaluate(ensembles["held"], save=False)
    assert metrics["n"] == 24 and metrics["roc_auc"] > 0.5
    heat = run.gradcam(files[0])  # the mean of the members' maps, each peak 1, peak 1 again
    maps = np.stack([gradcam(m.model, images[:1], positive=1)[0] for m in members])
    mean_map = maps.mean(0)
    expect = mean_map / mean_map.max() if mean_map.max() > 0 else mean_map
    assert heat.shape == (32, 32)
    np.testing.assert_allclose(heat, expect, atol=1e-5)
    report = run.report(out.parent / "seeds-report.html")
    assert "An ensemble (seeds): the mean probability of 2 runs, seed-1, seed-2" in \
        report.read_text()


def test_onnx_export_is_one_graph_matching_torch(ensembles, tmp_path):
    import onnx

    from cxrlab.deploy.export import OnnxPredictor, export_onnx

    run = load_run(ensembles["folds"])
    path = export_onnx(run, tmp_path / "ensemble.onnx")
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["image"]
    images = _images(run, [str(p) for p in sorted(ensembles["held"].rglob("*.png"))])
    np.testing.assert_allclose(OnnxPredictor(path)(images), predict_probs(run.model, images),
                               atol=1e-5)


def test_calibrate_maps_the_ensembles_logit(ensembles, tmp_path):
    from cxrlab.site.calibration import calibrate_run

    out = ensembles["seeds"]
    result = calibrate_run(out, ensembles["held"], tmp_path / "cal", n_boot=200)
    new, old = load_run(tmp_path / "cal"), load_run(out)
    assert isinstance(new.model, EnsembleModel)
    assert json.loads((tmp_path / "cal" / "run.json").read_text())["ensemble"]["kind"] == "seeds"
    images = _images(old, [str(p) for p in sorted(ensembles["held"].rglob("*.png"))])
    p, q = predict_probs(old.model, images)[:, 1], predict_probs(new.model, images)[:, 1]
    z = np.log(p) - np.log1p(-p)
    expect = 1 / (1 + np.exp(-(result["a"] * z + result["b"])))
    np.testing.assert_allclose(q, expect, atol=1e-5)


def test_continuing_a_complete_ensemble_keeps_it(ensembles, capsys, monkeypatch):
    out = ensembles["seeds"]
    before = (out / "model.pt").stat().st_mtime_ns
    code, so, err = run_cli(["train", "--resume", out], capsys, monkeypatch)
    assert code == 0, err
    assert "Run written to" in so and (out / "model.pt").stat().st_mtime_ns == before
    code, _, err = run_cli(["train", ensembles["data"], "--out", out.parent / "x", "--seeds", "2",
                            "--folds", "2", "--epochs", "1"], capsys, monkeypatch)
    assert code == 2 and "--seeds and --folds" in err and not (out.parent / "x").exists()
    assert isinstance(cxrlab.load(out), cxrlab.Run)


@pytest.mark.parametrize("k", [1, 3])
def test_ensemble_model_averages_probabilities_stably_in_torch_and_onnx(k, tmp_path):
    import onnxruntime as ort

    from cxrlab.deploy.export import ProbabilityModel

    torch.manual_seed(0)
    members = [create_model("cnn", k, 1, image_size=32).eval() for _ in range(3)]
    with torch.no_grad():  # a member sure beyond float32's reach: -inf / nan must not appear
        members[2].fc.bias.copy_(torch.linspace(-300.0, 300.0, k))
    model = ProbabilityModel(EnsembleModel(members).eval()).eval()
    x = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        got = model(x).numpy()
        each = [ProbabilityModel(m)(x).numpy() for m in members]
    np.testing.assert_allclose(got, np.mean(each, axis=0), atol=1e-6)
    torch.onnx.export(model, (x,), tmp_path / "e.onnx", dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["p"])
    onnx_p = ort.InferenceSession(str(tmp_path / "e.onnx")).run(None, {"image": x.numpy()})[0]
    assert np.isfinite(onnx_p).all()
    np.testing.assert_allclose(onnx_p, got, atol=1e-5)


def test_seeds_members_train_a_small_sets_recipe_as_a_single_run_would(tmp_path):
    # members' configurations name every field, which turns training/small_sets.py's rule off
    # for each of them; the ensemble decides it once, on the members' one split
    from cxrlab.data.sources import load_source
    from cxrlab.data.split import assign_splits
    from cxrlab.models import starts_pretrained
    from cxrlab.training.ensemble import small_set_for_seeds

    if not starts_pretrained("efficientnet_lite0", None):
        pytest.skip("the packaged ImageNet weights are not installed")
    data = make_kermany_folder(tmp_path / "data", 10, 10, size=16)
    cfg = RunConfig.build({"data": str(data), "seeds": 3, "seed": 4})
    chosen = small_set_for_seeds(cfg)
    n_train = assign_splits(load_source(data), cfg.val_fraction, 4).splits.count("train")
    assert chosen is not None and chosen.n_train == n_train
    assert small_set_for_seeds(RunConfig.build({"data": str(data), "seeds": 3,
                                                "epochs": 2})) is None  # the length chosen
