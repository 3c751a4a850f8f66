"""cxrlab.evaluation.metrics: every metric against hand arithmetic on small fixed examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

from cxrlab.errors import CxrlabError
from cxrlab.evaluation.metrics import (
    METRIC_KEYS,
    _RankKernel,
    choose_threshold,
    compute_metrics,
    format_metrics_table,
    group_codes,
    resample_weights,
)

CLASSES = ["NORMAL", "PNEUMONIA"]
BINARY_KEYS = {
    "accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc", "threshold",
    "confusion_matrix", "classes", "positive_class", "n", "ci", "at_0_5", "interval_method",
}

# 4 negatives then 6 positives (positive = class 1).
Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
P_POS = np.array([0.10, 0.40, 0.35, 0.80, 0.90, 0.65, 0.55, 0.30, 0.70, 0.20])


def probs2(p_pos: np.ndarray) -> np.ndarray:
    return np.c_[1 - p_pos, p_pos]


# -- binary -----------------------------------------------------------------------------------


def test_binary_metrics_by_hand():
    m = compute_metrics(Y, probs2(P_POS), CLASSES, positive=1, threshold=0.5, n_boot=0)
    assert set(m) == BINARY_KEYS
    # At 0.5: negatives 0.10 0.40 0.35 -> TN, 0.80 -> FP; positives 0.30 0.20 -> FN, rest TP.
    tn, fp, fn, tp = 3, 1, 2, 4
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx((tp + tn) / 10)  # 0.7
    assert m["precision"] == pytest.approx(tp / (tp + fp))  # 0.8
    assert m["recall"] == pytest.approx(tp / (tp + fn))  # 2/3
    assert m["specificity"] == pytest.approx(tn / (tn + fp))  # 3/4
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 8/11
    # Pair counting, positive beats negative: 0.90 -> 4, 0.65 -> 3, 0.55 -> 3, 0.30 -> 1,
    # 0.70 -> 3, 0.20 -> 1; 15 of 6 * 4 pairs.
    assert m["roc_auc"] == pytest.approx(15 / 24)
    # Ranked: P N P P P N N P P N; precision at each positive's rank, averaged.
    assert m["pr_auc"] == pytest.approx((1 / 1 + 2 / 3 + 3 / 4 + 4 / 5 + 5 / 8 + 6 / 9) / 6)
    assert m["threshold"] == 0.5
    assert m["classes"] == CLASSES
    assert m["positive_class"] == "PNEUMONIA"
    assert m["n"] == 10
    assert m["at_0_5"] == {k: m[k] for k in ("accuracy", "precision", "recall", "specificity",
                                              "f1")}
    assert set(m["ci"]) == set(METRIC_KEYS)


def test_binary_threshold_and_default():
    m = compute_metrics(Y, probs2(P_POS), CLASSES, threshold=0.25, n_boot=0)
    # >= 0.25: only the 0.20 positive and the 0.10 negative are called negative.
    assert m["confusion_matrix"] == [[1, 3], [1, 5]]
    assert m["specificity"] == pytest.approx(1 / 4)
    assert m["recall"] == pytest.approx(5 / 6)
    assert m["at_0_5"]["accuracy"] == pytest.approx(0.7)  # still reported at 0.5
    assert compute_metrics(Y, probs2(P_POS), CLASSES, n_boot=0)["threshold"] == 0.5
    # p == threshold counts as positive.
    m = compute_metrics([0, 1], probs2(np.array([0.3, 0.6])), CLASSES, threshold=0.6, n_boot=0)
    assert m["confusion_matrix"] == [[1, 0], [0, 1]]


def test_binary_positive_class_zero():
    # The same cases with the classes swapped: class 0 is now the positive one.
    m = compute_metrics(1 - Y, probs2(1 - P_POS), CLASSES, positive=0, threshold=0.5, n_boot=0)
    assert m["positive_class"] == "NORMAL"
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["roc_auc"] == pytest.approx(15 / 24)
    # Rows/cols in `classes` order: true NORMAL (the 6 positives) first.
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]


# -- thresholds -------------------------------------------------------------------------------


def test_youden_threshold_by_hand():
    # TPR - FPR at each score: 0.90: 1/6, 0.80: -1/12, 0.70: 1/12, 0.65: 1/4, 0.55: 5/12 (max),
    # 0.40: 1/6, ... The next lower score is 0.40, so the midpoint is 0.475.
    assert choose_threshold(Y, P_POS) == pytest.approx(0.475)
    # Perfectly separated: the optimum is the lowest positive, halfway to the highest negative.
    assert choose_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7, 0.9]) == pytest.approx(
        0.45
    )


def test_sensitivity_threshold_by_hand():
    # Sensitivity reaches 5/6 >= 0.8 at 0.30 (next lower 0.20) and 1 >= 0.95 at 0.20 (next 0.10).
    assert choose_threshold(Y, P_POS, "sensitivity", 0.8) == pytest.approx(0.25)
    assert choose_threshold(Y, P_POS, "sensitivity", 0.95) == pytest.approx(0.15)
    # Lowest score chosen: halfway down to 0.
    assert choose_threshold([1, 0], [0.2, 0.6], "sensitivity", 1.0) == pytest.approx(0.1)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=2, max_size=40),
    st.floats(0.05, 1.0),
)
def test_sensitivity_rule_meets_target(cases, target):
    y = np.array([c[0] for c in cases])
    p = np.array([c[1] / 20 for c in cases])
    t = choose_threshold(y, p, "sensitivity", target)
    assert 0 <= t < 1
    if y.any() and not y.all():
        assert (p[y] >= t).mean() >= target - 1e-9
        # Highest such threshold: t sits just below the chosen score (the lowest above t);
        # moving up to the next distinct score would miss the target.
        above = np.unique(p[p > t])
        if above.size > 1:
            assert (p[y] >= above[1]).mean() < target
        # It sits between scores, never on one (unless the lowest score, 0, had to be kept).
        assert t == 0.0 or t not in set(p.tolist())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=2, max_size=40))
def test_youden_is_optimal(cases):
    y = np.array([c[0] for c in cases])
    p = np.array([c[1] / 20 for c in cases])
    t = choose_threshold(y, p)
    if y.any() and not y.all():

        def youden(th: float) -> float:
            return (p[y] >= th).mean() - (p[~y] >= th).mean()

        assert youden(t) >= max(youden(s) for s in np.unique(p)) - 1e-12


def test_threshold_degenerate_and_bad_input():
    assert choose_threshold([1, 1, 1], [0.2, 0.5, 0.9]) == 0.5
    assert choose_threshold([0, 0], [0.2, 0.5], "sensitivity") == 0.5
    assert choose_threshold([], []) == 0.5
    with pytest.raises(CxrlabError, match="threshold_rule"):
        choose_threshold(Y, P_POS, "f1")
    with pytest.raises(CxrlabError, match="target_sensitivity"):
        choose_threshold(Y, P_POS, "sensitivity", 1.5)
    with pytest.raises(CxrlabError, match="NaN"):
        choose_threshold([0, 1], [0.1, float("nan")])


def test_threshold_clipped_into_open_interval():
    # Everything scored 1.0 and 0.0: the midpoint rule must still give a usable threshold.
    t = choose_threshold([0, 1], [0.0, 1.0])
    assert 0 < t < 1
    # Worse than chance everywhere: "call everything positive" ties "call nothing" at J = 0.
    assert choose_threshold([1, 0], [0.0, 1.0]) == 0.0
    # A positive scored exactly 0 can only be caught by a threshold of 0: the rule wins.
    assert choose_threshold([0, 1, 1], [0.0, 0.0, 0.8], "sensitivity", 1.0) == 0.0


# -- multi-class ------------------------------------------------------------------------------

CLASSES3 = ["A", "B", "C"]
Y3 = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
P3 = np.array([
    [0.70, 0.20, 0.10],  # A -> A
    [0.60, 0.30, 0.10],  # A -> A
    [0.30, 0.50, 0.20],  # A -> B
    [0.50, 0.40, 0.10],  # B -> A
    [0.20, 0.70, 0.10],  # B -> B
    [0.10, 0.60, 0.30],  # B -> B
    [0.20, 0.50, 0.30],  # C -> B
    [0.10, 0.20, 0.70],  # C -> C
    [0.20, 0.20, 0.60],  # C -> C
    [0.05, 0.15, 0.80],  # C -> C
])


def test_multiclass_by_hand():
    m = compute_metrics(Y3, P3, CLASSES3, n_boot=0)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [0, 1, 3]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["positive_class"] is None and m["threshold"] is None and m["at_0_5"] is None
    # A: tp 2, fp 1, fn 1, tn 6.  B: tp 2, fp 2, fn 1, tn 5.  C: tp 3, fp 0, fn 1, tn 6.
    expected = {
        "A": dict(precision=2 / 3, recall=2 / 3, specificity=6 / 7, f1=4 / 6, support=3),
        "B": dict(precision=2 / 4, recall=2 / 3, specificity=5 / 7, f1=4 / 7, support=3),
        "C": dict(precision=3 / 3, recall=3 / 4, specificity=6 / 6, f1=6 / 7, support=4),
    }
    # One vs rest by pair counting: A 20/21; B 19/21; C: 0.30 ties one negative 0.30 -> 23.5/24.
    # AP: A ranks P P N P -> (1 + 1 + 3/4)/3; B ranks P P N N P -> (1 + 1 + 3/5)/3;
    # C ranks P P P then {P, N} tied at 0.30 -> (1 + 1 + 1 + 4/5)/4.
    expected["A"].update(roc_auc=20 / 21, pr_auc=(2 + 3 / 4) / 3)
    expected["B"].update(roc_auc=19 / 21, pr_auc=(2 + 3 / 5) / 3)
    expected["C"].update(roc_auc=23.5 / 24, pr_auc=(3 + 4 / 5) / 4)
    for name, values in expected.items():
        assert m["per_class"][name] == pytest.approx(values), name
    for key in ("precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
        macro = np.mean([expected[c][key] for c in CLASSES3])
        assert m[key] == pytest.approx(macro), key
    assert set(m["ci"]) == set(METRIC_KEYS)
    json.dumps(m, allow_nan=False)


def test_multiclass_absent_class_gives_none():
    keep = Y3 != 1  # no true B left; B is still predicted once (a C case)
    m = compute_metrics(Y3[keep], P3[keep], CLASSES3, n_boot=200)
    b = m["per_class"]["B"]
    assert b["support"] == 0
    assert b["recall"] is None and b["roc_auc"] is None and b["pr_auc"] is None
    assert b["precision"] == 0.0  # predicted B once, never right
    # Macro recall averages A (2/3) and C (3/4) only.
    assert m["recall"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    json.dumps(m, allow_nan=False)


# -- degenerate inputs ------------------------------------------------------------------------


def test_binary_one_class_only():
    m = compute_metrics([1, 1, 1], probs2(np.array([0.9, 0.4, 0.7])), CLASSES, n_boot=100)
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert m["specificity"] is None  # no negatives to be specific about
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["ci"]["roc_auc"] is None and m["ci"]["pr_auc"] is None
    assert m["ci"]["specificity"] is None
    json.dumps(m, allow_nan=False)

    m = compute_metrics([0, 0], probs2(np.array([0.1, 0.2])), CLASSES, n_boot=100)
    assert m["recall"] is None and m["roc_auc"] is None
    assert m["precision"] == 0.0 and m["f1"] == 0.0  # zero_division=0
    assert m["specificity"] == 1.0
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize("classes", [CLASSES, CLASSES3])
def test_empty_input(classes):
    m = compute_metrics(np.array([], dtype=int), np.zeros((0, len(classes))), classes)
    assert m["n"] == 0
    assert all(m[k] is None for k in METRIC_KEYS)
    assert all(v is None for v in m["ci"].values())
    assert m["confusion_matrix"] == [[0] * len(classes)] * len(classes)
    json.dumps(m, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 4), st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4)), max_size=12))
def test_never_crashes_and_always_json(k, cases):
    # Tiny sets, absent classes, heavy ties: anything undefined must come out as None.
    y = np.array([c[0] % k for c in cases], dtype=int)
    raw = np.array([[(c[1] + j) % 5 + 0.5 for j in range(k)] for c in cases]).reshape(-1, k)
    probs = raw / raw.sum(1, keepdims=True) if len(raw) else raw
    names = ["a", "b", "c", "d"][:k]
    m = compute_metrics(y, probs, names, threshold=0.4 if k == 2 else None, n_boot=20)
    json.dumps(m, allow_nan=False)
    for key in METRIC_KEYS:
        assert m[key] is None or 0.0 <= m[key] <= 1.0
        assert m["ci"][key] is None or 0.0 <= m["ci"][key][0] <= m["ci"][key][1] <= 1.0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(Y, P_POS, CLASSES)
    with pytest.raises(ValueError, match="outside"):
        compute_metrics([0, 2], probs2(np.array([0.1, 0.2])), CLASSES)
    with pytest.raises(CxrlabError, match="NaN"):
        compute_metrics([0, 1], probs2(np.array([0.1, np.nan])), CLASSES)


# -- bootstrap --------------------------------------------------------------------------------


def _synthetic(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1).round(2)  # rounded: ties happen
    return y, probs2(p)


def test_ci_contains_estimate_and_narrows():
    y, P = _synthetic(100)
    small = compute_metrics(y, P, CLASSES, n_boot=500)
    large = compute_metrics(np.tile(y, 10), np.tile(P, (10, 1)), CLASSES, n_boot=500)
    for key in METRIC_KEYS:
        lo, hi = small["ci"][key]
        assert lo <= small[key] <= hi, key
        assert large[key] == pytest.approx(small[key]), key
        lo_l, hi_l = large["ci"][key]
        assert lo_l <= large[key] <= hi_l, key
        assert hi_l - lo_l < 0.6 * (hi - lo), key  # ~1/sqrt(10) of the width


def test_bootstrap_seeded():
    y, P = _synthetic(80)
    a = compute_metrics(y, P, CLASSES, n_boot=300, seed=3)
    assert a == compute_metrics(y, P, CLASSES, n_boot=300, seed=3)
    assert a["ci"] != compute_metrics(y, P, CLASSES, n_boot=300, seed=4)["ci"]
    m3 = compute_metrics(Y3, P3, CLASSES3, n_boot=300, seed=3)
    assert m3 == compute_metrics(Y3, P3, CLASSES3, n_boot=300, seed=3)


def test_rank_kernel_matches_sklearn():
    y, P = _synthetic(60, seed=7)
    score = P[:, 1]
    idx = np.random.default_rng(0).integers(0, len(y), (20, len(y)))
    counts = np.stack([np.bincount(rows, minlength=len(y)) for rows in idx]).astype(float)
    aucs, aps = _RankKernel(score)(counts, y == 1)
    for b, rows in enumerate(idx):
        assert aucs[b] == pytest.approx(roc_auc_score(y[rows], score[rows]))
        assert aps[b] == pytest.approx(average_precision_score(y[rows], score[rows]))
    one_class = np.zeros((1, len(y)))
    one_class[0, np.flatnonzero(y)[0]] = len(y)
    auc1, ap1 = _RankKernel(score)(one_class, y == 1)
    assert np.isnan(auc1[0]) and np.isnan(ap1[0])


def test_bootstrap_threshold_metrics_match_point_estimates():
    # With one resample the interval collapses onto that resample's value, which must equal the
    # scikit-learn point metrics of the same resample (drawn as the bootstrap draws it).
    y, P = _synthetic(50, seed=2)
    m = compute_metrics(y, P, CLASSES, threshold=0.45, n_boot=1, seed=0)
    m3 = compute_metrics(Y3, P3, CLASSES3, n_boot=1, seed=0)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(y), size=(1, len(y)))[0]
    again = compute_metrics(y[idx], P[idx], CLASSES, threshold=0.45, n_boot=0)
    for key in METRIC_KEYS:
        assert m["ci"][key][0] == pytest.approx(again[key]), key
    idx3 = np.random.default_rng(0).integers(0, len(Y3), size=(1, len(Y3)))[0]
    again3 = compute_metrics(Y3[idx3], P3[idx3], CLASSES3, n_boot=0)
    for key in METRIC_KEYS:
        if again3[key] is None:
            assert m3["ci"][key] is None, key
        else:
            assert m3["ci"][key][0] == pytest.approx(again3[key]), key


def _clustered(n_patients: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Patients of 1-6 images; a patient's label and score level are shared by its images."""
    rng = np.random.default_rng(seed)
    y, p, keys = [], [], []
    for i in range(n_patients):
        label, level = int(rng.integers(0, 2)), rng.normal(0, 1)
        for _ in range(int(rng.integers(1, 7))):
            y.append(label)
            p.append(1 / (1 + np.exp(-(1.2 * (2 * label - 1) + level + rng.normal(0, 0.3)))))
            keys.append(f"patient{i}")
    return np.array(y), probs2(np.array(p).round(3)), keys


