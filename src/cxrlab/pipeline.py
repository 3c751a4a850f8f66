"""The commands as library functions: train a run, evaluate it, predict with it.

The CLI only parses options and prints what these return.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cxrlab.config import RunConfig
from cxrlab.data.cache import load_images
from cxrlab.data.images import guess_channels
from cxrlab.data.sources import (
    Record,
    Source,
    is_image_file,
    load_source,
    require_trainable,
)
from cxrlab.data.split import assign_splits, patient_key
from cxrlab.errors import CxrlabError
from cxrlab.inference import complement_threshold, decide, predict_probs
from cxrlab.run import (
    LoadedRun,
    RunInfo,
    check_free_space,
    check_out_dir,
    load_run,
    prepare_out_dir,
    read_history,
    run_lock,
    save_info,
    write_json,
    write_predictions_csv,
    write_split_csv,
    write_threshold,
)

log = logging.getLogger("cxrlab")


# ---------------------------------------------------------------------------------------
# data for a run


@dataclass
class PreparedData:
    source: Source
    records: list[Record]  # the readable ones, in array order
    images: np.ndarray  # uint8 (N, C, S, S)
    labels: np.ndarray  # class index per record
    splits: np.ndarray  # "train" / "val" / "test" per record
    groups: list[str]
    split_message: str
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    split_result: object = None

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.flatnonzero(self.splits == split)
        return self.images[idx], self.labels[idx], idx


def resolve_positive(classes: list[str], positive: str | None) -> int | None:
    """Second class in sorted order unless told otherwise; None for more than 2 classes."""
    if len(classes) != 2:
        if positive is not None:
            raise CxrlabError(f"--positive {positive}: only meaningful with 2 classes")
        return None
    if positive is None:
        return 1
    if positive not in classes:
        raise CxrlabError(f"--positive {positive}: not a class (classes: {', '.join(classes)})")
    return classes.index(positive)


def prepare_data(config: RunConfig) -> PreparedData:
    source = load_source(Path(config.data), config.image_col, config.label_col)
    require_trainable(source)
    channels = config.channels or guess_channels([r.path for r in source.records])
    images, bad = load_images([r.path for r in source.records], config.image_size, channels,
                              skip_bad=config.skip_bad)
    bad_paths = {Path(p) for p, _ in bad}
    records = [r for r in source.records if r.path not in bad_paths]
    if bad:
        for p, why in bad:
            log.warning("skipped %s: %s", p, why)
    kept = Source(source.root, source.kind, records, source.classes)
    require_trainable(kept)
    result = assign_splits(kept, config.val_fraction, config.seed, config.group_regex,
                           config.folds, config.fold)
    if result.message:
        log.info("%s", result.message)
    labels = np.array([source.classes.index(r.label) for r in records], dtype=np.int64)
    splits = np.array(result.splits)
    for name in ("train", "val"):
        if not (splits == name).any():
            raise CxrlabError(f"{config.data}: the {name} split is empty (too few images)")
    train_classes = set(labels[splits == "train"].tolist())
    if len(train_classes) < len(source.classes):
        missing = [c for i, c in enumerate(source.classes) if i not in train_classes]
        raise CxrlabError(f"{config.data}: no training images of class {missing[0]}")
    return PreparedData(kept, records, images, labels, splits, result.groups, result.message,
                        bad, result)


# ---------------------------------------------------------------------------------------
# train


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    """
    from cxrlab import budget
    from cxrlab.distributed import is_rank_zero
    from cxrlab.models import create_model, list_models, resolve_pretrained

    started = time.time()
    out = Path(out)
    rank0 = is_rank_zero()
    if not rank0:
        log.setLevel(logging.WARNING)  # rank 0 tells the story once
    if config.model not in list_models():
        raise CxrlabError(f"--model {config.model}: unknown model; choose from: "
                          f"{', '.join(list_models())}")
    from cxrlab.tracking import check_available

    check_available(config.loggers)
    budget_s = budget.resolve_budget(config)
    if rank0:
        check_out_dir(out)  # refuse before the slow part
    data = prepare_data(config)  # bad data fails here, before anything is written
    classes = data.source.classes
    positive = resolve_positive(classes, config.positive)
    n_out = 1 if len(classes) == 2 else len(classes)
    in_chans = int(data.images.shape[1])
    pretrained = resolve_pretrained(config.model, config.pretrained)
    if config.freeze_backbone and pretrained is None:
        log.warning("--freeze-backbone: %s starts from random weights (no --pretrained); only "
                    "the head will learn, on random features", config.model)

    def make_model(config: RunConfig) -> torch.nn.Module:
        seed_everything(config.seed)  # the initial weights are part of the run
        return create_model(config.model, num_classes=n_out, in_chans=in_chans,
                            dropout=config.dropout, batchnorm=config.batchnorm,
                            pretrained=pretrained, image_size=config.image_size,
                            head=config.head)

    model = make_model(config)
    planned = None
    if budget_s is not None:  # resolve_budget: single-process runs only
        size = config.image_size
        config, planned = budget.plan_config(config, budget_s, model, data, started)
        if config.image_size != size:  # smaller images: decode again, a model for them
            data = prepare_data(config)
            model = make_model(config)
    if not rank0:
        return _train_and_report(model, config, data, positive, out, progress,
                                 mlflow_uri=mlflow_uri)
    check_free_space(out, model)
    prepare_out_dir(out)
    info = RunInfo(classes=classes, positive=positive, in_chans=in_chans)
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
    import errno

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
    from contextlib import ExitStack

    from cxrlab.distributed import is_rank_zero
    from cxrlab.run import load_info

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CxrlabError(f"--resume {run_dir}: run directory not found")
    info = load_info(run_dir)
    if info.state == "complete":
        raise CxrlabError(f"--resume {run_dir}: the run is already complete; nothing to resume")
    rank0 = is_rank_zero()
    with ExitStack() as stack:
        if rank0:
            stack.enter_context(run_lock(run_dir))  # refuses while another process trains it
        return _resume(run_dir, info, rank0, progress, hardware)


