"""Keep training a complete run: `cxrlab train --resume RUN --epochs N`, `Run.fit(epochs=k)`.

The run goes on in its own directory from checkpoints/last.ckpt (model, optimizer, schedule,
random generators, best-epoch tracking), to N epochs in all; what changes is written in
config.yaml (`epochs`, `continued`: see training/restarts.py for the schedule and early
stopping), so the continued run is one run: history.csv goes on counting epochs, model.pt is
the best epoch of all of them, and threshold, metrics, plots and digests are written again at
the end as for any run. A continuation killed midway is resumed like any run
(`--resume RUN`) and ends exactly as if it had not been.

Nothing a user has is lost: before anything changes, the run's result (its top-level files:
model.pt, metrics, threshold, plots, config.yaml, ...) is copied to RUN/previous/epochs-D/, a
complete run of its own (load, evaluate, serve, `cxrlab compare RUN/previous/epochs-D RUN`).
RUN's own model.pt and metrics are replaced only when the continuation has finished; while it
trains, or if it fails, RUN says so in run.json and the copy is the last complete result.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError
from cxrlab.run import SHIFT_JSON, load_info, read_history, run_lock, save_info
from cxrlab.training.checkpoints import LAST
from cxrlab.training.crossval import CONFIG_FILE, is_crossval_dir
from cxrlab.training.distributed import is_rank_zero
from cxrlab.training.lifecycle import TrainResult, _resume, resume_run

PREVIOUS = "previous"  # RUN/previous/epochs-D: the result before a continuation from epoch D
STALE = (SHIFT_JSON, "shift.png")  # the stress test of the previous model: kept in the copy only


def wants_continuation(run_dir: Path, epochs: int) -> bool:
    """`--resume RUN --epochs N` asks for more training (not to finish a killed run): RUN is
    complete, or N is not the epochs its config.yaml says."""
    run_dir = Path(run_dir)
    if is_crossval_dir(run_dir):
        return epochs != RunConfig.load(run_dir / CONFIG_FILE).epochs
    if not (run_dir / "run.json").is_file() or not (run_dir / "config.yaml").is_file():
        return False  # resuming says what is missing
    return (load_info(run_dir).state == "complete"
            or epochs != RunConfig.load(run_dir / "config.yaml").epochs)


def epochs_done(run_dir: Path) -> int:
    """Epochs the run has trained (history.csv's rows, as its last checkpoint recorded them)."""
    path = Path(run_dir) / "history.csv"
    return len(read_history(path)) if path.is_file() else 0


def continue_run(run_dir: Path, epochs: int, progress: bool = True,
                 hardware: dict | None = None, option: str = "--epochs") -> TrainResult:
    """Train the complete run `run_dir` on to `epochs` in all. Refused, with RUN untouched:
    fewer epochs than done, a cross-validation, a run not complete (finish it first)."""
    run_dir = Path(run_dir)
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        raise CxrlabError(f"{option} {epochs!r}: expected a whole number of epochs")
    if not run_dir.is_dir():
        raise CxrlabError(f"--resume {run_dir}: run directory not found")
    if is_crossval_dir(run_dir):
        raise CxrlabError(f"{option} {epochs}: --resume {run_dir} is a cross-validation; "
                          "continuing one is not supported (train a new one with more epochs)")
    info = load_info(run_dir)
    config = RunConfig.load(run_dir / "config.yaml")
    if info.state != "complete":
        if epochs == config.epochs:
            return resume_run(run_dir, progress=progress, hardware=hardware)
        raise CxrlabError(f"{option} {epochs}: --resume {run_dir} is not complete (state "
                          f"{info.state}); finish it first (--resume {run_dir} trains its "
                          f"{config.epochs} epochs), then continue")
    if config.model_dump().get("seeds") is not None:
        raise CxrlabError(f"{option} {epochs}: {run_dir} is an ensemble of seeds; continuing "
                          "one is not supported (train a new one with more epochs)")
    if config.folds is not None:
        raise CxrlabError(f"{option} {epochs}: {run_dir} is fold {config.fold} of a "
                          "cross-validation; continuing one fold is not supported")
    done = epochs_done(run_dir)
    if epochs <= done:
        raise CxrlabError(f"{option} {epochs}: --resume {run_dir} has trained {done} epochs; "
                          f"continuing needs more than {done}")
    if not (run_dir / "checkpoints" / LAST).is_file():
        raise CxrlabError(f"--resume {run_dir}: no checkpoints/{LAST} to continue from")
    values = {**config.model_dump(), **(hardware or {}), "epochs": epochs,
              "continued": [*config.model_dump()["continued"],
                            {"at_epoch": done, "epochs_before": config.epochs}]}
    new = RunConfig.build(values, source=str(run_dir / "config.yaml"))
    if not is_rank_zero():  # under DDP rank 0 prepared the run before the others started
        return resume_run(run_dir, progress=progress, hardware=hardware)

    def start() -> None:  # once the data checked out: nothing changed before
        keep_previous(run_dir, done)
        info.state, info.error = "running", None
        save_info(run_dir, info)  # before config.yaml: never "complete" with the new length
        new.save(run_dir / "config.yaml")
        for name in STALE:
            (run_dir / name).unlink(missing_ok=True)

    with run_lock(run_dir):
        return _resume(run_dir, info, True, progress, hardware, config=new, before=start)


def keep_previous(run_dir: Path, done: int) -> Path:
    """Copy the run's top-level files to RUN/previous/epochs-<done>/ (written beside it, then
    renamed: there whole or not at all)."""
    target = run_dir / PREVIOUS / f"epochs-{done}"
    if target.exists():
        raise CxrlabError(f"{target}: exists; move it away to continue {run_dir} again from "
                          f"epoch {done}")
    target.parent.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for f in sorted(run_dir.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        tmp.chmod(0o755)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