def test_patient_bootstrap_of_duplicated_images_is_the_image_bootstrap_of_the_originals():
    # Five identical copies per patient add no evidence: resampling patients must give what
    # resampling the 60 originals gives (metrics do not change when every count is scaled),
    # and the image bootstrap, counting each copy as new evidence, must be far narrower.
    y, P = _synthetic(60, seed=4)
    dup_y, dup_P = np.repeat(y, 5), np.repeat(P, 5, axis=0)
    keys = [f"p{i}" for i in np.repeat(np.arange(60), 5)]
    originals = compute_metrics(y, P, CLASSES, threshold=0.5, n_boot=400, seed=1)
    by_patient = compute_metrics(dup_y, dup_P, CLASSES, threshold=0.5, n_boot=400, seed=1,
                                 groups=keys)
    by_image = compute_metrics(dup_y, dup_P, CLASSES, threshold=0.5, n_boot=400, seed=1)
    assert by_patient["interval_method"] == "patient bootstrap (60 patients)"
    assert by_image["interval_method"] == originals["interval_method"] == "image bootstrap"
    for key in METRIC_KEYS:
        assert by_patient["ci"][key] == pytest.approx(originals["ci"][key]), key
        w_patient = np.diff(by_patient["ci"][key])[0]
        assert np.diff(by_image["ci"][key])[0] < 0.7 * w_patient, key  # ~1/sqrt(5)