def _resume(run_dir: Path, info: RunInfo, rank0: bool, progress: bool,
            hardware: dict | None) -> TrainResult:
    import tempfile

    from cxrlab.checkpoints import LAST
    from cxrlab.models import create_model, resolve_pretrained

    config = RunConfig.load(run_dir / "config.yaml")
    if hardware:
        config = RunConfig.build({**config.model_dump(), **hardware}, source="option")
    from cxrlab.tracking import check_available

    check_available(config.loggers)
    data = prepare_data(config)
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
    seed_everything(config.seed)
    model = create_model(config.model, num_classes=n_out, in_chans=info.in_chans,
                         dropout=config.dropout, batchnorm=config.batchnorm,
                         pretrained=resolve_pretrained(config.model, config.pretrained),
                         image_size=config.image_size, head=config.head)
    ckpt = run_dir / "checkpoints" / LAST
    if not ckpt.is_file():
        log.info("%s: no checkpoint yet; training starts from the first epoch", run_dir)
        ckpt = None
    if not rank0:
        return _train_and_report(model, config, data, positive, run_dir, progress, ckpt)
    if hardware:
        config.save(run_dir / "config.yaml")
    info.state, info.error = "running", None
    save_info(run_dir, info)
    return _guarded(info, run_dir, lambda: _train_and_report(
        model, config, data, positive, run_dir, progress, ckpt))


