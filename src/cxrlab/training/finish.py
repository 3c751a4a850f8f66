"""A just-trained run's evaluation, written into its directory: the threshold chosen on
validation, metrics.json (+ metrics_test.json), val_predictions.csv, the intake reference
(intake.json, cxrlab.site.intake) and the plots. The last step of training (lifecycle)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from cxrlab.config import RunConfig
from cxrlab.data.prepared import PreparedData
from cxrlab.deploy.inference import decide, predict_probs
from cxrlab.evaluation import overlap
from cxrlab.evaluation.metrics import compute_metrics
from cxrlab.evaluation.operating_point import decide_on_validation, warning
from cxrlab.models.tta import with_tta
from cxrlab.reporting import plots
from cxrlab.run import read_history, write_json, write_predictions_csv, write_threshold
from cxrlab.site.intake import write_reference

log = logging.getLogger("cxrlab")


def score_training(model: torch.nn.Module, config: RunConfig, data: PreparedData,
                   positive: int | None, out: Path, epochs: int,
                   seconds: float, precision: str) -> tuple[dict, dict | None]:
    """A just-trained run's evaluation, written into its directory: the threshold chosen on
    validation, metrics.json (+ metrics_test.json), val_predictions.csv, intake.json and the
    plots. Returns (validation metrics, test metrics or None)."""
    classes = data.source.classes
    vx, vy, vidx = data.subset("val")
    model = with_tta(model, config.tta)  # the threshold is chosen on the scores used later
    vp = predict_probs(model, vx)  # fp32, as every later command (see predict_probs)
    threshold, metrics = decide_on_validation(
        vy, vp, classes, positive, config.threshold_rule, config.target_sensitivity,
        config.seed, _patients(data, vidx))
    if threshold is not None:
        write_threshold(out, threshold)
        if warning(metrics["threshold_stability"]):
            log.warning(warning(metrics["threshold_stability"]))
    write_predictions_csv(out / "val_predictions.csv", [data.records[i].path for i in vidx],
                          [classes[k] for k in vy], vp, classes)
    metrics["split"] = "val"
    metrics["selection_biased"] = ("the threshold and the epoch were chosen on these images"
                                   if threshold is not None
                                   else "the epoch was chosen on these images")
    metrics["epochs"] = epochs
    metrics["train_seconds"] = round(seconds, 1)
    metrics["train_precision"] = precision  # `auto` resolved: differs between machines
    metrics["tta"] = config.tta
    copies = _record_digests(out, data)
    if copies["val"]:
        metrics["copies_of_training"] = copies["val"]
    write_json(out / "metrics.json", metrics)
    seen = np.flatnonzero(np.isin(data.splits, ("train", "val")))  # what the run was shown
    write_reference(out, data.images, [r.path for r in data.records], config.seed, seen)

    test_metrics = None
    if (data.splits == "test").any():
        sx, sy, sidx = data.subset("test")
        sp = predict_probs(model, sx)
        test_metrics = compute_metrics(sy, sp, classes, positive=positive, threshold=threshold,
                                       seed=config.seed, groups=_patients(data, sidx))
        test_metrics["split"] = "test"
        if copies["test"]:
            test_metrics["copies_of_training"] = copies["test"]
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


def _record_digests(out: Path, data: PreparedData) -> dict[str, int]:
    """RUN/digests.csv of the images the run was shown (evaluate's overlap check), and per
    split how many images are copies of a training image (same bytes or pixels under another
    name: leakage that `cxrlab data summary` lists too), each warned about once."""
    paths = [r.path for r in data.records]
    files = overlap.file_digests(paths)
    pixels = overlap.pixel_digests(data.images)
    seen = np.flatnonzero(np.isin(data.splits, ("train", "val")))
    overlap.record(out, [paths[i] for i in seen], [str(data.splits[i]) for i in seen],
                   [files[i] for i in seen], [pixels[i] for i in seen])
    train = np.flatnonzero(data.splits == "train")
    known = {files[i] for i in train if files[i]} | {pixels[i] for i in train}
    copies = {}
    for split in ("val", "test"):
        copies[split] = sum(files[i] in known or pixels[i] in known
                            for i in np.flatnonzero(data.splits == split))
        if copies[split]:
            log.warning("%d %s image(s) are copies of training images (same content, another "
                        "name): the %s figures are optimistic (`cxrlab data summary` lists "
                        "them)", copies[split], split, split)
    return copies


def _patients(data: PreparedData, idx: np.ndarray) -> list[str] | None:
    """Patient keys of these records, for a patient bootstrap; None when the split found none
    (then every image counts as independent, and the metrics say so)."""
    if data.split_result is None or not data.split_result.grouped:
        return None
    return [data.groups[i] for i in idx]