def test_patient_bootstrap_draws_whole_patients():
    # One resample, drawn as the bootstrap draws it, by hand: patients with replacement, all
    # their images; scikit-learn's metrics of that set must be the replicate's values.
    y, P, keys = _clustered(40)
    codes = group_codes(keys, len(y))
    G = int(codes.max()) + 1
    first_seen = np.unique(codes, return_index=True)[1]
    assert G == 40 and codes[0] == 0 and (np.diff(first_seen) > 0).all()  # numbered in order
    patients = np.random.default_rng(2).integers(0, G, size=(1, G))[0]
    rows = np.concatenate([np.flatnonzero(codes == g) for g in patients])
    w = next(resample_weights(len(y), 1, 2, codes))[0]
    assert (w == np.bincount(rows, minlength=len(y))).all()
    m = compute_metrics(y, P, CLASSES, threshold=0.5, n_boot=1, seed=2, groups=keys)
    again = compute_metrics(y[rows], P[rows], CLASSES, threshold=0.5, n_boot=0)
    for key in METRIC_KEYS:
        assert m["ci"][key][0] == pytest.approx(again[key]), key


def test_patient_bootstrap_matches_naive_cluster_resampling_in_distribution():
    # A plain loop (patients with replacement, all their images; AUC by Mann-Whitney ranks,
    # independent of the vectorised kernel) with its own draws: the percentile intervals must
    # agree within Monte Carlo error, and the image bootstrap's must not.
    y, P, keys = _clustered(50)
    m = compute_metrics(y, P, CLASSES, threshold=0.5, n_boot=2000, seed=0, groups=keys)
    image = compute_metrics(y, P, CLASSES, threshold=0.5, n_boot=2000, seed=0)
    by_patient = [np.flatnonzero(np.array(keys) == f"patient{i}") for i in range(50)]
    rng = np.random.default_rng(123)
    aucs, accs = [], []
    for _ in range(1500):
        rows = np.concatenate([by_patient[g] for g in rng.integers(0, 50, 50)])
        yy, ss = y[rows], P[rows, 1]
        if 0 < yy.sum() < len(yy):
            ranks, n_pos = rankdata(ss), yy.sum()
            aucs.append((ranks[yy == 1].sum() - n_pos * (n_pos + 1) / 2)
                        / (n_pos * (len(yy) - n_pos)))
        accs.append(np.mean((ss >= 0.5) == yy))
    for key, naive in (("roc_auc", aucs), ("accuracy", accs)):
        expected = np.percentile(naive, [2.5, 97.5])
        assert m["ci"][key] == pytest.approx(expected, abs=0.02), key
        assert image["ci"][key] != pytest.approx(expected, abs=0.02), key
        assert np.diff(image["ci"][key])[0] < np.diff(m["ci"][key])[0], key


