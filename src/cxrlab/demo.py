"""The chest X-rays shipped inside the package (`cxrlab.demo_data()`) and `cxrlab demo` on them.

Importing this module stays light (no torch), so `import cxrlab; cxrlab.demo_data()` is quick.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cxrlab.errors import CxrlabError

if TYPE_CHECKING:  # the module stays light: `import cxrlab` imports it
    from cxrlab.training.lifecycle import TrainResult

# Quick on any CPU, bf16 or not: the default model's ImageNet backbone stays frozen, its pooled
# features are computed once (no augmentation) and only the head trains on them, so the cost is
# one forward pass over 480 small images. Training a ResNet-18 from scratch here (the first
# demo) took 174 s on a 2-core CPU without bf16 and generalised no better.
DEMO_RECIPE = dict(model="efficientnet_lite0", image_size=128, epochs=20, batch_size=32,
                   lr=2e-3, augment="none", freeze_backbone=True, patience=6)

_SPLITS = ("train", "test")


def demo_data(split: Literal["train", "test"] | None = None) -> Path:
    """The chest X-rays shipped with cxrlab: a folder holding `train/` and `test/`.

    480 pediatric chest X-rays, 128 px JPEGs, drawn from the Kermany et al. (2018) training
    set (CC BY 4.0; `ATTRIBUTION.txt` in the folder): `train/` 360 images (NORMAL 120,
    PNEUMONIA 240) and `test/` 120 (60 and 60) of other patients, each split one sub-folder per
    class. That is the layout of the full set's download (`chest_xray/train`,
    `chest_xray/test`), so code written against the demo runs on the full set by changing one
    path; no network is needed.

    Args:
        split: None for the folder holding both splits; "train" or "test" for that split's
            folder of class folders.

    Returns:
        The folder's absolute path inside the installed package (read it, don't write to it).

    Example:
        >>> import cxrlab
        >>> data = cxrlab.demo_data()
        >>> sorted(p.name for p in (data / "train").iterdir())
        ['NORMAL', 'PNEUMONIA']
    """
    root = Path(str(files("cxrlab") / "demo_data")).absolute()
    if split is None:
        return root
    if split not in _SPLITS:
        raise CxrlabError(f"split {split!r}: the demo data has 'train' and 'test' (or None for "
                          "the folder holding both)")
    return root / split


def run_demo(out: Path, epochs: int | None = None, progress: bool = True) -> TrainResult:
    """`cxrlab demo`: the demo recipe on `demo_data()`'s train/, scored on its test/."""
    from cxrlab.config import RunConfig
    from cxrlab.training.lifecycle import train_run

    values = dict(DEMO_RECIPE, data=str(demo_data()))
    if epochs is not None:
        values["epochs"] = epochs
    return train_run(RunConfig.build(values), Path(out), progress=progress)
