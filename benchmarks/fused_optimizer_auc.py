"""Does the fused optimizer change results? A recipe (resnet18 from scratch unless --model)
trained twice, fused vs plain.

    python benchmarks/fused_optimizer_auc.py --out /tmp/fused-auc                 # full recipe
    python benchmarks/fused_optimizer_auc.py --out /tmp/fused-auc --epochs 2 --image-size 128

`train.make_optimizer` builds fused optimizers (one kernel for all parameters). The update is
the same up to float rounding (tests/training/test_optimizer.py); here the rounding differences are
allowed to compound over a whole training run and the validation AUC of the two runs is
compared (same seed, same split, deterministic). Target: |difference| <= 0.005.
Each variant is an ordinary run directory under --out; a finished one is read, not retrained.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cxrlab.config import RunConfig
from cxrlab.training import loop as train
from cxrlab.training.lifecycle import train_run

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray" / "train"


def plain_optimizer(params, c: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch's default implementations (a per-parameter loop on CPU): the path before fusing."""
    if c.optimizer == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                               nesterov=c.momentum > 0)
    if c.optimizer == "adam":
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
    return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="resnet18", help="the recipe measured in results/")
    ap.add_argument("--epochs", type=int, help="shorten the recipe (default: the recipe's)")
    ap.add_argument("--image-size", type=int, help="shorten the recipe (default: the recipe's)")
    args = ap.parse_args()
    overrides = {"data": args.data, "model": args.model}
    if args.epochs:
        overrides["epochs"] = args.epochs
    if args.image_size:
        overrides["image_size"] = args.image_size
    fused_optimizer = train.make_optimizer
    rows = {}
    for name, make in (("plain", plain_optimizer), ("fused", fused_optimizer)):
        run = args.out / name
        if not (run / "metrics.json").is_file():
            train.make_optimizer = make  # what ClassifierModule.configure_optimizers calls
            t0 = time.perf_counter()
            train_run(RunConfig.build(overrides), run, progress=False)
            (run / "wall_seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
        m = json.loads((run / "metrics.json").read_text())
        rows[name] = (m, float((run / "wall_seconds").read_text()))
    train.make_optimizer = fused_optimizer
    cfg = RunConfig.load(args.out / "fused" / "config.yaml")
    t = Table("optimizer", "val AUC", "val acc", "epochs", "train s", "wall s",
              title=f"default recipe ({cfg.model}, {cfg.image_size} px, {cfg.epochs} epochs, "
                    f"{cfg.data}), "
                    f"fused vs plain optimizer")
    for name, (m, wall) in rows.items():
        t.add_row(name, f"{m['roc_auc']:.4f}", f"{m['accuracy']:.4f}", str(m["epochs"]),
                  f"{m['train_seconds']:.0f}", f"{wall:.0f}")
    diff = abs(rows["fused"][0]["roc_auc"] - rows["plain"][0]["roc_auc"])
    t.caption = f"|AUC difference| = {diff:.4f} (target <= 0.005)"
    Console().print(t)


if __name__ == "__main__":
    main()
