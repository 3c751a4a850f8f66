"""Frozen-backbone training with and without the pooled-feature cache, in one run.

    python benchmarks/feature_cache.py ../shared/data/chest_xray/train
    python benchmarks/feature_cache.py ../shared/data/chest_xray/train --limit 300

efficientnet_lite0 (packaged ImageNet weights), 224 px, backbone frozen, no augmentation,
20 epochs (no early stopping), the same seed and data for both runs; prints both wall times,
their ratio, the largest difference between the two trained heads, and the machine's load
(`os.getloadavg`) before and after. `--limit N` trains on the first N training images of the
grouped split (and N/4 validation images) when the full set does not fit the time available.
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import seed_everything

from cxrlab.config import RunConfig
from cxrlab.data.prepared import prepare_data, resolve_positive
from cxrlab.models import create_model
from cxrlab.training.loop import fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--limit", type=int, default=None, help="training images (default: all)")
    args = ap.parse_args()
    cfg = RunConfig.build(dict(data=args.data, model=args.model, image_size=args.image_size,
                               epochs=args.epochs, patience=args.epochs + 1,
                               freeze_backbone=True, augment="none"))
    data = prepare_data(cfg)
    classes = data.source.classes
    positive = resolve_positive(classes, None)
    rng = np.random.default_rng(0)
    parts = []
    for split, n in (("train", args.limit), ("val", None if args.limit is None
                                              else max(args.limit // 4, 8))):
        x, y, _ = data.subset(split)
        keep = np.sort(rng.permutation(len(y))[:n]) if n is not None else np.arange(len(y))
        parts += [x[keep], y[keep]]
    tx, ty, vx, vy = parts
    load0 = os.getloadavg()
    times, heads = {}, {}
    for cached in (True, False):
        seed_everything(cfg.seed, workers=True, verbose=False)
        model = create_model(cfg.model, num_classes=1 if len(classes) == 2 else len(classes),
                             in_chans=int(tx.shape[1]), pretrained="imagenet",
                             image_size=cfg.image_size)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = fit(model, cfg, tx, ty, vx, vy, len(classes), positive, Path(tmp),
                      progress=False, cache_features=cached)
            times[cached] = time.perf_counter() - t0
        heads[cached] = res.module.model.fc.weight.detach().clone()
        print(f"{'with' if cached else 'without'} cache: {times[cached]:.1f} s "
              f"({res.epochs_run} epochs)", flush=True)
    load1 = os.getloadavg()
    print(f"{args.model} {args.image_size} px, frozen, no augmentation, {args.epochs} epochs, "
          f"{len(ty)} train + {len(vy)} val images, torch threads {torch.get_num_threads()}")
    print(f"without cache {times[False]:.1f} s, with cache {times[True]:.1f} s, "
          f"ratio {times[False] / times[True]:.1f}x")
    print(f"max |head difference| {float((heads[True] - heads[False]).abs().max()):.2e}")
    print(f"load average before {load0[0]:.1f}, after {load1[0]:.1f} "
          f"({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
