"""`cxrlab demo`: the whole pipeline on the chest X-rays shipped inside the package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from cxrlab.config import RunConfig
from cxrlab.pipeline import TrainResult, train_run

# Small and quick (about a minute on 2 CPU cores): a ResNet-18 from scratch at 128 px; the
# default EfficientNet fine-tune costs about twice as much per image here.
DEMO_RECIPE = dict(model="resnet18", image_size=128, epochs=12, batch_size=32, lr=2e-3,
                   augment="light", patience=6)


def demo_data_dir() -> Path:
    return Path(str(files("cxrlab") / "demo_data"))


def run_demo(out: Path, epochs: int | None = None, progress: bool = True) -> TrainResult:
    values = dict(DEMO_RECIPE, data=str(demo_data_dir()))
    if epochs is not None:
        values["epochs"] = epochs
    return train_run(RunConfig.build(values), Path(out), progress=progress)
