"""Train named recipes on a dataset and print model x recipe -> validation figures, wall time.

    python benchmarks/recipes.py ../shared/data/chest_xray/train --out runs/bench default
    python benchmarks/recipes.py DATA --out DIR default cnn-notebook

Each recipe is an ordinary run directory under DIR; a finished one is read, not retrained.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cxrlab.config import RunConfig
from cxrlab.training.lifecycle import train_run

RECIPES: dict[str, dict] = {
    # ImageNet EfficientNet-Lite0 (packaged weights), 192 px: one epoch of head only, then
    # everything with the backbone at a tenth of the learning rate, 9 epochs.
    "default": {},
    "resnet18": dict(model="resnet18"),  # from scratch, 192 px, 14 epochs (the first default)
    "cnn-notebook": dict(model="cnn", image_size=180, optimizer="adam", lr=1e-3,
                         weight_decay=0.0, augment="notebook", schedule="plateau"),
    "resnet18-224": dict(model="resnet18", image_size=224, epochs=10),
    # head only on pooled features computed once (the feature cache)
    "effnet-lite0-frozen": dict(model="efficientnet_lite0", image_size=224,
                                freeze_backbone=True, augment="none", epochs=30),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("recipes", nargs="+", choices=sorted(RECIPES))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    table = Table("recipe", "model", "px", "epochs", "val AUC", "val acc", "sens", "spec",
                  "threshold", "wall min",
                  title=f"{args.data} - {platform.processor() or platform.machine()}, "
                        f"{date.today()}")
    for name in args.recipes:
        run = args.out / name
        if not (run / "metrics.json").is_file():
            cfg = RunConfig.build({"data": args.data, "seed": args.seed, **RECIPES[name]})
            t0 = time.perf_counter()
            train_run(cfg, run, progress=False)
            (run / "wall_seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
        m = json.loads((run / "metrics.json").read_text())
        cfg = RunConfig.load(run / "config.yaml")
        wall = float((run / "wall_seconds").read_text()) if (run / "wall_seconds").exists() else 0
        thr = "-" if m["threshold"] is None else f"{m['threshold']:.3f}"  # > 2 classes: none
        table.add_row(name, cfg.model, str(cfg.image_size), str(m["epochs"]),
                      f"{m['roc_auc']:.4f}", f"{m['accuracy']:.4f}", f"{m['recall']:.3f}",
                      f"{m['specificity']:.3f}", thr, f"{wall / 60:.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
