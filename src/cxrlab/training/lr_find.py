"""The learning-rate range test (Smith 2017; fastai's `lr_find`) for a recipe.

Lightning's `Tuner.lr_find` does the sweep: the recipe's starting model (the same weights,
optimizer, augmentation, class weights and sampler as `cxrlab train`: the module of
training/loop.py) trains for `steps` batches while the learning rate grows exponentially from
`min_lr` to `max_lr`; it records the smoothed training loss and stops early once the loss
passes 4x its best. The suggestion is Lightning's: the rate where the loss falls fastest.
The model is thrown away; only the curve, the suggestion and the recipe's own `lr` remain.

What the sweep trains is the recipe's first phase: with pretrained weights that is the head on
a frozen backbone (the recipe unfreezes after epoch 1), so the suggestion is for the head's
rate; the backbone's is `backbone_lr_mult` times the `lr` you choose. Every parameter group
gets the same rate during the sweep.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.tuner import Tuner

from cxrlab.config import RunConfig
from cxrlab.data.prepared import prepare_data, resolve_positive
from cxrlab.deploy.inference import use_bf16
from cxrlab.errors import CxrlabError
from cxrlab.models import create_model, import_model, list_models, resolve_pretrained
from cxrlab.reporting.plots import plot_lr_find
from cxrlab.run import atomic_write_text, check_out_dir, prepare_out_dir, write_json
from cxrlab.training import finetune
from cxrlab.training.finetune import check_frozen_stages
from cxrlab.training.loop import (
    ArrayDataset,
    ClassifierModule,
    class_weights,
    deterministic_without_nan_fill,
    make_loader,
    quiet_lightning,
)

log = logging.getLogger("cxrlab")

MIN_STEPS = 13  # Lightning's suggestion skips the first 10 points and the last one, needs 2


@dataclass
class LrFindResult:
    lrs: list[float]  # the rates tried, one per batch
    losses: list[float]  # smoothed training loss after each batch
    suggestion: float | None  # None when the loss diverged too soon to say
    recipe_lr: float  # the recipe's `lr`, for comparison
    config: RunConfig
    files: list[Path]  # what was written (--out / --plot)

    @property
    def steps(self) -> int:
        """Batches run: fewer than asked when the loss diverged."""
        return len(self.lrs)

    def figure(self):
        """The curve, the suggestion marked and the recipe's lr dashed (a matplotlib Figure)."""
        return plot_lr_find(self.lrs, self.losses, self.suggestion, self.recipe_lr,
                            title=_title(self.config))

    def summary(self) -> str:
        """One line: what the sweep suggests beside what the recipe uses."""
        said = ("no suggestion (the loss diverged before the 13th batch: lower --max-lr or "
                "raise --steps)" if self.suggestion is None
                else f"suggested lr {self.suggestion:.2g}")
        return (f"{said}; the recipe's lr is {self.recipe_lr:.2g} ({self.steps} batches, "
                f"{self.lrs[0]:.2g} to {self.lrs[-1]:.2g})")

    def __repr__(self) -> str:
        return f"LrFindResult({self.summary()})"


def _title(config: RunConfig) -> str:
    return (f"{config.model}, {config.image_size} px, batch {config.batch_size}, "
            f"{config.optimizer}")


