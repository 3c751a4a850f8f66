"""`cxrlab demo` end to end through the installed console script, as a new user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cxrlab
from cxrlab.data.sources import load_source


def test_demo_end_to_end(tmp_path: Path):
    exe = shutil.which("cxrlab") or sys.executable
    cmd = [exe, "demo", "--out", str(tmp_path / "demo"), "--quiet"]
    if not exe.endswith("cxrlab"):
        cmd = [sys.executable, "-m", "cxrlab.cli", "demo", "--out", str(tmp_path / "demo"),
               "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "demo"
    assert json.loads((run / "run.json").read_text())["state"] == "complete"
    test = json.loads((run / "metrics_test.json").read_text())
    assert test["n"] == 120
    # A real model, not a constant: it separates the held-out patients.
    assert test["roc_auc"] > 0.8, test
    assert 0 < test["specificity"] and 0 < test["recall"]
    for png in ["curves.png", "confusion_matrix.png", "roc.png", "val_predictions.png"]:
        assert (run / png).stat().st_size > 10_000
    assert "Held-out test" in proc.stdout and str(run) in proc.stdout


def test_demo_data_is_the_shipped_train_and_test_folders():
    root = cxrlab.demo_data()
    assert root.is_absolute() and (root / "ATTRIBUTION.txt").is_file()
    assert cxrlab.demo_data("train") == root / "train"
    assert cxrlab.demo_data("test") == root / "test"
    # the layout of the full set's download: train/ and test/, class folders in each
    source = load_source(root)
    assert source.kind == "split_folders" and source.classes == ["NORMAL", "PNEUMONIA"]
    counts = {(s, c): 0 for s in ("train", "test") for c in source.classes}
    for r in source.records:
        counts[(r.split, r.label)] += 1
    assert counts == {("train", "NORMAL"): 120, ("train", "PNEUMONIA"): 240,
                      ("test", "NORMAL"): 60, ("test", "PNEUMONIA"): 60}
    assert load_source(cxrlab.demo_data("train")).kind == "class_folders"
    with pytest.raises(cxrlab.CxrlabError, match="'train' and 'test'"):
        cxrlab.demo_data("val")
    # light: the README's shell line finds the folder without importing torch
    code = "import sys, cxrlab; print(cxrlab.demo_data()); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(root), "False"]
