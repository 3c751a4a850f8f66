"""A run's data, ready to train on: the source read, images decoded (cached), split, checked.

Shared by training, resuming (which must rebuild exactly the same data) and the benchmarks.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrlab.config import RunConfig
from cxrlab.data.cache import load_images, n_workers
from cxrlab.data.images import NO_RUN, BitDepth, bits_of_max, guess_channels, undeclared_max
from cxrlab.data.sources import Record, Source, load_source, require_trainable
from cxrlab.data.split import assign_splits
from cxrlab.errors import CxrlabError

log = logging.getLogger("cxrlab")
DEPTH_SAMPLE = 64  # files read for the data's bit depth (most are 8-bit: a header each)


@dataclass
class PreparedData:
    source: Source
    records: list[Record]  # the readable ones, in array order
    images: np.ndarray  # uint8 (N, C, S, S)
    labels: np.ndarray  # class index per record
    splits: np.ndarray  # "train" / "val" / "test" per record
    groups: list[str]
    split_message: str
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    split_result: object = None
    bit_depth: BitDepth = NO_RUN  # how its 16-bit images were read; run.json keeps `data`

    def subset(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.flatnonzero(self.splits == split)
        return self.images[idx], self.labels[idx], idx


def resolve_positive(classes: list[str], positive: str | None) -> int | None:
    """Second class in sorted order unless told otherwise; None for more than 2 classes."""
    if len(classes) != 2:
        if positive is not None:
            raise CxrlabError(f"--positive {positive}: only meaningful with 2 classes")
        return None
    if positive is None:
        return 1
    if positive not in classes:
        raise CxrlabError(f"--positive {positive}: not a class (classes: {', '.join(classes)})")
    return classes.index(positive)


def data_bit_depth(paths: list[Path], sample: int = DEPTH_SAMPLE) -> int | None:
    """The depth of a dataset's 16-bit images that declare none (no sBIT): the bit length of
    the maximum over an even sample of its files (images.bits_of_max), one value for all of
    them; None when the sample holds no such image."""
    step = max(1, len(paths) // sample)
    with ThreadPoolExecutor(max_workers=n_workers()) as pool:
        maxima = [m for m in pool.map(undeclared_max, paths[::step][:sample]) if m is not None]
    return bits_of_max(max(maxima)) if maxima else None


def prepare_data(config: RunConfig, bit_depth: BitDepth | None = None) -> PreparedData:
    """`bit_depth`: the rule a run recorded (resuming); None: --bit-depth, else found from the
    data now."""
    source = load_source(Path(config.data), config.image_col, config.label_col)
    require_trainable(source)
    paths = [r.path for r in source.records]
    channels = config.channels or guess_channels(paths)
    if bit_depth is None:
        bit_depth = BitDepth(config.bit_depth, None if config.bit_depth is not None
                             else data_bit_depth(paths))
    images, bad = load_images(paths, config.image_size, channels, skip_bad=config.skip_bad,
                              bit_depth=bit_depth)
    bad_paths = {Path(p) for p, _ in bad}
    records = [r for r in source.records if r.path not in bad_paths]
    if bad:
        for p, why in bad:
            log.warning("skipped %s: %s", p, why)
    kept = Source(source.root, source.kind, records, source.classes)
    require_trainable(kept)
    split_seed = config.seed if config.split_seed is None else config.split_seed
    result = assign_splits(kept, config.val_fraction, split_seed, config.group_regex,
                           config.folds, config.fold)
    if result.message:
        log.info("%s", result.message)
    labels = np.array([source.classes.index(r.label) for r in records], dtype=np.int64)
    splits = np.array(result.splits)
    for name in ("train", "val"):
        if not (splits == name).any():
            raise CxrlabError(f"{config.data}: the {name} split is empty (too few images)")
    train_classes = set(labels[splits == "train"].tolist())
    if len(train_classes) < len(source.classes):
        missing = [c for i, c in enumerate(source.classes) if i not in train_classes]
        raise CxrlabError(f"{config.data}: no training images of class {missing[0]}")
    return PreparedData(kept, records, images, labels, splits, result.groups, result.message,
                        bad, result, bit_depth)
