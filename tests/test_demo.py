"""`cxrlab demo` end to end through the installed console script, as a new user runs it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


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
