"""Intake shift: the stress test (cxrlab.site.shift), the intake check (cxrlab.site.intake) and site
calibration (cxrlab.site.calibration), on real X-rays and on a tiny trained run."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab.data.cache import load_images
from cxrlab.data.images import read_image
from cxrlab.site import intake, shift
from tests.conftest import make_kermany_folder
from tests.test_cli import assert_user_error, run_cli


def real_paths(shared_data: Path, n: int, offset: int = 0) -> list[Path]:
    root = shared_data / "chest_xray" / "train"
    return [p for c in ("NORMAL", "PNEUMONIA")
            for p in sorted((root / c).glob("*.jpeg"))[offset:offset + n]]


def shifted_copy(src: Path, dst: Path, name: str, severity: int) -> Path:
    """Every image of a folder tree, shifted at its own size, written under dst."""
    for p in sorted(src.rglob("*")):
        if p.suffix.lower() not in (".png", ".jpeg", ".jpg"):
            continue
        a = read_image(p, 1, None)[None]
        q = dst / p.relative_to(src).with_suffix(".png")
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shift.apply_shift(a, name, severity)[0, 0]).save(q)
    return dst


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------
# the shifts themselves, on real films


def test_shifts_are_pure_graded_and_seeded(shared_data):
    images, _ = load_images(real_paths(shared_data, 4), 64, 1, cache_dir=None)
    before = images.copy()
    for name in shift.SHIFTS:
        dist = []
        for sev in (1, 2, 3):
            out = shift.apply_shift(images, name, sev, seed=3)
            assert out.dtype == np.uint8 and out.shape == images.shape, name
            assert np.array_equal(out, shift.apply_shift(images, name, sev, seed=3)), name
            dist.append(np.abs(out.astype(float) - images).mean())
        assert 0 < dist[0] < dist[1] < dist[2], (name, dist)  # graded: more severe, further
    assert np.array_equal(images, before)  # never in place
    a, b = (shift.apply_shift(images, "noise", 2, seed=s) for s in (0, 1))
    assert not np.array_equal(a, b)
    # what each shift is: darker, flatter, framed
    assert shift.apply_shift(images, "gamma", 3).mean() < images.mean() - 20
    assert shift.apply_shift(images, "contrast", 3).std() < 0.5 * images.std()
    framed = shift.apply_shift(images, "border", 2)
    assert (framed[..., :5, :] == 0).all() and (framed[..., :, -5:] == 0).all()


def test_stress_test_scores_each_shift_through_the_given_predictor():
    """Three classes, a predictor that reads brightness: darker shifts hurt, others less."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 6)
    images = np.clip(rng.normal(60 + 60 * y, 8)[:, None, None, None]
                     + np.zeros((1, 1, 16, 16)), 0, 255).astype(np.uint8)

    def predict(x: np.ndarray) -> np.ndarray:
        m = x.reshape(len(x), -1).mean(1, keepdims=True)
        logits = -((m - np.array([60, 120, 180])) / 20) ** 2
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    r = shift.stress_test(predict, images, y, None, None, shifts=["gamma", "noise"])
    assert r["baseline"]["accuracy"] == 1.0 and r["baseline"]["sensitivity"] is None
    acc = {(x["shift"], x["severity"]): x["accuracy"] for x in r["rows"]}
    assert acc[("gamma", 3)] < acc[("gamma", 1)] <= 1.0
    assert acc[("noise", 1)] == 1.0


