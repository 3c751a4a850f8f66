"""Data-parallel training: 2 processes (gloo on loopback) train one run whose validation
metrics, gathered across the processes, equal a single-process evaluation of its checkpoint."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlab.config import RunConfig
from cxrlab.data.cache import load_images
from cxrlab.data.split import read_split_csv
from cxrlab.run import load_run
from cxrlab.train import ClassifierModule, class_weights, epoch_summary, probabilities
from tests.conftest import make_kermany_folder


def evaluate_checkpoint_alone(run: Path) -> dict:
    """The validation summary of the run's best weights, in this one process."""
    loaded = load_run(run)
    cfg: RunConfig = loaded.config
    rows = read_split_csv(run / "split.csv")
    classes = loaded.classes

    def part(name):
        sel = [r for r in rows if r["split"] == name]
        x, _ = load_images([Path(r["path"]) for r in sel], cfg.image_size, loaded.info.in_chans)
        return x, np.array([classes.index(r["label"]) for r in sel])

    tx, ty = part("train")
    vx, vy = part("val")
    module = ClassifierModule(loaded.model, cfg, len(classes), class_weights(ty, len(classes)),
                              loaded.info.positive)
    with torch.no_grad():
        logits = loaded.model.eval()(torch.as_tensor(vx).float() / 255)
        loss = float(module.loss(logits, torch.as_tensor(vy)))
    summary = epoch_summary(vy, probabilities(logits).numpy(), loaded.info.positive, loss)
    return {"n_val": len(vy), **summary}


@pytest.mark.timeout(300)
def test_two_processes_train_one_checkpoint_with_gathered_metrics(tmp_path):
    # 21 patients of each class, one image each: 9 validation images, an odd number, so the
    # distributed sampler pads one duplicate that the gathered metrics must drop
    data = make_kermany_folder(tmp_path / "data", 21, 21, size=32, images_per_patient=1)
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "cxrlab.cli", "train", str(data), "--out", str(run),
         "--model", "cnn", "--image-size", "32", "--epochs", "2", "--batch-size", "4",
         "--augment", "none", "--precision", "fp32", "--quiet",
         "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
        env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stdout.count("Run written to") == 1  # rank 1 reports nothing

    assert json.loads((run / "run.json").read_text())["state"] == "complete"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    with (run / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [1, 2]
    best = min(history, key=lambda r: float(r["val_loss"]))

    alone = evaluate_checkpoint_alone(run)
    assert alone["n_val"] % 2 == 1
    for k in ("loss", "acc", "precision", "recall", "auc"):
        assert float(best[f"val_{k}"]) == pytest.approx(alone[k], rel=1e-5, abs=1e-6), k
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] == alone["n_val"]