def test_one_image_per_patient_both_methods_agree():
    y, P = _synthetic(70, seed=6)
    keys = [f"p{i}" for i in range(70)]
    keys[3] = ""  # no key: its own patient
    for yy, PP, kk in ((y, P, keys), (Y3, P3, [f"q{i}" for i in range(len(Y3))])):
        image = compute_metrics(yy, PP, [*map(str, range(PP.shape[1]))], n_boot=300, seed=9)
        patient = compute_metrics(yy, PP, [*map(str, range(PP.shape[1]))], n_boot=300, seed=9,
                                  groups=kk)
        assert patient["ci"] == image["ci"]
        assert patient["interval_method"] == f"patient bootstrap ({len(yy)} patients)"


def test_table_caption_names_the_interval_method():
    y, P, keys = _clustered(20)
    console = Console(record=True, width=120)
    console.print(format_metrics_table(compute_metrics(y, P, CLASSES, n_boot=50, groups=keys)))
    console.print(format_metrics_table({**compute_metrics(y, P, CLASSES, n_boot=50),
                                        "selection_biased": "chosen on these images"}))
    out = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "95% CI: patient bootstrap (20 patients)" in out
    assert "95% CI: image bootstrap; optimistic: chosen on these images" in out


# -- output -----------------------------------------------------------------------------------


