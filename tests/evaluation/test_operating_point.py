"""The threshold's stability: bootstrap interval, spread across folds / members, the warning,
and what a trained run records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cxrlab.evaluation.metrics import choose_threshold
from cxrlab.evaluation.operating_point import (
    UNSTABLE_POINTS,
    bootstrap_threshold,
    rates_at,
    span,
    threshold_spread,
    threshold_stability,
    warning,
)


def sparse_tails(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """60 patients a class, most scored far from the other class, a sparse tenth of each spread
    over a wide overlap: the rule's choice among the tails depends on which patients are drawn."""
    rng = np.random.default_rng(seed)
    neg = np.r_[rng.uniform(0.0, 0.05, 54), rng.uniform(0.1, 0.9, 6)]
    pos = np.r_[rng.uniform(0.95, 1.0, 54), rng.uniform(0.1, 0.9, 6)]
    return np.r_[np.zeros(60, bool), np.ones(60, bool)], np.r_[neg, pos]


def dense_separated(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """300 a class, separated: every resample finds the gap's edges in nearly the same place."""
    rng = np.random.default_rng(seed)
    return (np.r_[np.zeros(300, bool), np.ones(300, bool)],
            np.r_[rng.uniform(0.0, 0.4, 300), rng.uniform(0.6, 1.0, 300)])


def test_sparse_tails_give_a_wide_interval_and_a_warning():
    is_pos, score = sparse_tails()
    st = threshold_stability(is_pos, score, "youden", 0.95, n_boot=300)
    lo, hi = st["interval"]
    assert hi - lo > 0.3
    assert st["change_points"] > UNSTABLE_POINTS and st["unstable"]
    # what the ends decide is exactly what calling `score >= end` decides
    assert st["at_low"] == rates_at(is_pos, score, lo)
    assert st["at_low"]["sensitivity"] == pytest.approx((score[is_pos] >= lo).mean())
    assert st["at_low"]["sensitivity"] >= st["at_high"]["sensitivity"]
    text = warning(st)
    assert text and f"{lo:.3g}" in text and "unstable" in text


def test_a_validation_split_with_one_class_gives_null_rates_not_nan():
    """A tiny split (a handful of films, all pneumonia) has no specificity: the rates say
    null, metrics.json stays valid JSON (NaN is not), and the warning still reads."""
    score = np.array([0.2, 0.4, 0.6, 0.9])
    st = threshold_stability(np.ones(4, bool), score, "sensitivity", 0.97, n_boot=50)
    assert st["at_low"]["specificity"] is None and st["at_high"]["specificity"] is None
    assert st["at_low"]["sensitivity"] is not None
    json.dumps(st, allow_nan=False)
    wide = threshold_spread([0.1, 0.8], np.ones(4, bool), score)  # two members
    assert wide["unstable"] and wide["change_points"] == 75.0  # sensitivity 1.0 -> 0.25
    text = warning(wide)
    assert "specificity n/a -> n/a" in text and "sensitivity 1.000 -> 0.250" in text


def test_dense_separated_scores_are_stable_and_silent():
    is_pos, score = dense_separated()
    st = threshold_stability(is_pos, score, "youden", 0.95, n_boot=300)
    lo, hi = st["interval"]
    assert 0.38 < lo <= hi < 0.62  # inside the gap, and never far from its edges
    assert st["change_points"] <= 1.0 and not st["unstable"]
    assert warning(st) is None
    assert st["rule"] == "youden" and "target_sensitivity" not in st
    assert "points of validation sensitivity or specificity" in st["criterion"]


def test_patients_widen_the_interval_and_are_named():
    # films of one patient share a score: drawn singly they look like independent evidence
    is_pos, score = sparse_tails(1)
    groups = [f"p{i // 4}" for i in range(len(score))]  # 4 films per patient, one class each
    st = threshold_stability(is_pos, score, "sensitivity", 0.9, groups=groups, n_boot=300)
    assert st["interval_method"] == "patient bootstrap (30 patients)"
    assert st["target_sensitivity"] == 0.9
    assert bootstrap_threshold(is_pos, score, "sensitivity", 0.9, 300, 0, groups) == (
        st["interval"], st["interval_method"])


def test_spread_of_fold_or_member_thresholds():
    is_pos, score = sparse_tails()
    far = threshold_spread([0.15, 0.5, 0.85], is_pos, score)
    assert (far["min"], far["max"], far["median"]) == (0.15, 0.85, 0.5)
    assert far["unstable"] and far["change_points"] == span(is_pos, score, 0.15, 0.85)[
        "change_points"]
    assert "0.15 to 0.85" in warning(far, "the members' thresholds")
    near = threshold_spread([0.06, 0.07, None], is_pos, score)  # a member without a threshold
    assert near["thresholds"] == [0.06, 0.07] and not near["unstable"]
    assert threshold_spread([0.3], is_pos, score) is None


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A tiny real run on the shipped demo images, the recipe's threshold rule left as is."""
    import cxrlab
    from cxrlab.config import RunConfig
    from cxrlab.training.lifecycle import train_run

    out = tmp_path_factory.mktemp("op") / "run"
    cfg = RunConfig.build(dict(data=str(cxrlab.demo_data() / "train"), model="cnn",
                               image_size=32, batch_size=16, epochs=1, precision="fp32",
                               time_budget="none"), source="option")
    train_run(cfg, out, progress=False)
    return out, cfg


def test_a_trained_run_records_its_threshold_stability(demo_run):
    from cxrlab.run import load_info, read_predictions, read_split_csv, read_threshold

    out, cfg = demo_run
    metrics = json.loads((out / "metrics.json").read_text())
    st = metrics["threshold_stability"]
    assert st["rule"] == cfg.threshold_rule and st["n_boot"] == 1000
    assert st["interval_method"] == metrics["interval_method"]  # the same patients
    # recomputed from the run's own files: the same interval, ends and flag
    info = load_info(out)
    paths, y, probs = read_predictions(out / "val_predictions.csv", info.classes)
    patient = {r["path"]: r["patient"] for r in read_split_csv(out / "split.csv")}
    again = threshold_stability(y == info.positive, probs[:, info.positive], cfg.threshold_rule,
                                cfg.target_sensitivity, groups=[patient[p] for p in paths],
                                seed=cfg.seed)
    assert again == st
    if cfg.threshold_rule == "sensitivity":  # the default: validation reaches its target
        assert metrics["recall"] >= cfg.target_sensitivity == st["target_sensitivity"]
    assert read_threshold(out) == pytest.approx(choose_threshold(
        y == info.positive, probs[:, info.positive], cfg.threshold_rule, cfg.target_sensitivity))


def test_all_resamples_at_once_choose_what_choose_threshold_chooses():
    from cxrlab.evaluation.operating_point import _choose_many

    rng = np.random.default_rng(3)
    for _ in range(5):
        n = int(rng.integers(6, 60))
        y = np.r_[True, False, rng.random(n - 2) < 0.6]
        s = np.round(rng.random(n), 2)  # ties, and scores at exactly 0 and 1
        s[rng.random(n) < 0.1] = rng.choice([0.0, 1.0])
        distinct, inverse = np.unique(s, return_inverse=True)
        w = rng.integers(0, 3, (25, n)).astype(float)
        for rule, target in (("youden", 0.95), ("sensitivity", 0.9), ("sensitivity", 1.0)):
            got = _choose_many(distinct[::-1], len(distinct) - 1 - inverse, y, w, rule, target)
            for b in range(len(w)):
                idx = np.repeat(np.arange(n), w[b].astype(int))
                one_class = y[idx].all() or not y[idx].any()
                assert got[b] == (0.5 if one_class else
                                  choose_threshold(y[idx], s[idx], rule, target))


def test_crossval_pools_the_folds_threshold_spread(tmp_path, caplog):
    from rich.console import Console

    from cxrlab.training.crossval import pool, render
    from tests.training.test_crossval import _fold

    y = [0, 0, 1, 1]
    _fold(tmp_path, 1, y, [0.10, 0.15, 0.25, 0.30], threshold=0.2)
    _fold(tmp_path, 2, y, [0.40, 0.45, 0.55, 0.60], threshold=0.5)
    _fold(tmp_path, 3, y, [0.70, 0.75, 0.85, 0.90], threshold=0.8)
    result = pool(tmp_path, 3)
    spread = result["threshold_spread"]
    assert (spread["min"], spread["median"], spread["max"]) == (0.2, 0.5, 0.8)
    # out of fold, 0.2 calls every positive (and four of six normals); 0.8 two of six positives
    assert spread["at_low"]["sensitivity"] == 1.0 and spread["at_high"]["sensitivity"] == 2 / 6
    assert spread["unstable"] and "unstable decision threshold" in caplog.text
    console = Console(record=True, width=160)
    render(result, console)
    assert "Folds' thresholds 0.2 to 0.8" in console.export_text()


def test_the_default_rule_keeps_its_sensitivity_and_leaves_the_normals_room():
    from cxrlab.config import RunConfig

    cfg = RunConfig.build({"data": "x"})
    assert (cfg.threshold_rule, cfg.target_sensitivity) == ("sensitivity", 0.97)
    # nearly separable validation: normals below 0.1, pneumonia above 0.9 but for a sparse
    # tail of 3 in 100 near 0.25 (the wide gap of a run with validation AUC 0.999)
    rng = np.random.default_rng(0)
    neg, tail, pos = rng.uniform(0, 0.1, 100), rng.uniform(0.2, 0.3, 3), rng.uniform(0.9, 1, 97)
    is_pos, score = np.r_[np.zeros(100, bool), np.ones(100, bool)], np.r_[neg, tail, pos]
    t = choose_threshold(is_pos, score, cfg.threshold_rule, cfg.target_sensitivity)
    youden = choose_threshold(is_pos, score, "youden")
    assert (score[is_pos] >= t).sum() == 97  # the target, and the highest threshold reaching it
    assert youden < 0.2 < 0.5 < t < 0.9  # Youden sits at the normals' edge of the gap
    # an intake whose normal films score 0.15 higher (tighter framing did that to validation)
    assert (neg + 0.15 >= youden).mean() > 0.5 and not (neg + 0.15 >= t).any()


def test_the_report_and_the_metrics_table_say_it():
    from rich.console import Console

    from cxrlab.evaluation.metrics import compute_metrics, format_metrics_table
    from cxrlab.reporting.report import threshold_stability_html

    is_pos, score = sparse_tails()
    shaky = threshold_stability(is_pos, score, "youden", 0.95, n_boot=200)
    lo, hi = shaky["interval"]
    html = threshold_stability_html(shaky)
    assert f"{lo:.3g} – {hi:.3g}" in html and "<strong>Unstable</strong>" in html
    firm = threshold_stability(*dense_separated(), "youden", 0.95, n_boot=200)
    assert "Unstable" not in threshold_stability_html(firm) and threshold_stability_html(None) == ""
    metrics = compute_metrics(is_pos.astype(int), np.c_[1 - score, score], ["N", "P"],
                              threshold=0.5, n_boot=50)
    metrics["threshold_stability"] = shaky
    console = Console(record=True, width=120)
    console.print(format_metrics_table(metrics))
    assert f"{lo:.3g} – {hi:.3g} unstable" in console.export_text()