def _train_and_report(model, config: RunConfig, data: PreparedData, positive: int | None,
                      out: Path, progress: bool, ckpt_path: Path | None = None,
                      mlflow_uri: str | None = None, budgeted=None) -> TrainResult:
    from cxrlab import plots
    from cxrlab.distributed import is_rank_zero
    from cxrlab.evaluate import choose_threshold, compute_metrics
    from cxrlab.tracking import log_final, make_loggers
    from cxrlab.training import fit

    classes = data.source.classes
    tx, ty, _ = data.subset("train")
    vx, vy, vidx = data.subset("val")
    loggers = make_loggers(config, out, mlflow_uri, rank0=is_rank_zero())
    fitted = fit(model, config, tx, ty, vx, vy, len(classes), positive, out, progress,
                 ckpt_path=ckpt_path, loggers=loggers, budgeted=budgeted)
    if fitted.module.global_rank != 0:
        return TrainResult(out, {}, None, fitted.epochs_run, fitted.seconds, len(ty), len(vy),
                           rank=fitted.module.global_rank)
    model = fitted.module.model
    torch.save(model.state_dict(), out / "model.pt")
    vp = predict_probs(model, vx)  # fp32, as every later command (see predict_probs)
    threshold = None
    if positive is not None:
        threshold = choose_threshold((vy == positive).astype(int), vp[:, positive],
                                     config.threshold_rule, config.target_sensitivity)
        write_threshold(out, threshold)
    metrics = compute_metrics(vy, vp, classes, positive=positive, threshold=threshold,
                              seed=config.seed, groups=_patients(data, vidx))
    write_predictions_csv(out / "val_predictions.csv", [data.records[i].path for i in vidx],
                          [classes[k] for k in vy], vp, classes)
    metrics["split"] = "val"
    metrics["selection_biased"] = ("the threshold and the epoch were chosen on these images"
                                   if threshold is not None
                                   else "the epoch was chosen on these images")
    metrics["epochs"] = fitted.epochs_run
    metrics["train_seconds"] = round(fitted.seconds, 1)
    write_json(out / "metrics.json", metrics)
    from cxrlab.intake import write_reference

    seen = np.flatnonzero(np.isin(data.splits, ("train", "val")))  # what the run was shown
    write_reference(out, data.images, [r.path for r in data.records], config.seed, seen)

    test_metrics = None
    if (data.splits == "test").any():
        sx, sy, sidx = data.subset("test")
        sp = predict_probs(model, sx)
        test_metrics = compute_metrics(sy, sp, classes, positive=positive, threshold=threshold,
                                       seed=config.seed, groups=_patients(data, sidx))
        test_metrics["split"] = "test"
        write_json(out / "metrics_test.json", test_metrics)

    plots.plot_history(read_history(out / "history.csv"), out / "curves.png")
    cm = np.array(metrics["confusion_matrix"])
    plots.plot_confusion(cm, classes, out / "confusion_matrix.png",
                         title="Validation confusion matrix")
    plots.plot_roc(vy, vp, classes, out / "roc.png", positive=positive, threshold=threshold)
    plots.plot_pr(vy, vp, classes, out / "pr.png", positive=positive)
    pred = decide(vp, positive, threshold)
    plots.plot_prediction_grid(vx, vy, pred, vp[np.arange(len(pred)), pred], classes,
                               out / "val_predictions.png")
    log_final(loggers, out, metrics, fitted.epochs_run)
    return TrainResult(out, metrics, test_metrics, fitted.epochs_run, fitted.seconds,
                       len(ty), len(vy))


def _patients(data: PreparedData, idx: np.ndarray) -> list[str] | None:
    """Patient keys of these records, for a patient bootstrap; None when the split found none
    (then every image counts as independent, and the metrics say so)."""
    if data.split_result is None or not data.split_result.grouped:
        return None
    return [data.groups[i] for i in idx]


# ---------------------------------------------------------------------------------------
# evaluate