def test_json_and_table():
    for m in (
        compute_metrics(Y, probs2(P_POS), CLASSES, threshold=0.475, n_boot=100),
        compute_metrics(Y3, P3, CLASSES3, n_boot=100),
    ):
        text = json.dumps(m, allow_nan=False)
        assert json.loads(text) == m
        console = Console(record=True, width=100)
        console.print(format_metrics_table(m))
        out = console.export_text()
        assert "ROC AUC" in out and "95% CI" in out and f"{m['accuracy']:.3f}" in out


# -- the run's threshold seen from the other class ---------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0, 1]), st.sampled_from(["youden",
                                                                           "sensitivity"]))
def test_other_positive_keeps_every_decision(seed, positive, rule):
    # `evaluate --positive OTHER` once applied the run's threshold, chosen on P(positive), to
    # P(other): a case scored 0.3 with threshold 0.4 flipped class. Now every case keeps its
    # class, also float32 scores one ulp either side of the threshold.
    from cxrlab.deploy.inference import complement_threshold

    rng = np.random.default_rng(seed)
    p = (1 / (1 + np.exp(-rng.normal(0, 2, 200)))).astype(np.float32)  # like the model's
    y = (rng.random(200) < p).astype(int)
    t = choose_threshold(y == positive, p if positive == 1 else 1 - p, rule, 0.9)
    t32 = np.float32(t)
    near = [np.nextafter(t32, np.float32(0)), t32, np.nextafter(t32, np.float32(1))]
    p_pos = np.concatenate([p, near]).astype(np.float32)
    P = np.zeros((len(p_pos), 2), np.float32)
    P[:, positive], P[:, 1 - positive] = p_pos, np.float32(1) - p_pos
    y = np.concatenate([y, [0, 1, 0]])
    run_calls_positive = P[:, positive].astype(np.float64) >= t  # as compute_metrics compares

    P2, t2 = complement_threshold(P, positive, t)
    assert np.array_equal(P2[:, 1 - positive] > t2, ~run_calls_positive)
    assert t2 == pytest.approx(1 - t, abs=1e-15)
    a = compute_metrics(y, P, CLASSES, positive=positive, threshold=t, n_boot=0)
    b = compute_metrics(y, P2, CLASSES, positive=1 - positive, threshold=t2, n_boot=0,
                        strict=True)
    assert a["confusion_matrix"] == b["confusion_matrix"]  # the same calls, class by class
    assert (b["recall"], b["specificity"]) == (a["specificity"], a["recall"])
    assert b["roc_auc"] == pytest.approx(a["roc_auc"], abs=1e-12)


