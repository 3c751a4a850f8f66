"""Adapting a run to an intake without labels (cxrlab.site.adapt, `cxrlab adapt`): a tiny run
trained on synthetic films, adapted on the demo's real test films (120, in class folders)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cxrlab
from cxrlab.data.cache import load_images
from cxrlab.deploy.inference import decide, predict_probs
from cxrlab.deploy.predict import expand_paths
from cxrlab.errors import CxrlabError
from cxrlab.run import load_run
from cxrlab.site import adapt as ad
from tests.conftest import make_kermany_folder
from tests.site.test_calibration import train

INTAKE = cxrlab.demo_data() / "test"  # NORMAL/ then PNEUMONIA/: class-sorted, as folders are


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    run = train(make_kermany_folder(root / "data", 24, 24, size=48), root / "run")
    new = root / "adapted"
    r = ad.adapt_run(run, INTAKE, new, bn=True, prevalence=True, n_boot=100)
    return {"root": root, "run": run, "new": new, "r": r}


def test_em_recovers_a_known_prevalence():
    """Posteriors calibrated for a 0.7 prior, on a sample whose true prevalence is 0.3."""
    rng = np.random.default_rng(0)
    y = rng.random(20000) < 0.3
    z = np.where(y, rng.normal(1.0, 1, y.size), rng.normal(-1.0, 1, y.size))
    post = 1 / (1 + np.exp(-(2 * z + np.log(0.7 / 0.3))))  # log LR = 2z for these normals
    assert abs(post.mean() - 0.3) > 0.1  # the naive estimate is far off
    assert ad.em_prevalence(post, 0.7) == pytest.approx(y.mean(), abs=0.015)


def test_threshold_moves_with_the_prior_odds():
    t = ad.shifted_threshold(0.4, a=2.0, source_prior=0.75, prevalence=0.75)
    assert t == pytest.approx(0.4)
    lower = ad.shifted_threshold(0.4, a=2.0, source_prior=0.75, prevalence=0.5)
    z = np.log(0.4 / 0.6) + np.log(3) / 2  # logit t + log(odds ratio) / a
    assert lower == pytest.approx(1 / (1 + np.exp(-z)))  # fewer positives expected: higher


def test_class_sorted_images_are_batched_mixed():
    """A class folder lists one class, then the other: batched in that order, every batch is
    one class's (the trap); shuffled first, each batch holds both near the overall share."""
    y = np.repeat([0, 1], [300, 500])  # as expand_paths lists NORMAL/ then PNEUMONIA/
    mixed = [y[b].mean() for b in ad.batches(len(y), 64, seed=0)]
    pure = [y[b].mean() for b in ad.batches(len(y), 64, shuffle=False)]
    assert all(0.4 < m < 0.85 for m in mixed) and len(mixed) == 13
    assert sum(m in (0.0, 1.0) for m in pure) >= 11
    assert sorted(np.concatenate(ad.batches(len(y), 64, seed=0))) == list(range(len(y)))


def test_statistics_do_not_depend_on_the_folder_order(site):
    """The demo's class-sorted films give the statistics of the same films listed shuffled,
    within the noise of which films share a batch."""
    run = load_run(site["run"])
    files = expand_paths([INTAKE])  # NORMAL first, then PNEUMONIA
    images, _ = load_images(files, run.config.image_size, run.info.in_chans)
    perm = np.random.default_rng(5).permutation(len(images))
    a = ad.intake_statistics(run.model, images, batch_size=60, seed=0)
    b = ad.intake_statistics(run.model, images[perm], batch_size=60, seed=0)
    source = ad.statistics(run.model)

    def gap(x, y, i):  # mean over layers of the relative change of the means / variances
        return float(np.mean([float((x[k][i] - y[k][i]).norm() / y[k][i].norm()) for k in x]))

    for i in (0, 1):
        assert gap(a, b, i) < 0.1
        assert gap(a, b, i) < 0.5 * gap(source, b, i)  # the intake's own, not the run's


