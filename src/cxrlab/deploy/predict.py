"""`predict`: a run's decisions on image files or folders, one row per image, through the
run's fp32 model or its ONNX export (cxrlab.deploy.export), with Grad-CAM PNGs on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrlab.data.cache import load_images
from cxrlab.data.sources import is_image_file
from cxrlab.deploy.cam import GradCam, write_cam_pngs
from cxrlab.deploy.export import make_predictor
from cxrlab.deploy.inference import decide, decision_rule
from cxrlab.errors import CxrlabError
from cxrlab.run import LoadedRun, load_run


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
    if not isinstance(run, LoadedRun):
        run = load_run(run)
    files = expand_paths(paths)
    cam = None
    if cam_dir is not None:  # a bad --layer fails before any work
        cam = GradCam(run.model, layer, run.info.positive)
    predictor = make_predictor(run, backend, onnx_file)
    images, bad = load_images(files, run.config.image_size, run.info.in_chans,
                              cache_dir=None, skip_bad=skip_bad, bit_depth=run.bit_depth)
    bad_paths = {Path(p) for p, _ in bad}
    files = [f for f in files if f not in bad_paths]
    rows = prediction_rows(run, [str(f) for f in files], predictor(images))
    if cam is not None:
        pngs = write_cam_pngs(run, files, images, rows, Path(cam_dir), cam=cam)
        for row, png in zip(rows, pngs, strict=True):
            row["cam"] = str(png)
    for f, why in bad:
        rows.append({"path": str(f), "error": why})
    return rows


def prediction_rows(run: LoadedRun, names: list, probs: np.ndarray) -> list[dict]:
    """One row per image: path (its name), class at the run's threshold, probabilities, and
    the rule that decided (2 classes: positive_class, positive_score, threshold, rule)."""
    pred = decide(probs, run.info.positive, run.threshold)
    return [{
        "path": name,
        "class": run.classes[int(k)],
        "probabilities": {c: round(float(v), 6) for c, v in zip(run.classes, p, strict=True)},
        "threshold": run.threshold,
        **decision_rule(p, run.classes, run.info.positive, run.threshold),
    } for name, p, k in zip(names, probs, pred, strict=True)]
