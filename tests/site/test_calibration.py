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
    r = calibrate_run(run, sample, new, n_boot=200)
    return {"run": run, "sample": sample, "new": new, "result": r}


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


def test_python_api_calibrates_like_the_command(normal_positive, tmp_path):
    """cxrlab.calibrate is calibrate_run with the same defaults: the same threshold and map."""
    import cxrlab

    run = cxrlab.calibrate(normal_positive["run"], normal_positive["sample"], tmp_path / "api",
                           n_boot=200)
    cal = json.loads((tmp_path / "api" / "run.json").read_text())["site_calibration"]
    want = normal_positive["result"]
    assert run.threshold == want["threshold"] == cal["threshold"]
    assert (cal["a"], cal["b"]) == (want["a"], want["b"])


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
    monkeypatch.setitem(site_calibration.REFITS, "intercept", lambda z, is_pos: (0.3, 0.1))
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


def test_refit_interval_is_reported(normal_positive):
    """The map's and the threshold's patient-bootstrap intervals: in the summary calibrate
    prints, in NEW/metrics.json and in run.json."""
    from cxrlab.site.calibration import describe

    r, new = normal_positive["result"], normal_positive["new"]
    assert r["method"] == "intercept" and r["a"] == 1.0 and r["a_ci"] == [1.0, 1.0]
    blo, bhi = r["b_ci"]
    assert blo < r["b"] < bhi and bhi - blo > 0.01, r["b_ci"]
    lo, hi = r["threshold_ci"]
    assert lo <= r["threshold"] <= hi
    text = describe(r)
    assert f"intercept {blo:.3g}-{bhi:.3g}" in text and f"95% interval {lo:.4g}-{hi:.4g}" in text
    assert "patient bootstrap (6 patients)" in text
    metrics = json.loads((new / "metrics.json").read_text())["site_calibration"]
    assert metrics["b_ci"] == r["b_ci"] and metrics["threshold_ci"] == r["threshold_ci"]
    assert metrics["threshold_rule"] == "keep-sensitivity"
    from cxrlab.reporting.report import fmt_ci, load_run_data, shift_sections

    (_, _, body), = shift_sections(load_run_data(new))
    assert f"b = {r['b']:.3f} [{fmt_ci(r['b_ci'])}]" in body
    # the default target is the run's own validation sensitivity at its threshold
    paths, vy, vp = read_predictions(normal_positive["run"] / "val_predictions.csv",
                                     ["NORMAL", "PNEUMONIA"])
    t = float((normal_positive["run"] / "threshold").read_text())
    assert metrics["target_sensitivity"] == pytest.approx((vp[vy == 0, 0] >= t).mean())