def test_platt_and_temperature_undo_a_known_miscalibration():
    from cxrlab.site.calibration import _logit, apply_binary, platt, temperature

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-z))  # calibrated logits z
    a, b = platt(3 * z - 2, y)  # the model reports 3z - 2
    assert a == pytest.approx(1 / 3, abs=0.03) and b == pytest.approx(2 / 3, abs=0.1)
    p = np.stack([1 - 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(-z))], 1)
    assert np.allclose(apply_binary(p, 1, 1.0, 0.0), p, atol=1e-6)
    assert np.allclose(_logit(apply_binary(p, 1, 2.0, 1.0)[:, 1]), 2 * z + 1, atol=1e-3)
    logits = rng.normal(0, 1, (3000, 3))
    labels = np.array([rng.choice(3, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    over = 2.5 * logits  # over-confident by 2.5
    t = temperature(over - np.log(np.exp(over).sum(1, keepdims=True)), labels)
    assert t == pytest.approx(2.5, rel=0.15)


# ---------------------------------------------------------------------------------------
# intake statistics on real films and shifted copies of them


@pytest.fixture(scope="module")
def real_reference(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "chest_xray" / "train").is_dir():
        pytest.skip("../shared/data is not present")
    paths = real_paths(SHARED_DATA, 16)
    images, _ = load_images(paths, 64, 1, cache_dir=None)
    return intake.reference(images, paths)


@pytest.mark.parametrize("name,severity,flagged", [
    (None, 0, set()), ("gamma", 3, {"mean"}), ("border", 2, {"border"})])
def test_intake_flags_shifted_real_images(shared_data, real_reference, tmp_path, name,
                                          severity, flagged):
    src = tmp_path / "new"
    for p in real_paths(shared_data, 8, offset=16):  # other films than the reference's
        (src / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, src / p.parent.name / p.name)
    new = shifted_copy(src, tmp_path / "shifted", name, severity) if name else src
    paths = sorted(p for p in new.rglob("*") if p.is_file())
    images, _ = load_images(paths, 64, 1, cache_dir=None)
    result = intake.compare(real_reference["stats"], intake.all_stats(images, paths))
    differs = {k for k, r in result.items() if r["differs"]}
    assert flagged <= differs, result
    if not flagged:
        assert differs == set(), result
    assert {"width", "height", "aspect"} & differs == set()  # shifted at their own size


# ---------------------------------------------------------------------------------------
# a tiny trained run: evaluate (intake check, --shift), report, calibrate


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A run that has learnt the synthetic task, and a new site's sample and held-out images
    (flat films: contrast x0.4) on which its threshold calls normals positive."""
    from cxrlab.config import RunConfig
    from cxrlab.training.lifecycle import train_run

    root = tmp_path_factory.mktemp("site")
    data = make_kermany_folder(root / "data", 24, 24, size=48)
    cfg = RunConfig.build(dict(data=str(data), model="efficientnet_lite0", image_size=32,
                               batch_size=16, epochs=3, lr=3e-2, freeze_backbone=True,
                               augment="none"), source="option")
    run = root / "run"
    train_run(cfg, run, progress=False)
    new = make_kermany_folder(root / "new", 12, 12, size=48, seed=1)
    held = make_kermany_folder(root / "held", 16, 16, size=48, seed=2)
    return {"run": run, "new": new,
            "sample": shifted_copy(new, root / "sample_flat", "contrast", 3),
            "held": shifted_copy(held, root / "held_flat", "contrast", 3)}


def intake_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.getMessage().startswith("intake:")]


def test_intake_reference_is_written_at_training_and_lazily(site, tmp_path):
    from cxrlab.run import load_run

    ref = json.loads((site["run"] / "intake.json").read_text())
    assert ref["n_images"] == 48 and set(ref["stats"]) >= {"mean", "std", "border", "width"}
    old = tmp_path / "old"
    shutil.copytree(site["run"], old, ignore=shutil.ignore_patterns("intake.json"))
    assert intake.load_reference(load_run(old)) == ref  # recomputed from split.csv
    assert json.loads((old / "intake.json").read_text()) == ref


def test_evaluate_checks_intake_and_stress_tests(site, tmp_path, capsys, monkeypatch, caplog):
    run = site["run"]
    js = tmp_path / "m.json"
    code, _, err = run_cli(["evaluate", run, site["new"], "--json", js], capsys, monkeypatch)
    assert code == 0, err
    m = json.loads(js.read_text())
    assert m["intake"]["warnings"] == [] and intake_warnings(caplog) == []
    assert not (run / shift.RESULT_JSON).exists()  # written only when asked

    caplog.clear()
    code, out, err = run_cli(["evaluate", run, site["held"], "--json", js, "--shift"],
                             capsys, monkeypatch)
    assert code == 0, err
    warned = intake_warnings(caplog)
    assert any("contrast" in w for w in warned), warned
    assert all("\n" not in w for w in warned)
    m = json.loads(js.read_text())
    assert m["intake"]["warnings"] == warned
    s = m["shift"]
    assert s["n"] == 32 and len(s["rows"]) == 3 * len(shift.SHIFTS)
    assert s["baseline"]["specificity"] == pytest.approx(m["specificity"])
    assert s["baseline"]["sensitivity"] == pytest.approx(m["recall"])
    assert "Stress test" in out and "gamma" in out
    assert json.loads((run / shift.RESULT_JSON).read_text()) == s
    assert Image.open(run / shift.RESULT_PNG).size[0] > 400

    from cxrlab.reporting.report import write_report

    page = write_report(run, tmp_path / "r.html").read_text()
    assert 'id="shift"' in page and "Stress test" in page
    (run / shift.RESULT_JSON).unlink()
    (run / shift.RESULT_PNG).unlink()


def test_the_stress_test_shows_its_progress_at_a_terminal_only(site, tmp_path):
    """A full set's stress test is minutes of scoring: a person at a terminal sees which
    shift it is on (stderr); what goes to a file (stdout here) holds only the results."""
    import os
    import pty
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(site["run"], run)
    leader, follower = pty.openpty()
    with (tmp_path / "out.txt").open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cxrlab.cli", "evaluate", run, site["held"], "--shift"],
            stdout=out, stderr=follower, env={**os.environ, "COLUMNS": "120"})
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")
    os.close(leader)
    terminal = seen.decode(errors="replace")
    assert "stress test: 32 images" in terminal, terminal
    stdout = (tmp_path / "out.txt").read_text()
    assert "Stress test (32 images" in stdout and "stress test: 32" not in stdout


def balanced(m: dict) -> float:
    return (m["recall"] + m["specificity"]) / 2


def test_calibrate_moves_the_threshold_for_the_new_site(site, tmp_path, capsys, monkeypatch):
    from cxrlab.deploy.inference import predict_probs
    from cxrlab.deploy.predict import predict_paths
    from cxrlab.run import load_run
    from cxrlab.site.assess import evaluate_run
    from cxrlab.site.calibration import apply_binary

    run, new_run = site["run"], tmp_path / "site_run"
    before = tree_digest(run)
    code, out, err = run_cli(["calibrate", run, site["sample"], "--out", new_run, "--boot", "200"],
                             capsys, monkeypatch)
    assert code == 0, err
    assert "Threshold" in out and str(new_run) in out.replace("\n", "")
    assert tree_digest(run) == before  # the original run is untouched

    cal = json.loads((new_run / "run.json").read_text())["site_calibration"]
    assert cal["n_per_class"] == {"NORMAL": 12, "PNEUMONIA": 12}
    assert cal["calibrated_from"] == str(run.resolve()) and cal["data"].endswith("sample_flat")
    lo, hi = cal["threshold_ci"]
    assert lo <= cal["threshold"] <= hi
    assert not lo <= cal["original_threshold_rescaled"] <= hi  # the old threshold is off here
    new_t = float((new_run / "threshold").read_text())
    assert new_t == cal["threshold"]
    assert json.loads((new_run / "metrics.json").read_text())["threshold"] == new_t

    # held-out images of the same site: better balanced accuracy than the original run's
    old_m = evaluate_run(run, site["held"], n_boot=100)
    new_m = evaluate_run(new_run, site["held"], n_boot=100)
    assert balanced(new_m) >= balanced(old_m) + 0.1, (balanced(old_m), balanced(new_m))
    assert new_m["roc_auc"] == pytest.approx(old_m["roc_auc"], abs=1e-6)  # ranking kept

    # the calibration lives in model.pt: every inference path (here predict) applies it
    files = sorted((site["sample"] / "NORMAL").iterdir())[:4]
    rows = predict_paths(new_run, files)
    orig = load_run(run)
    imgs, _ = load_images(files, orig.config.image_size, orig.info.in_chans)
    expect = apply_binary(predict_probs(orig.model, imgs), 1, cal["a"], cal["b"])
    got = np.array([[r["probabilities"][c] for c in ("NORMAL", "PNEUMONIA")] for r in rows])
    assert np.allclose(got, expect, atol=1e-4)
    assert all(r["threshold"] == new_t for r in rows)

    from cxrlab.reporting.report import load_run_data, shift_sections

    (sid, _, body), = shift_sections(load_run_data(new_run))  # the report says where from
    assert sid == "site-calibration" and "sample_flat" in body


def test_calibrate_refuses_without_writing(site, tmp_path, capsys, monkeypatch):
    few = tmp_path / "few"
    shutil.copytree(site["sample"], few)
    for p in sorted((few / "PNEUMONIA").iterdir())[:3]:
        p.unlink()
    out = tmp_path / "new_run"
    code, _, err = run_cli(["calibrate", site["run"], few, "--out", out], capsys, monkeypatch)
    assert_user_error(code, err, "9 PNEUMONIA", "at least 10")
    assert not out.exists()

    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(["calibrate", site["run"], site["sample"], "--out", out],
                           capsys, monkeypatch)
    assert_user_error(code, err, "not empty")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few", "new_run"]  # no leftovers