def evaluate_run(run_dir: Path, data: Path, image_col: str | None = None,
                 label_col: str | None = None, split: str | None = None,
                 positive: str | None = None, skip_bad: bool = False,
                 n_boot: int = 1000, shift: bool = False) -> dict:
    """Metrics of a finished run on any labelled source, at the run's threshold.

    Also checks the images against the run's training intake (cxrlab.intake: warnings, and
    metrics["intake"]); `shift` adds the stress test (cxrlab.shift) as metrics["shift"].
    `positive` may name the other class: the metrics are then about that class, with the
    same decisions (see `complement_threshold`); the stress test stays the run's own.
    """
    from cxrlab.evaluate import compute_metrics

    run = load_run(run_dir)
    source = load_source(Path(data), image_col, label_col)
    records = source.records
    if split is not None:
        records = [r for r in records if r.split == split]
        if not records:
            raise CxrlabError(f"--split {split}: no images in that split of {data}")
    elif any(r.split == "test" for r in records):
        records = [r for r in records if r.split == "test"]
    unknown = sorted({r.label for r in records} - set(run.classes))
    if unknown:
        raise CxrlabError(f"{data}: class '{unknown[0]}' was not trained "
                          f"(run classes: {', '.join(run.classes)})")
    pos = run.info.positive
    if positive is not None:
        pos = resolve_positive(run.classes, positive)
    images, bad = load_images([r.path for r in records], run.config.image_size,
                              run.info.in_chans, skip_bad=skip_bad)
    bad_paths = {Path(p) for p, _ in bad}
    records = [r for r in records if r.path not in bad_paths]
    # patients as the run's split read them, so intervals resample patients where known
    keys = [patient_key(r.path, run.config.group_regex) for r in records]
    y = np.array([run.classes.index(r.label) for r in records], dtype=np.int64)

    def predict(x: np.ndarray) -> np.ndarray:
        return predict_probs(run.model, x)  # fp32, as the run's threshold (predict_probs)

    probs = predict(images)
    scored, threshold, strict = probs, run.threshold, False
    if pos != run.info.positive:  # --positive names the class the run did not threshold
        scored, threshold = complement_threshold(probs, run.info.positive, run.threshold)
        strict = True
    metrics = compute_metrics(y, scored, run.classes, positive=pos, threshold=threshold,
                              n_boot=n_boot, seed=run.config.seed,
                              groups=keys if any(keys) else None, strict=strict)
    metrics["data"] = str(data)
    metrics["skipped"] = [[str(p), why] for p, why in bad]
    from cxrlab.intake import check_intake

    metrics["intake"] = check_intake(run, [r.path for r in records], images, probs, pos)
    if shift:
        from cxrlab.shift import stress_test

        metrics["shift"] = stress_test(predict, images, y, run.info.positive, run.threshold,
                                       seed=run.config.seed)
        metrics["shift"]["data"] = str(data)
    return metrics


# ---------------------------------------------------------------------------------------
# predict


def expand_paths(paths: list[Path]) -> list[Path]:
    """Files as given; folders walked for images, in sorted order."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if is_image_file(q))
            if not found:
                raise CxrlabError(f"{p}: no images in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise CxrlabError(f"{p}: no such file or folder")
    return out


def predict_paths(run: LoadedRun | Path, paths: list[Path], skip_bad: bool = False,
                  backend: str = "torch", onnx_file: Path | None = None,
                  cam_dir: Path | None = None, layer: str | None = None) -> list[dict]:
    """One row per image; `backend` torch or onnx (cxrlab.export); `cam_dir` adds a Grad-CAM
    PNG per image (cxrlab.cam) and its path as row["cam"]."""
    from cxrlab.export import make_predictor

    if not isinstance(run, LoadedRun):
        run = load_run(run)
    files = expand_paths(paths)
    cam = None
    if cam_dir is not None:  # a bad --layer fails before any work
        from cxrlab.cam import GradCam

        cam = GradCam(run.model, layer, run.info.positive)
    predictor = make_predictor(run, backend, onnx_file)
    images, bad = load_images(files, run.config.image_size, run.info.in_chans,
                              cache_dir=None, skip_bad=skip_bad)
    bad_paths = {Path(p) for p, _ in bad}
    files = [f for f in files if f not in bad_paths]
    rows = prediction_rows(run, [str(f) for f in files], predictor(images))
    if cam is not None:
        from cxrlab.cam import write_cam_pngs

        pngs = write_cam_pngs(run, files, images, rows, Path(cam_dir), cam=cam)
        for row, png in zip(rows, pngs, strict=True):
            row["cam"] = str(png)
    for f, why in bad:
        rows.append({"path": str(f), "error": why})
    return rows


def prediction_rows(run: LoadedRun, names: list, probs: np.ndarray) -> list[dict]:
    """One row per image: path (its name), class at the run's threshold, probabilities."""
    pred = decide(probs, run.info.positive, run.threshold)
    return [{
        "path": name,
        "class": run.classes[int(k)],
        "probabilities": {c: round(float(v), 6) for c, v in zip(run.classes, p, strict=True)},
        "threshold": run.threshold,
    } for name, p, k in zip(names, probs, pred, strict=True)]
