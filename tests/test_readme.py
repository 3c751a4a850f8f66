"""The README's install and test lines are the ones CI runs, and the README sends nobody to data
that only exists in the development checkout."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readmes_install_and_test_lines_verbatim():
    readme_lines = {line.strip() for line in README.splitlines()}
    ci = _commands(CI)
    pip = [c for c in ci if c.startswith("pip install")]
    assert len(pip) == 1 and "-c constraints.txt" in pip[0], pip
    assert pip[0] in readme_lines, f"README.md lacks CI's install line: {pip[0]}"
    assert "python -m pytest" in ci and "python -m pytest" in readme_lines
    # the CPU torch comes first in the README (CI already has it, so it skips that line)
    cpu = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in readme_lines and README.index(cpu) < README.index(pip[0])


def test_readme_is_short_and_runs_without_the_development_data():
    assert len(README.splitlines()) <= 200
    assert "../shared" not in README
    assert 'DATA=$(python -c "import cxrlab; print(cxrlab.demo_data())")' in README


def test_examples_send_nobody_to_the_development_data():
    """Every file under examples/ runs from a fresh clone: data paths are the demo data or the
    layout docs/data.md describes, never the development checkout's ../shared."""
    text = {".yaml", ".yml", ".ipynb", ".md", ".py", ".txt"}  # not what a run left there
    files = [p for p in (ROOT / "examples").rglob("*") if p.suffix in text]
    assert any(p.suffix == ".yaml" for p in files)
    for path in files:
        assert "../shared" not in path.read_text(encoding="utf-8", errors="replace"), path
