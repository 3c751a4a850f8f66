"""Site calibration (cxrlab.site.calibration) on tiny trained runs: the calibration folded into
model.pt agrees with the run's threshold and val_predictions.csv whichever class is positive
(and for K classes), and its intervals resample patients, as every other interval of a run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab.data.cache import load_images
from cxrlab.deploy.inference import decide, predict_probs
from cxrlab.run import load_run, read_predictions
from cxrlab.site.shift import apply_shift
from tests.conftest import make_kermany_folder, write_xray_like

# test_shift's site run: learns the synthetic task in seconds
TINY = dict(model="efficientnet_lite0", image_size=32, batch_size=16, epochs=3, lr=3e-2,
            freeze_backbone=True, augment="none")


def flat_copy(src: Path, dst: Path) -> Path:
    """The new site: every film of `src` with its contrast cut to 0.4 (scores move)."""
    for p in sorted(src.rglob("*.png")):
        a = np.asarray(Image.open(p))[None, None]
        q = dst / p.relative_to(src)
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(apply_shift(a, "contrast", 3)[0, 0]).save(q)
    return dst


def train(data: Path, out: Path, **extra) -> Path:
    from cxrlab.config import RunConfig
    from cxrlab.training.lifecycle import train_run

    cfg = RunConfig.build(dict(data=str(data), **TINY, **extra), source="option")
    train_run(cfg, out, progress=False)
    return out


@pytest.fixture(scope="module")
def normal_positive(tmp_path_factory):
    """A run whose positive class is NORMAL (class 0), calibrated on a flat-contrast sample
    with 4 films per patient."""
    from cxrlab.site.calibration import calibrate_run

    root = tmp_path_factory.mktemp("cal0")
    run = train(make_kermany_folder(root / "data", 24, 24, size=48), root / "run",
                positive="NORMAL")
    sample = flat_copy(make_kermany_folder(root / "new", 12, 12, size=48, seed=1,
                                           images_per_patient=4), root / "sample")
    new = root / "site_run"
    calibrate_run(run, sample, new, n_boot=200)
    return {"run": run, "sample": sample, "new": new}


def model_probs(run_dir: Path, paths: list) -> np.ndarray:
    """Probabilities through cxrlab's own loading and inference path."""
    run = load_run(run_dir)
    images, bad = load_images([Path(p) for p in paths], run.config.image_size,
                              run.info.in_chans, cache_dir=None)
    assert bad == []
    return predict_probs(run.model, images)


def test_positive_class_0_model_pt_agrees_with_threshold_and_predictions(normal_positive):
    from cxrlab.deploy.predict import predict_paths
    from cxrlab.site.assess import evaluate_run
    from cxrlab.site.calibration import apply_binary

    run, new, sample = normal_positive["run"], normal_positive["new"], normal_positive["sample"]
    info = json.loads((new / "run.json").read_text())
    assert info["positive_class"] == "NORMAL"
    cal = info["site_calibration"]
    assert abs(cal["b"]) > 0.05, cal  # an intercept: a wrong sign would show
    t = float((new / "threshold").read_text())
    assert t == cal["threshold"]

    # the sample through the new model.pt (predict) = the fitted map of the old model's scores
    files = sorted(sample.rglob("*.png"))
    rows = predict_paths(new, files)
    got = np.array([[r["probabilities"][c] for c in ("NORMAL", "PNEUMONIA")] for r in rows])
    expect = apply_binary(model_probs(run, files), 0, cal["a"], cal["b"])
    assert np.allclose(got, expect, atol=1e-4), np.abs(got - expect).max()

    # evaluate on the sample decides as calibrate did when it chose the threshold
    m = evaluate_run(new, sample, n_boot=100)
    assert m["threshold"] == t and m["positive_class"] == "NORMAL"
    assert (m["recall"] + m["specificity"]) / 2 == pytest.approx(
        cal["sample_balanced_accuracy_after"], abs=1e-12)

    # val_predictions.csv and metrics.json say what model.pt does on the validation films
    paths, vy, vp = read_predictions(new / "val_predictions.csv", ["NORMAL", "PNEUMONIA"])
    mp = model_probs(new, paths)
    assert np.allclose(mp, vp, atol=1e-4), np.abs(mp - vp).max()
    pred = decide(mp, 0, t)
    assert np.array_equal(pred, decide(vp, 0, t))
    cm = np.zeros((2, 2), dtype=int)
    np.add.at(cm, (vy, pred), 1)
    assert json.loads((new / "metrics.json").read_text())["confusion_matrix"] == cm.tolist()


def test_calibrated_intervals_resample_patients(normal_positive):
    run, new = normal_positive["run"], normal_positive["new"]
    before = json.loads((run / "metrics.json").read_text())
    after = json.loads((new / "metrics.json").read_text())
    assert before["interval_method"].startswith("patient bootstrap")
    assert after["interval_method"] == before["interval_method"]
    assert after["selection_biased"] == "the epoch was chosen on these images"
    cal = json.loads((new / "run.json").read_text())["site_calibration"]
    assert cal["threshold_ci_method"] == "patient bootstrap (6 patients)"  # 24 films, 4 each