def test_other_positive_threshold_rounds_down():
    # 1 - t is not a float here and rounds up to 0.75; a case scored 0.25 < t would then
    # have P(other) = 0.75, not > 0.75, and flip.
    from cxrlab.deploy.inference import complement_threshold

    t = 0.25 + 2.0**-54
    P2, t2 = complement_threshold(np.array([[0.75, 0.25], [0.5, 0.5]]), 1, t)
    assert 1.0 - t == 0.75 and t2 < 0.75
    assert list(P2[:, 0] > t2) == [True, False]


def test_predictions_decide_as_metrics_count():
    # A threshold halfway between two float32 scores (choose_threshold's midpoint) rounds, in
    # float32, onto one of them: predict called that case positive while evaluate did not.
    from cxrlab.deploy.inference import decide

    lo = np.float32(0.3)
    hi = np.nextafter(lo, np.float32(1))
    t = (float(lo) + float(hi)) / 2
    assert np.float32(t) in (lo, hi)
    P = np.array([[1 - lo, lo], [1 - hi, hi]], dtype=np.float32)
    m = compute_metrics([0, 1], P, CLASSES, positive=1, threshold=t, n_boot=0)
    assert m["confusion_matrix"] == [[1, 0], [0, 1]]
    assert list(decide(P, 1, t)) == [0, 1]