def lr_find(config: RunConfig, *, min_lr: float = 1e-6, max_lr: float = 1.0, steps: int = 100,
            out: Path | None = None, plot: Path | None = None,
            progress: bool = False) -> LrFindResult:
    """Sweep the learning rate for `config`'s recipe on its training split.

    `out`: a new directory for lr_find.png, lr_find.csv (lr, loss), lr_find.json and the
    config.yaml swept (`cxrlab train --config OUT/config.yaml --lr X` trains it); `plot`: just
    the PNG there. Bad options and data fail before anything is written.
    """
    if not 0 < min_lr < max_lr:
        raise CxrlabError(f"--min-lr {min_lr:g} / --max-lr {max_lr:g}: need 0 < min < max")
    if steps < MIN_STEPS:
        raise CxrlabError(f"--steps {steps}: at least {MIN_STEPS} (the suggestion skips the "
                          "first 10 batches)")
    if not import_model(config.model):
        raise CxrlabError(f"--model {config.model}: unknown model; choose from: "
                          f"{', '.join(list_models())}")
    check_frozen_stages(config)
    if out is not None:
        check_out_dir(Path(out))
    if plot is not None:
        plot = Path(plot)
        if plot.suffix.lower() != ".png":
            raise CxrlabError(f"--plot {plot}: give a .png file name")
        if not plot.absolute().parent.is_dir():
            raise CxrlabError(f"--plot {plot}: no folder {plot.absolute().parent}")
    data = prepare_data(config)  # bad data fails here
    lrs, losses, suggestion = _sweep(config, data, min_lr, max_lr, steps, progress)
    files: list[Path] = []
    title = _title(config)
    if out is not None:
        out = Path(out)
        prepare_out_dir(out)
        files.append(plot_lr_find(lrs, losses, suggestion, config.lr, out / "lr_find.png",
                                  title=title))
        atomic_write_text(out / "lr_find.csv", "lr,loss\n" + "".join(
            f"{lr!r},{loss!r}\n" for lr, loss in zip(lrs, losses, strict=True)))
        write_json(out / "lr_find.json", {
            "suggestion": suggestion, "recipe_lr": config.lr, "steps": len(lrs),
            "asked_steps": steps, "min_lr": min_lr, "max_lr": max_lr,
            "rule": "steepest fall of the smoothed training loss (Lightning Tuner.lr_find)"})
        config.save(out / "config.yaml")
        files += [out / "lr_find.csv", out / "lr_find.json", out / "config.yaml"]
    if plot is not None:
        files.append(plot_lr_find(lrs, losses, suggestion, config.lr, plot, title=title))
    return LrFindResult(lrs, losses, suggestion, config.lr, config, files)


def _sweep(config: RunConfig, data, min_lr: float, max_lr: float, steps: int,
           progress: bool) -> tuple[list[float], list[float], float | None]:
    quiet_lightning()
    classes = data.source.classes
    positive = resolve_positive(classes, config.positive)
    tx, ty, _ = data.subset("train")
    # the recipe's starting model, seeded as cxrlab train seeds it
    L.seed_everything(config.seed, workers=True, verbose=False)
    model = create_model(config.model, num_classes=1 if len(classes) == 2 else len(classes),
                         in_chans=int(data.images.shape[1]), dropout=config.dropout,
                         batchnorm=config.batchnorm,
                         pretrained=resolve_pretrained(config.model, config.pretrained),
                         image_size=config.image_size, intensity=config.intensity,
                         head=config.head)
    weights = class_weights(np.asarray(ty), len(classes)) if config.class_weights else None
    module = ClassifierModule(model, config, len(classes), weights, positive)
    bf16 = use_bf16(config.precision, model)
    if config.channels_last:
        module.model.to(memory_format=torch.channels_last)
    if finetune.can_cache_features(model, config):  # as fit() does: the head on cached features
        (tx,) = finetune.cache_features(model, [tx], bf16, config.channels_last)
        module.features_cached = True
    loader = make_loader(ArrayDataset(tx, ty), config.batch_size, train=True, seed=config.seed,
                         balanced=config.sampler == "balanced")
    if len(loader) == 0:
        raise CxrlabError(f"{config.data}: no training batch")
    with tempfile.TemporaryDirectory(prefix="cxrlab-lr-find-") as tmp, \
            deterministic_without_nan_fill(), warnings.catch_warnings(), \
            contextlib.redirect_stderr(sys.stderr if progress else io.StringIO()):
        # Lightning's sweep draws its own tqdm bar on stderr whatever the trainer says
        warnings.filterwarnings("ignore", module="lightning")
        trainer = L.Trainer(
            max_epochs=math.ceil(steps / len(loader)) + 1, accelerator=config.accelerator,
            devices=1, precision="bf16-mixed" if bf16 else "32-true",
            deterministic=config.deterministic, logger=False, enable_checkpointing=False,
            enable_progress_bar=progress, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=tmp)
        finder = Tuner(trainer).lr_find(module, train_dataloaders=loader, min_lr=min_lr,
                                        max_lr=max_lr, num_training=steps,
                                        update_attr=False)
    if finder is None or not finder.results.get("lr"):
        raise CxrlabError("lr-find: the sweep recorded nothing")
    lightning_log = logging.getLogger("lightning.pytorch.tuner.lr_finder")
    level = lightning_log.level
    lightning_log.setLevel(logging.CRITICAL)  # "not enough points": the None says it
    try:
        # Lightning's rule: the steepest fall of the loss against the rate, the first 10 and
        # the last point left out, non-finite losses skipped
        suggestion = finder.suggestion()
    finally:
        lightning_log.setLevel(level)
    return ([float(v) for v in finder.results["lr"]],
            [float(v) for v in finder.results["loss"]],
            None if suggestion is None else float(suggestion))