def test_saturated_validation_scores_come_from_model_pt(normal_positive, tmp_path, monkeypatch):
    """A float32 score saturated at 0 or 1 in val_predictions.csv cannot be mapped through the
    calibration; the films are scored by model.pt instead."""
    import shutil

    import torch

    from cxrlab.run import write_predictions_csv
    from cxrlab.site import calibration as site_calibration

    classes = ["NORMAL", "PNEUMONIA"]
    sat = tmp_path / "sat"
    shutil.copytree(normal_positive["run"], sat)
    paths, vy, vp = read_predictions(sat / "val_predictions.csv", classes)
    k = 40 / np.abs(site_calibration._logit(vp[:, 1])).max()  # largest logit: 40
    state = torch.load(sat / "model.pt", weights_only=True)
    state["fc.weight"] *= k
    state["fc.bias"] *= k
    torch.save(state, sat / "model.pt")
    sp = model_probs(sat, paths)
    assert ((sp == 0) | (sp == 1)).any()
    write_predictions_csv(sat / "val_predictions.csv", paths, [classes[i] for i in vy], sp,
                          classes)

    # a fit that tames the confident scores (as at a site where the run is over-confident)
    monkeypatch.setattr(site_calibration, "platt", lambda z, is_pos: (0.3, 0.1))
    r = site_calibration.calibrate_run(sat, normal_positive["sample"], tmp_path / "a", n_boot=50)
    assert r["val_predictions"] == "validation images scored by the calibrated model.pt"
    _, _, got = read_predictions(tmp_path / "a" / "val_predictions.csv", classes)
    mp = model_probs(tmp_path / "a", paths)
    assert np.allclose(got, mp, atol=1e-5), np.abs(got - mp).max()

    # without the images (a copied run): the mapped CSV, and run.json says so
    monkeypatch.setattr(site_calibration, "_rescore", lambda *a: None)
    r = site_calibration.calibrate_run(sat, normal_positive["sample"], tmp_path / "b", n_boot=50)
    assert r["val_predictions"] == "the original's val_predictions.csv, mapped"
    _, _, mapped = read_predictions(tmp_path / "b" / "val_predictions.csv", classes)
    assert np.abs(mapped - mp).max() > 1e-3  # what re-scoring avoids


def test_threshold_interval_draws_whole_patients():
    from cxrlab.site.calibration import bootstrap_threshold

    # 4 positive and 4 negative patients of 8 films each, scored alike within a patient: the
    # threshold sits between the lowest positive and highest negative patient present. Drawing
    # films keeps every patient (a patient's 8 films all missed: p = 3e-4), so it hardly moves;
    # drawing patients moves it between them.
    rng = np.random.default_rng(0)
    centre = {"p0": .6, "p1": .7, "p2": .8, "p3": .9, "n0": .1, "n1": .2, "n2": .3, "n3": .4}
    groups = [g for g in centre for _ in range(8)]
    is_pos = np.array([g[0] == "p" for g in groups])
    score = np.array([centre[g] for g in groups]) + rng.normal(0, 0.005, len(groups))
    (plo, phi), how = bootstrap_threshold(is_pos, score, "youden", 0.95, 400, 0, groups)
    (ilo, ihi), flat = bootstrap_threshold(is_pos, score, "youden", 0.95, 400, 0)
    assert how == "patient bootstrap (8 patients)" and flat == "image bootstrap"
    assert phi - plo > 5 * (ihi - ilo), ((plo, phi), (ilo, ihi))
    # one film per patient: exactly the image bootstrap's resamples
    one_each = [f"q{i}" for i in range(len(groups))]
    assert bootstrap_threshold(is_pos, score, "youden", 0.95, 400, 0, one_each)[0] == [ilo, ihi]


def test_three_classes_temperature_lives_in_model_pt(tmp_path):
    from cxrlab.deploy.predict import predict_paths
    from cxrlab.site.calibration import apply_temperature, calibrate_run

    def folder(root: Path, n: int, seed: int) -> Path:
        rng = np.random.default_rng(seed)
        for c, (label, dark) in enumerate([(0, 0), (1, 0), (1, 1)]):
            for i in range(n):
                p = root / f"C{c}" / f"person{100 * c + i // 2}_x_{i}.png"
                write_xray_like(p, label, rng, 48)
                if dark:  # the third class: a blob on a darker film
                    a = np.asarray(Image.open(p)).astype(float) * 0.5
                    Image.fromarray(a.astype(np.uint8)).save(p)
        return root

    run = train(folder(tmp_path / "data", 16, 0), tmp_path / "run")
    sample = flat_copy(folder(tmp_path / "new", 10, 1), tmp_path / "sample")
    new = tmp_path / "site_run"
    r = calibrate_run(run, sample, new, n_boot=100)
    assert r["method"] == "temperature" and abs(np.log(r["temperature"])) > 0.05, r
    classes = ["C0", "C1", "C2"]
    files = sorted(sample.rglob("*.png"))
    got = np.array([[row["probabilities"][c] for c in classes]
                    for row in predict_paths(new, files)])
    expect = apply_temperature(model_probs(run, files), r["temperature"])
    assert np.allclose(got, expect, atol=1e-4), np.abs(got - expect).max()
    paths, vy, vp = read_predictions(new / "val_predictions.csv", classes)
    mp = model_probs(new, paths)
    assert np.allclose(mp, vp, atol=1e-4) and np.array_equal(mp.argmax(1), vp.argmax(1))
    after = json.loads((new / "metrics.json").read_text())
    assert after["interval_method"] == json.loads(
        (run / "metrics.json").read_text())["interval_method"]
    assert after["interval_method"].startswith("patient bootstrap")