def test_too_few_images_are_refused_and_nothing_written(site, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(CxrlabError, match="at least 100"):
        ad.adapt_run(site["run"], INTAKE / "NORMAL", out, prevalence=True)  # 60 images
    assert not out.exists() and not list(tmp_path.iterdir())


def test_adapted_run_is_complete_and_usable(site):
    from cxrlab.api import Run

    new, r = site["new"], site["r"]
    info = json.loads((new / "run.json").read_text())["site_adaptation"]
    assert info["n_images"] == 120 and info["data"] == str(INTAKE.resolve())
    assert info["batchnorm"]["layers"] > 0
    digests = (new / "digests.csv").read_text().splitlines()
    assert sum(",adaptation," in line for line in digests) == 120
    old, ad_run = load_run(site["run"]), load_run(new)
    frozen = old.config.frozen_stages
    trained = {n for n, _ in ad.batchnorms(old.model, frozen)}
    assert frozen and info["batchnorm"]["layers"] == len(trained) > 0
    for name, bn in ad.batchnorms(old.model):  # the frozen stages keep their statistics
        same = torch.equal(bn.running_var, ad_run.model.get_submodule(name).running_var)
        assert same == (name not in trained), name
    assert ad_run.threshold == pytest.approx(r["prevalence"]["threshold_after"])
    m = Run(new).evaluate(INTAKE)
    assert m["n"] == 120 and 0 <= m["accuracy"] <= 1
    # scored on the very films it adapted to: said, not passed off as held-out evidence
    assert len(m["overlap"]["adaptation_sample"]) == 120
    assert "adapted to them without labels" in m["selection_biased"]
    rows = Run(new).predict(INTAKE / "NORMAL" / sorted(p.name for p in
                                                      (INTAKE / "NORMAL").iterdir())[0])
    assert rows[0]["class"] in ("NORMAL", "PNEUMONIA")


def test_what_changed_is_what_the_two_runs_decide(site):
    """decisions_moved counts the films whose decision differs between the original run and
    the adapted one, each at its own threshold, in each direction."""
    old, new, r = load_run(site["run"]), load_run(site["new"]), site["r"]
    files = expand_paths([INTAKE])
    images, _ = load_images(files, old.config.image_size, old.info.in_chans)
    pos = old.info.positive
    before = decide(predict_probs(old.model, images), pos, old.threshold)
    after = decide(predict_probs(new.model, images), pos, new.threshold)
    want = {"NORMAL->PNEUMONIA": int(((before == 0) & (after == 1)).sum()),
            "PNEUMONIA->NORMAL": int(((before == 1) & (after == 0)).sum())}
    assert r["decisions_moved"] == {k: v for k, v in want.items() if v}
    assert r["n_moved"] == sum(want.values())
    text = ad.describe(r)
    assert f"{r['prevalence']['estimated']:.3f}" in text and f"moved: {r['n_moved']}" in text


def test_report_says_what_was_adapted(site, tmp_path):
    from cxrlab.reporting.report import write_report

    r = site["r"]
    page = write_report(site["new"], tmp_path / "adapted.html").read_text()
    assert 'id="site-adaptation"' in page
    assert f"Adapted on {r['n_images']} unlabelled images" in page
    assert f"{r['prevalence']['estimated']:.3f}" in page
    assert f"that moved: {r['n_moved']} " in page
    # the original run has no such section
    assert 'id="site-adaptation"' not in write_report(site["run"], tmp_path / "o.html").read_text()


def test_cli_adapt_prints_what_changed_and_refuses_small_sets(site, tmp_path, capsys,
                                                             monkeypatch):
    from tests.test_cli import assert_user_error, run_cli

    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "cli"
    code, _, err = run_cli(["adapt", site["run"], INTAKE, "--out", out], capsys, monkeypatch)
    assert_user_error(code, err, "choose --bn and/or --prevalence")  # no measured default
    assert not out.exists()
    code, text, err = run_cli(["adapt", site["run"], INTAKE, "--out", out, "--prevalence"],
                              capsys, monkeypatch)
    assert code == 0, err
    text = " ".join(text.split())
    assert "Estimated prevalence of PNEUMONIA" in text and "Decisions on these images moved" \
        in text
    info = json.loads((out / "run.json").read_text())["site_adaptation"]
    assert info["batchnorm"] is None and info["prevalence"]["estimated"] > 0
    bad = tmp_path / "bad"
    code, _, err = run_cli(["adapt", site["run"], INTAKE / "PNEUMONIA", "--out", bad, "--bn"],
                           capsys, monkeypatch)
    assert_user_error(code, err, "at least 100")
    assert not bad.exists()