def test_conservative_refit_keeps_sensitivity_where_platt_youden_drops_it():
    """A small sample of a site whose normal films score high (as under tighter framing):
    Youden's J on it (the old default) trades away positives for specificity; keeping the
    sensitivity puts the threshold below every positive film the sample shows. Scored on many
    more films of the same site, the old rule misses positives the new one keeps."""
    from cxrlab.evaluation.metrics import choose_threshold
    from cxrlab.site.calibration import REFITS, _sigmoid, site_threshold

    rng = np.random.default_rng(0)

    def site(n_pos: int, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
        z = np.concatenate([rng.normal(4, 2, n_pos), rng.normal(-1, 1.5, n_neg)])
        return z, np.arange(n_pos + n_neg) < n_pos

    z, is_pos = site(25, 15)
    zt, yt = site(20000, 20000)
    sens = {}
    for refit, rule in (("platt", "youden"), ("intercept", "keep-sensitivity"),
                        ("shrink", "keep-sensitivity")):
        a, b = REFITS[refit](z, is_pos)
        t = site_threshold(is_pos, _sigmoid(a * z + b), rule, 0.98, 0.9)
        sens[refit] = float((_sigmoid(a * zt[yt] + b) >= t).mean())
        if rule == "keep-sensitivity":  # 25 positives cannot show 0.98: below the lowest
            assert (_sigmoid(a * z[is_pos] + b) >= t).all()
    assert choose_threshold(is_pos, z, "youden") > z[is_pos].min()  # Youden passes positives
    assert sens["platt"] < 0.93 and sens["intercept"] > 0.96, sens
    assert sens["shrink"] == pytest.approx(sens["intercept"], abs=0.01)


def test_intercept_and_shrinkage_against_hand_computation():
    from scipy.special import expit, logit

    from cxrlab.site.calibration import intercept_only, platt, shrunk_platt

    # one score for every film: the shift that makes it the sample's share of positives
    z, y = np.full(10, 0.5), np.arange(10) < 3
    assert intercept_only(z, y) == pytest.approx((1.0, logit(0.3) - 0.5), abs=1e-9)
    # in general the score equation: the mean shifted probability is the share of positives
    rng = np.random.default_rng(1)
    z, y = rng.normal(0, 3, 50), rng.random(50) < 0.6
    a, b = intercept_only(z, y)
    assert a == 1.0 and expit(z + b).sum() == pytest.approx(y.sum(), abs=1e-8)

    # shrinkage with every score 0: the slope has no evidence and stays the run's 1; the
    # intercept solves 10 (sigmoid(b) - 0.3) + b / 1^2 = 0, between 0 and logit(0.3)
    a, b = shrunk_platt(np.zeros(10), np.arange(10) < 3, prior_sd=(0.25, 1.0))
    assert a == pytest.approx(1.0, abs=1e-6)
    assert 10 * (expit(b) - 0.3) + b == pytest.approx(0, abs=1e-5)
    assert logit(0.3) < b < 0
    # much evidence: the prior stops mattering (plain maximum likelihood, Platt)
    z = rng.normal(0, 2, 20000)
    y = rng.random(20000) < expit(2 * z - 1)
    assert shrunk_platt(z, y) == pytest.approx(platt(z, y), abs=0.02)
    assert shrunk_platt(z, y) == pytest.approx((2, -1), abs=0.1)


def test_keep_sensitivity_threshold_is_the_clopper_pearson_margin():
    """Positives scored 1, 2, 3 ..., negatives below. The threshold may pass m positives when
    m misses in n still exclude a miss rate of 5% at 90% confidence, P(X <= m) < 0.1 for
    X ~ Binomial(n, 0.05): with 60 positives none (0.95^60 = 0.046), so it sits below the
    lowest; with 100 one (0.95^100 + 100 * 0.05 * 0.95^99 = 0.037, but adding two misses' term
    gives 0.118), so it sits halfway between the two lowest (choose_threshold's midpoint)."""
    from math import comb

    from cxrlab.site.calibration import keep_sensitivity_threshold

    def p_at_most(m: int, n: int) -> float:
        return sum(comb(n, k) * 0.05**k * 0.95 ** (n - k) for k in range(m + 1))

    def sample(n_pos: int) -> tuple[np.ndarray, np.ndarray]:
        score = np.concatenate([np.arange(1.0, n_pos + 1), np.linspace(-5, 0.5, 30)])
        return np.arange(len(score)) < n_pos, score

    assert p_at_most(0, 60) < 0.1 < p_at_most(1, 60)
    assert keep_sensitivity_threshold(*sample(60), 0.95, 0.9) == ((1 + 0.5) / 2, True)
    assert p_at_most(1, 100) < 0.1 < p_at_most(2, 100)
    assert keep_sensitivity_threshold(*sample(100), 0.95, 0.9) == ((2 + 1) / 2, True)
    # lower confidence allows more misses; a target 60 films cannot show: below them all
    assert keep_sensitivity_threshold(*sample(60), 0.95, 0.5)[0] > 1
    assert keep_sensitivity_threshold(*sample(60), 0.99, 0.9) == ((1 + 0.5) / 2, False)


@pytest.mark.parametrize("option, value", [("refit", "isotonic"), ("rule", "f1"),
                                           ("target_sensitivity", 1.5), ("confidence", 1.0)])
def test_bad_options_are_refused_before_any_work(tmp_path, option, value):
    from cxrlab.errors import CxrlabError
    from cxrlab.site.calibration import calibrate_run

    flag = "--" + option.replace("_", "-")
    with pytest.raises(CxrlabError, match=flag):
        calibrate_run(tmp_path / "no-run", tmp_path / "no-data", tmp_path / "out",
                      **{option: value})
    assert not (tmp_path / "out").exists()
