"""A run's life: train it (validated first, complete only at the very end), resume it.

`train_run` and `resume_run` are what `cxrlab train` calls; the run directory's files are
cxrlab.run's, the data cxrlab.data.prepared's, the evaluation written after training
cxrlab.training.finish's.
"""

from __future__ import annotations

import errno
import logging
import tempfile
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch import seed_everything

from cxrlab.config import RunConfig
from cxrlab.data.prepared import PreparedData, prepare_data, resolve_positive
from cxrlab.errors import CxrlabError
from cxrlab.models import create_model, import_model, list_models, resolve_pretrained
from cxrlab.reporting.tracking import check_available, log_final, make_loggers
from cxrlab.run import (
    RunInfo,
    check_free_space,
    check_out_dir,
    load_info,
    prepare_out_dir,
    run_bit_depth,
    run_lock,
    save_info,
    write_json,
    write_split_csv,
)
from cxrlab.training import budget, small_sets
from cxrlab.training.checkpoints import LAST
from cxrlab.training.distributed import is_rank_zero
from cxrlab.training.finetune import check_frozen_stages
from cxrlab.training.finish import score_training
from cxrlab.training.loop import fit

log = logging.getLogger("cxrlab")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict
    test_metrics: dict | None
    epochs: int
    seconds: float
    n_train: int
    n_val: int
    rank: int = 0  # data-parallel process; only rank 0 has metrics and wrote the run


def train_run(config: RunConfig, out: Path, progress: bool = True,
              mlflow_uri: str | None = None) -> TrainResult:
    """Validate everything, then train; the run directory says complete only at the very end.

    Under data-parallel training every process runs this; only rank 0 touches `out`.
    `mlflow_uri`: where `--logger mlflow` logs (default: MLFLOW_TRACKING_URI, else the run).
    A run that leaves its schedule to the recipe, on a small set, trains the small-set recipe
    (training/small_sets.py).
    """
    started = time.time()
    out = Path(out)
    rank0 = is_rank_zero()
    if not rank0:
        log.setLevel(logging.WARNING)  # rank 0 tells the story once
    if not import_model(config.model):
        raise CxrlabError(f"--model {config.model}: unknown model; choose from: "
                          f"{', '.join(list_models())}")

    check_available(config.loggers)
    check_frozen_stages(config)
    budget_s = budget.resolve_budget(config)
    if rank0:
        check_out_dir(out)  # refuse before the slow part
    data = prepare_data(config)  # bad data fails here, before anything is written
    small_set = small_sets.small_set_recipe(config, int((data.splits == "train").sum()))
    config = small_sets.with_recipe(config, small_set)  # before the budget plans the run
    classes = data.source.classes
    positive = resolve_positive(classes, config.positive)
    n_out = 1 if len(classes) == 2 else len(classes)
    in_chans = int(data.images.shape[1])
    pretrained = resolve_pretrained(config.model, config.pretrained)
    if config.freeze_backbone and pretrained is None:
        log.warning("--freeze-backbone: %s starts from random weights (no --pretrained); only "
                    "the head will learn, on random features", config.model)

    def make_model(config: RunConfig) -> torch.nn.Module:
        # the initial weights are part of the run; Lightning's seeding (python, NumPy,
        # torch) is the one fit() repeats before training
        seed_everything(config.seed, workers=True, verbose=False)
        return create_model(config.model, num_classes=n_out, in_chans=in_chans,
                            dropout=config.dropout, batchnorm=config.batchnorm,
                            pretrained=pretrained, image_size=config.image_size,
                            intensity=config.intensity, head=config.head)

    model = make_model(config)
    planned = None
    if budget_s is not None:  # resolve_budget: single-process runs only
        size = config.image_size
        config, planned = budget.plan_config(config, budget_s, model, data, started)
        if config.image_size != size:  # smaller images: decode again, a model for them
            data = prepare_data(config, data.bit_depth)
            model = make_model(config)
    if not rank0:
        return _train_and_report(model, config, data, positive, out, progress,
                                 mlflow_uri=mlflow_uri)
    check_free_space(out, model)
    prepare_out_dir(out)
    info = RunInfo(classes=classes, positive=positive, in_chans=in_chans,
                   data_bit_depth=data.bit_depth.data,
                   small_set=None if small_set is None else small_set.to_dict())
    if planned is not None and small_set is not None:
        planned.record["small_set"] = small_set.to_dict()
    save_info(out, info)

    def work() -> TrainResult:
        config.save(out / "config.yaml")
        write_split_csv(out / "split.csv", data.source, data.split_result)
        if planned is not None:
            write_json(out / "plan.json", planned.record)
        return _train_and_report(model, config, data, positive, out, progress,
                                 mlflow_uri=mlflow_uri, budgeted=planned)

    with run_lock(out):
        return _guarded(info, out, work)


