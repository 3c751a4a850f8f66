"""`cxrlab demo`: the whole pipeline on the chest X-rays shipped inside the package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from cxrlab.config import RunConfig
from cxrlab.training.lifecycle import TrainResult, train_run

# Quick on any CPU, bf16 or not: the default model's ImageNet backbone stays frozen, its pooled
# features are computed once (no augmentation) and only the head trains on them, so the cost is
# one forward pass over 480 small images. Training a ResNet-18 from scratch here (the first
# demo) took 174 s on a 2-core CPU without bf16 and generalised no better.
DEMO_RECIPE = dict(model="efficientnet_lite0", image_size=128, epochs=20, batch_size=32,
                   lr=2e-3, augment="none", freeze_backbone=True, patience=6)

def demo_data_dir() -> Path:
    return Path(str(files("cxrlab") / "demo_data"))


def run_demo(out: Path, epochs: int | None = None, progress: bool = True) -> TrainResult:
    values = dict(DEMO_RECIPE, data=str(demo_data_dir()))
    if epochs is not None:
        values["epochs"] = epochs
    return train_run(RunConfig.build(values), Path(out), progress=progress)
