"""Scoring a run on labelled data: its metrics at the run's threshold (fp32 through
cxrlab.deploy.inference, or an ONNX file), with patient-level intervals where patients are
known. The intake check and the stress test on top of these are cxrlab.site.assess's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrlab.data.cache import load_images
from cxrlab.data.prepared import resolve_positive
from cxrlab.data.sources import load_source
from cxrlab.data.split import patient_key
from cxrlab.deploy.export import make_predictor
from cxrlab.deploy.inference import complement_threshold, predict_probs
from cxrlab.errors import CxrlabError
from cxrlab.evaluation import overlap
from cxrlab.evaluation.metrics import compute_metrics
from cxrlab.run import LoadedRun, load_run

log = logging.getLogger("cxrlab")


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


@dataclass
class Scored:
    """A run scored on labelled images: the metrics, and what was scored (for the checks
    that cxrlab.site.assess adds)."""

    run: LoadedRun
    records: list
    images: np.ndarray
    y: np.ndarray
    probs: np.ndarray  # the run's own class scores (before any --positive complement)
    positive: int | None  # the class the metrics are about
    predict: Callable[[np.ndarray], np.ndarray]  # the run's fp32 model
    metrics: dict
    left_out: int = 0  # training images left out (allow_overlap)
    selection_biased: str | None = None  # validation / calibration images among them


def score_run(run_dir: Path, data: Path, image_col: str | None = None,
              label_col: str | None = None, split: str | None = None,
              positive: str | None = None, skip_bad: bool = False,
              n_boot: int = 1000, onnx: Path | None = None,
              allow_overlap: bool = False, tta: str | None = None) -> Scored:
    """Metrics of a finished run on any labelled source, at the run's threshold.

    DATA holding the run's own training images (same path or content:
    cxrlab.evaluation.overlap) is refused; `allow_overlap` scores the rest instead, and
    metrics["overlap"] lists what was left out. Validation (or site calibration) images are
    scored, and the result labelled metrics["selection_biased"].

    `positive` may name the other class: the metrics are then about that class, with the
    same decisions (see `complement_threshold`). `onnx`: score with that file from
    `cxrlab export` (an int8 one on a held-out set, say) instead of the run's fp32 model;
    metrics["onnx"] names it. `tta`: test-time augmentation (None: the run's own,
    cxrlab.run.apply_tta); metrics["tta"] names it.
    """
    run = load_run(run_dir, tta)
    predictor = None
    if onnx is not None:  # checked against the run before any image is decoded
        predictor = make_predictor(run, "onnx", Path(onnx))
    records = labelled_records(run.classes, data, image_col, label_col, split,
                               test_by_default=True)
    pos = run.info.positive
    if positive is not None:
        pos = resolve_positive(run.classes, positive)
    ref = overlap.reference(run.run_dir)
    paths = [r.path for r in records]
    files = overlap.file_digests(paths)
    images, bad = load_images(paths, run.config.image_size, run.info.in_chans,
                              skip_bad=skip_bad, bit_depth=run.bit_depth)
    bad_paths = {Path(p) for p, _ in bad}
    good = [i for i, r in enumerate(records) if r.path not in bad_paths]
    records, paths = [records[i] for i in good], [paths[i] for i in good]
    kinds = ref.match(paths, [files[i] for i in good], overlap.pixel_digests(images))
    # refused after decoding, so the count is exact and a rerun with --allow-overlap is cached
    overlap.screen(kinds, paths, data, allow_overlap)
    left_out = kinds.count("train")
    if left_out:
        keep = [i for i, k in enumerate(kinds) if k != "train"]
        log.warning("left out %d of %d images of %s: the run trained on them "
                    "(--allow-overlap); scoring the other %d", left_out, len(kinds), data,
                    len(keep))
        records, images = [records[i] for i in keep], images[keep]
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
    metrics["tta"] = run.tta
    metrics["skipped"] = [[str(p), why] for p, why in bad]
    metrics["overlap"] = overlap.summary(kinds, paths, ref.checked)
    biased = overlap.selection_note(kinds)
    if biased:
        metrics["selection_biased"] = biased
    if predictor is not None:
        metrics["onnx"] = {"file": str(onnx), "precision": predictor.precision}
    return Scored(run, records, images, y, probs, pos, predict, metrics, left_out, biased)