def _guarded(info: RunInfo, out: Path, work) -> TrainResult:
    """run.json says complete only when `work` finished, failed (with the error) when it raised.

    A killed process (SIGKILL, power cut) leaves `running`; `cxrlab train --resume` continues
    both. A full or read-only disk during training becomes a one-line error.
    """
    try:
        result = work()
    except BaseException as e:
        info.state = "failed"
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit))
        info.error = "interrupted" if interrupted else f"{type(e).__name__}: {e}"
        try:
            save_info(out, info)
            if not isinstance(e, (CxrlabError, KeyboardInterrupt, SystemExit, OSError)):
                (out / "error.txt").write_text(traceback.format_exc())
        except OSError:
            pass  # the disk that failed the run may refuse this too
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                                                  errno.EACCES, errno.EIO):
            where = e.filename or out
            raise CxrlabError(f"{where}: {e.strerror} while training; the run is kept "
                              f"(state failed): fix it, then cxrlab train --resume {out}"
                              ) from None
        raise
    info.state = "complete"
    save_info(out, info)
    return result


def resume_run(run_dir: Path, progress: bool = True,
               hardware: dict | None = None) -> TrainResult:
    """Continue a killed or failed run from checkpoints/last.ckpt, in its own directory.

    The result equals that of an uninterrupted run (same machine): the checkpoint holds model,
    optimizer, scheduler, random generators, early stopping, best checkpoint and history.
    `hardware` may change devices / num_nodes / strategy / accelerator (then it need not).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CxrlabError(f"--resume {run_dir}: run directory not found")
    info = load_info(run_dir)
    if info.state == "complete":
        raise CxrlabError(f"--resume {run_dir}: the run is already complete; nothing to resume "
                          "(to train it on: --epochs N, more than it has)")
    rank0 = is_rank_zero()
    with ExitStack() as stack:
        if rank0:
            stack.enter_context(run_lock(run_dir))  # refuses while another process trains it
        return _resume(run_dir, info, rank0, progress, hardware)


def _resume(run_dir: Path, info: RunInfo, rank0: bool, progress: bool,
            hardware: dict | None, config: RunConfig | None = None,
            before=None) -> TrainResult:
    """`config` and `before`: a continuation's new config, and what it changes in the run once
    the data checked out (training/continuation.py)."""
    config = config or RunConfig.load(run_dir / "config.yaml")
    if hardware:
        config = RunConfig.build({**config.model_dump(), **hardware}, source="option")

    check_available(config.loggers)
    data = prepare_data(config, run_bit_depth(config, info))  # read as it started, not anew
    if data.source.classes != info.classes:
        raise CxrlabError(f"{config.data}: classes are now {', '.join(data.source.classes)}, "
                          f"the run was started with {', '.join(info.classes)}")
    with tempfile.TemporaryDirectory() as tmp:
        write_split_csv(Path(tmp) / "split.csv", data.source, data.split_result)
        same = (Path(tmp) / "split.csv").read_bytes() == (run_dir / "split.csv").read_bytes()
    if not same:
        raise CxrlabError(f"{config.data}: the images differ from those the run started with "
                          f"(compare {run_dir / 'split.csv'}); start a new run")
    positive = info.positive
    n_out = 1 if len(info.classes) == 2 else len(info.classes)
    seed_everything(config.seed, workers=True, verbose=False)
    model = create_model(config.model, num_classes=n_out, in_chans=info.in_chans,
                         dropout=config.dropout, batchnorm=config.batchnorm,
                         pretrained=resolve_pretrained(config.model, config.pretrained),
                         image_size=config.image_size, intensity=config.intensity, head=config.head)
    ckpt = run_dir / "checkpoints" / LAST
    if not ckpt.is_file():
        log.info("%s: no checkpoint yet; training starts from the first epoch", run_dir)
        ckpt = None
    if not rank0:
        return _train_and_report(model, config, data, positive, run_dir, progress, ckpt)
    if before is not None:
        before()
    if hardware:
        config.save(run_dir / "config.yaml")
    info.state, info.error = "running", None
    save_info(run_dir, info)
    return _guarded(info, run_dir, lambda: _train_and_report(
        model, config, data, positive, run_dir, progress, ckpt))


def _train_and_report(model, config: RunConfig, data: PreparedData, positive: int | None,
                      out: Path, progress: bool, ckpt_path: Path | None = None,
                      mlflow_uri: str | None = None, budgeted=None) -> TrainResult:
    classes = data.source.classes
    tx, ty, _ = data.subset("train")
    vx, vy, _ = data.subset("val")
    loggers = make_loggers(config, out, mlflow_uri, rank0=is_rank_zero())
    fitted = fit(model, config, tx, ty, vx, vy, len(classes), positive, out, progress,
                 ckpt_path=ckpt_path, loggers=loggers, budgeted=budgeted)
    if fitted.module.global_rank != 0:
        return TrainResult(out, {}, None, fitted.epochs_run, fitted.seconds, len(ty), len(vy),
                           rank=fitted.module.global_rank)
    model = fitted.module.model
    torch.save(model.state_dict(), out / "model.pt")
    metrics, test_metrics = score_training(model, config, data, positive, out,
                                           fitted.epochs_run, fitted.seconds,
                                           fitted.precision)
    log_final(loggers, out, metrics, fitted.epochs_run)
    return TrainResult(out, metrics, test_metrics, fitted.epochs_run, fitted.seconds,
                       len(ty), len(vy))
