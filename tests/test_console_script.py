"""The installed `cxrlab` console script as a new user meets it: usage mistakes get Click's short
usage message and exit status 2, never a Python traceback, whatever Typer/Click is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def cxrlab_script() -> str:
    """The console script pip installed beside this interpreter (not `python -m`)."""
    here = Path(sys.executable).parent / "cxrlab"
    found = str(here) if here.exists() else shutil.which("cxrlab")
    assert found, "the cxrlab console script is not installed: pip install -e ."
    return found


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="100", NO_COLOR="1")
    return subprocess.run([cxrlab_script(), *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env)


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert proc.returncode == 2, (proc.returncode, text)
    assert "Usage: cxrlab" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 8, proc.stderr
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr)


def test_no_arguments_prints_the_help():
    proc = run()
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    assert proc.returncode in (0, 2), text
    for command in ("train", "evaluate", "predict", "demo", "serve"):
        assert command in text


def test_missing_argument_is_a_usage_error():
    assert_usage_error(run("evaluate"), "Missing argument")


def test_unknown_command_is_a_usage_error(tmp_path):
    proc = run("calibrate-nonsense", "x", "y", cwd=tmp_path)
    assert_usage_error(proc, "No such command")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_unknown_option_is_a_usage_error():
    assert_usage_error(run("train", "--nosuch"), "No such option", "--nosuch")


def test_bad_option_value_is_a_usage_error():
    assert_usage_error(run("train", "x", "--epochs", "abc"), "--epochs")


def test_version():
    from importlib.metadata import version

    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"cxrlab {version('cxrlab')}"


def test_library_errors_stay_one_line(tmp_path):
    proc = run("evaluate", str(tmp_path / "no-run"), str(tmp_path / "no-data"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cxrlab: error:"), proc.stderr


def _commands() -> list[list[str]]:
    from typer.main import get_command

    from cxrlab.cli import app

    root = get_command(app)
    out = []
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        out += [[name, sub] for sub in subs] if subs else [[name]]
    return out


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_has_help(command):
    proc = run(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert f"Usage: cxrlab {' '.join(command)}" in proc.stdout


TRAIN_OPTIONS = (
    "--out --config --model --image-size --batch-size --epochs --optimizer --lr --momentum "
    "--weight-decay --schedule --patience --time-budget --class-weights --no-class-weights "
    "--sampler --augment --intensity --wise-ft --label-smoothing --dropout --batchnorm "
    "--no-batchnorm --pretrained --no-pretrained --head --freeze-backbone --no-freeze-backbone "
    "--unfreeze-after --backbone-lr-mult --frozen-stages --seed --val-fraction --folds "
    "--group-regex --image-col --label-col --positive --threshold-rule --target-sensitivity "
    "--precision --channels-last --no-channels-last --deterministic --no-deterministic "
    "--channels --bit-depth --skip-bad --quiet --resume --accelerator --devices --num-nodes "
    "--strategy --logger --mlflow-uri"
).split()


def test_train_help_groups_options_and_shows_defaults():
    """`cxrlab train --help` at 100 columns: options in panels, the recipe's defaults (read from
    RunConfig) shown, --out marked required, no <bool> tags, and every option still there."""
    from cxrlab.config import RunConfig

    proc = run("train", "--help")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for panel in ("Data", "Model", "Training", "Fine-tuning", "Augmentation",
                  "Decision threshold", "Time and hardware", "Tracking"):
        assert f"─ {panel}" in text, panel
    words = " ".join(text.replace("│", " ").split())  # help text unwrapped
    assert f"[default: {RunConfig.model_fields['augment'].default}]" in words
    assert f"[default: {RunConfig.model_fields['batch_size'].default}]" in words
    assert "[required unless --resume]" in words
    assert "docs/recipes.md" in words
    assert all("<bool>" not in ln for ln in text.splitlines() if "--help" not in ln)
    for option in TRAIN_OPTIONS:
        assert f" {option} " in f" {words} ", option
    from typing import get_args

    from cxrlab.config import Augment
    for policy in get_args(Augment):  # --augment's choices as config.py has them
        assert f" {policy} (" in f" {words}" or f" {policy}," in words, policy


def test_train_progress_counts_epochs_from_1_and_says_when_the_run_ends(tmp_path):
    """The bar as `cxrlab train` leaves it: 'Epoch 1/2' ... 'Epoch 2/2' (as plots and logs
    count), and 'run: ends in 7s, ~14:03', a duration beside the clock time."""
    import re

    from tests.conftest import make_kermany_folder

    data = make_kermany_folder(tmp_path / "data", 8, 8)
    proc = run("train", str(data), "--out", str(tmp_path / "run"), "--model", "cnn",
               "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--time-budget", "10m")
    assert proc.returncode == 0, proc.stderr
    bars = [ln for ln in proc.stdout.splitlines() if ln.startswith("Epoch ")]
    assert [b.split()[1] for b in bars] == ["1/2", "2/2"], proc.stdout
    ends = re.compile(r"run: ends in (\d+h\d\dm|\d+m\d\ds|\d+s), ~\d\d:\d\d")
    assert all(ends.search(b) for b in bars), bars


def test_help_defaults_are_runconfigs_and_start_up_stays_light():
    """`train --help`'s defaults come from config.py's source, not an import of it: they equal
    RunConfig's, and building every command's help imports neither config.py nor yaml."""
    from cxrlab.cli import _config_defaults
    from cxrlab.config import RunConfig

    parsed = _config_defaults()
    assert len(parsed) >= 35
    for name, value in parsed.items():
        assert RunConfig.model_fields[name].default == value, name
    code = ("import sys; from typer.main import get_command; from cxrlab.cli import app; "
            "get_command(app); print(sorted({'cxrlab.config', 'yaml', 'torch'} & "
            "set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
