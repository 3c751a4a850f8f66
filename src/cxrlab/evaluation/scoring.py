"""Scoring a run: the evaluation written after training, `evaluate` on new data, `predict`.

All of it scores through cxrlab.deploy.inference (fp32, one decision rule) and reads or writes the run
directory through cxrlab.run. Not to be confused with cxrlab.evaluation.metrics, which holds the metrics,
thresholds and bootstrap intervals these compute with.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxrlab.config import RunConfig
from cxrlab.data.cache import load_images
from cxrlab.data.prepared import PreparedData, resolve_positive
from cxrlab.data.sources import is_image_file, load_source
from cxrlab.data.split import patient_key
from cxrlab.errors import CxrlabError
from cxrlab.deploy.inference import complement_threshold, decide, predict_probs
from cxrlab.run import (
    LoadedRun,
    load_run,
    read_history,
    write_json,
    write_predictions_csv,
    write_threshold,
)

# ---------------------------------------------------------------------------------------
# after training


def score_training(model: torch.nn.Module, config: RunConfig, data: PreparedData,
                   positive: int | None, out: Path, epochs: int,
                   seconds: float, precision: str) -> tuple[dict, dict | None]:
    """A just-trained run's evaluation, written into its directory: the threshold chosen on
    validation, metrics.json (+ metrics_test.json), val_predictions.csv, intake.json and the
    plots. Returns (validation metrics, test metrics or None)."""
    from cxrlab.reporting import plots
    from cxrlab.evaluation.metrics import choose_threshold, compute_metrics

    classes = data.source.classes
    vx, vy, vidx = data.subset("val")
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
    metrics["epochs"] = epochs
    metrics["train_seconds"] = round(seconds, 1)
    metrics["train_precision"] = precision  # `auto` resolved: differs between machines
    write_json(out / "metrics.json", metrics)
    from cxrlab.site.intake import write_reference

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
    return metrics, test_metrics


def _patients(data: PreparedData, idx: np.ndarray) -> list[str] | None:
    """Patient keys of these records, for a patient bootstrap; None when the split found none
    (then every image counts as independent, and the metrics say so)."""
    if data.split_result is None or not data.split_result.grouped:
        return None
    return [data.groups[i] for i in idx]


# ---------------------------------------------------------------------------------------
# evaluate


def labelled_records(classes: list[str], data: Path, image_col: str | None,
                     label_col: str | None, split: str | None,
                     test_by_default: bool = False) -> list:
    """The records of `data` a run is scored (or calibrated) on: `split` only when given
    (else its test split, with `test_by_default`), refused when a class was not trained."""
    records = load_source(Path(data), image_col, label_col).records
    if split is not None:
        records = [r for r in records if r.split == split]
        if not records:
            raise CxrlabError(f"--split {split}: no images in that split of {data}")
    elif test_by_default and any(r.split == "test" for r in records):
        records = [r for r in records if r.split == "test"]
    unknown = sorted({r.label for r in records} - set(classes))
    if unknown:
        raise CxrlabError(f"{data}: class '{unknown[0]}' was not trained "
                          f"(run classes: {', '.join(classes)})")
    return records


def evaluate_run(run_dir: Path, data: Path, image_col: str | None = None,
                 label_col: str | None = None, split: str | None = None,
                 positive: str | None = None, skip_bad: bool = False,
                 n_boot: int = 1000, shift: bool = False, onnx: Path | None = None) -> dict:
    """Metrics of a finished run on any labelled source, at the run's threshold.

    Also checks the images against the run's training intake (cxrlab.site.intake: warnings, and
    metrics["intake"]); `shift` adds the stress test (cxrlab.site.shift) as metrics["shift"].
    `positive` may name the other class: the metrics are then about that class, with the
    same decisions (see `complement_threshold`); the stress test stays the run's own.
    `onnx`: score with that file from `cxrlab export` (an int8 one on a held-out set, say)
    instead of the run's fp32 model; metrics["onnx"] names it.
    """
    from cxrlab.evaluation.metrics import compute_metrics

    if onnx is not None and shift:
        raise CxrlabError("--shift with --onnx: the stress test (RUN/shift.json) is the run's "
                          "own, in fp32; run it without --onnx")
    run = load_run(run_dir)
    predictor = None
    if onnx is not None:  # checked against the run before any image is decoded
        from cxrlab.deploy.export import make_predictor

        predictor = make_predictor(run, "onnx", Path(onnx))
    records = labelled_records(run.classes, data, image_col, label_col, split,
                               test_by_default=True)
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

    probs = predict(images) if predictor is None else predictor(images)
    scored, threshold, strict = probs, run.threshold, False
    if pos != run.info.positive:  # --positive names the class the run did not threshold
        scored, threshold = complement_threshold(probs, run.info.positive, run.threshold)
        strict = True
    metrics = compute_metrics(y, scored, run.classes, positive=pos, threshold=threshold,
                              n_boot=n_boot, seed=run.config.seed,
                              groups=keys if any(keys) else None, strict=strict)
    metrics["data"] = str(data)
    metrics["skipped"] = [[str(p), why] for p, why in bad]
    if predictor is not None:
        metrics["onnx"] = {"file": str(onnx), "precision": predictor.precision}
    from cxrlab.site.intake import check_intake

    metrics["intake"] = check_intake(run, [r.path for r in records], images, probs, pos)
    if shift:
        from cxrlab.site.shift import stress_test

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
    """One row per image; `backend` torch or onnx (cxrlab.deploy.export); `cam_dir` adds a Grad-CAM
    PNG per image (cxrlab.deploy.cam) and its path as row["cam"]."""
    from cxrlab.deploy.export import make_predictor

    if not isinstance(run, LoadedRun):
        run = load_run(run)
    files = expand_paths(paths)
    cam = None
    if cam_dir is not None:  # a bad --layer fails before any work
        from cxrlab.deploy.cam import GradCam

        cam = GradCam(run.model, layer, run.info.positive)
    predictor = make_predictor(run, backend, onnx_file)
    images, bad = load_images(files, run.config.image_size, run.info.in_chans,
                              cache_dir=None, skip_bad=skip_bad)
    bad_paths = {Path(p) for p, _ in bad}
    files = [f for f in files if f not in bad_paths]
    rows = prediction_rows(run, [str(f) for f in files], predictor(images))
    if cam is not None:
        from cxrlab.deploy.cam import write_cam_pngs

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
