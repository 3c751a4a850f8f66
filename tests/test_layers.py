"""The layering: faces -> training -> site -> reporting -> evaluation -> deploy -> run -> data
-> config -> models -> errors (pyproject.toml, [tool.importlinter]); no import circle."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import cxrlab

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(cxrlab.__file__).resolve().parents[1]


def lint_imports(src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
         "lint_imports_command()", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_layers_contract_is_kept():
    r = lint_imports(SRC)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, bad", [
    ("models/heads.py", "from cxrlab.training import loop"),       # lowest -> a wing
    ("evaluation/metrics.py", "import cxrlab.site.intake"),         # evaluation -> site
    ("data/cache.py", "from cxrlab.run import load_run"),          # data -> run
])
def test_a_lower_wing_importing_a_higher_one_breaks_the_contract(tmp_path, module, bad):
    shutil.copytree(SRC / "cxrlab", tmp_path / "cxrlab",
                    ignore=shutil.ignore_patterns("demo_data", "__pycache__"))
    target = tmp_path / "cxrlab" / module
    target.write_text(target.read_text() + f"\n\ndef _upward():\n    {bad}\n")
    r = lint_imports(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "BROKEN" in r.stdout


def test_no_import_circle():
    graph = grimp.build_graph("cxrlab", cache_dir=None)
    for m in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(m):
            assert not graph.chain_exists(imported, m), (
                f"import circle: {m} -> {imported} -> ... -> {m}: "
                f"{graph.find_shortest_chain(imported, m)}")
