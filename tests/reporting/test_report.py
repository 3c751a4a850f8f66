"""cxrlab report: sections of a run and an ablation page, self-containment, calibration."""

from __future__ import annotations

import json
import re
import shutil
import sys

import numpy as np
import pytest
from sklearn.calibration import calibration_curve

from cxrlab.cli import main
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.calibration import reliability
from cxrlab.reporting.report import (
    SECTIONS_ABLATION,
    SECTIONS_RUN,
    load_run_data,
    write_report,
)
from cxrlab.run import read_predictions, read_split_csv

# -- calibration against hand-computed values ---------------------------------------------


def test_ece_by_hand():
    y = [0, 0, 1, 1, 1]
    p1 = np.array([0.1, 0.3, 0.6, 0.9, 0.5])  # 0.5 sits on the edge: lower bin
    cal = reliability(y, np.stack([1 - p1, p1], 1), n_bins=2)
    # bin [0, .5]: 0.1, 0.3, 0.5 -> conf 0.3, observed 1/3; bin (.5, 1]: 0.6, 0.9 -> 0.75, 1
    assert cal["count"] == [3, 2]
    assert cal["confidence"] == pytest.approx([0.3, 0.75])
    assert cal["observed"] == pytest.approx([1 / 3, 1.0])
    assert cal["ece"] == pytest.approx((3 * (1 / 3 - 0.3) + 2 * 0.25) / 5)
    assert cal["mce"] == pytest.approx(0.25)
    # positive = 0: the other column is the positive class's probability
    flipped = reliability([1 - v for v in y], np.stack([p1, 1 - p1], 1), positive=0, n_bins=2)
    assert flipped["ece"] == pytest.approx(cal["ece"])


def test_multiclass_uses_top_probability_and_correctness():
    P = np.array([[0.7, 0.2, 0.1], [0.1, 0.85, 0.05], [0.4, 0.35, 0.25], [0.3, 0.3, 0.4]])
    y = [0, 2, 0, 2]  # right, wrong, right, right
    cal = reliability(y, P, n_bins=5)  # bins (0.2, 0.4], ...: 0.4 is in the second
    assert cal["count"] == [0, 2, 0, 1, 1]
    assert cal["confidence"][0] is None
    assert cal["confidence"][1] == pytest.approx(0.4) and cal["observed"][1] == 1.0
    assert cal["observed"][4] == 0.0
    assert cal["ece"] == pytest.approx((2 * 0.6 + 1 * 0.3 + 1 * 0.85) / 4)


def test_bins_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    p = rng.random(500)
    p[:20] = np.round(p[:20], 1)  # values on bin edges
    y = (rng.random(500) < p).astype(int)
    cal = reliability(y, np.stack([1 - p, p], 1), n_bins=10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10)
    assert [o for o in cal["observed"] if o is not None] == pytest.approx(prob_true)
    assert [c for c in cal["confidence"] if c is not None] == pytest.approx(prob_pred)


# -- pages --------------------------------------------------------------------------------


def section_ids(page: str) -> list[str]:
    return re.findall(r'<section id="([^"]+)"', page)


def assert_self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    srcs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert srcs and all(s.startswith(("data:image/png;base64,", "#")) for s in srcs), \
        [s[:40] for s in srcs if not s.startswith(("data:", "#"))]
    assert "@import" not in page and "url(" not in page


def test_run_report_sections(tiny_sweep, tmp_path):
    run = tiny_sweep.a / "runs" / tiny_sweep.first_run
    out = write_report(run, tmp_path / "run.html")
    page = out.read_text()
    assert section_ids(page) == list(SECTIONS_RUN)
    assert_self_contained(page)
    assert "Expected calibration error" in page and "at 0.5" in page
    assert "Research use only — not for clinical use." in page
    assert page.count('class="tile') >= 4  # the gallery shows the validation images
    assert "patients" in page and "pixel-identical" in page  # split table and audit
    rows = read_split_csv(run / "split.csv")
    n_patients = len({row["patient"] for row in rows if row["split"] == "val"})
    assert n_patients < sum(row["split"] == "val" for row in rows)  # several images each
    assert f"95% percentile patient bootstrap ({n_patients} patients)" in page
    assert "Selection-biased: the threshold and the epoch were chosen on these images" in page


def test_old_run_intervals_are_recomputed_over_patients(tiny_sweep, tmp_path):
    # metrics.json from before interval_method: its intervals were drawn over images, so the
    # report draws them again over split.csv's patients instead of showing them unlabelled.
    old = tmp_path / "old-run"
    shutil.copytree(tiny_sweep.a / "runs" / tiny_sweep.first_run, old)
    m = json.loads((old / "metrics.json").read_text())
    method = m.pop("interval_method")
    del m["selection_biased"]
    m["ci"] = {k: [0.123, 0.456] for k in m["ci"]}  # a marker: the old intervals
    (old / "metrics.json").write_text(json.dumps(m))
    page = write_report(old).read_text()
    assert f"{method}, recomputed for this report" in page and "0.123 – 0.456" not in page
    assert "the threshold and the epoch were chosen on these images" in page


def test_old_run_without_val_predictions_is_recomputed(tiny_sweep, tmp_path):
    src = tiny_sweep.a / "runs" / tiny_sweep.first_run
    old = tmp_path / "old-run"
    shutil.copytree(src, old)
    (old / "val_predictions.csv").unlink()
    recomputed = load_run_data(old)
    paths, y, P = read_predictions(src / "val_predictions.csv", recomputed.classes)
    assert recomputed.val_paths == paths and (recomputed.val_y == y).all()
    assert recomputed.val_probs == pytest.approx(P, abs=1e-4)
    assert section_ids(write_report(old).read_text()) == list(SECTIONS_RUN)
    assert (old / "report.html").is_file()


def test_ablation_report_sections(tiny_sweep, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ablation.html"
    monkeypatch.setattr(sys, "argv", ["cxrlab", "report", str(tiny_sweep.a), "--out", str(out)])
    main()
    assert "Report written to" in capsys.readouterr().out
    page = out.read_text()
    assert section_ids(page) == list(SECTIONS_ABLATION)
    assert_self_contained(page)
    assert "dropout 0.5 vs 0.0:" in page and "dropout-0.5__seed1" in page


def test_report_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(CxrlabError, match="neither a run directory"):
        write_report(tmp_path)
    with pytest.raises(CxrlabError, match="not a directory"):
        write_report(tmp_path / "nope")
