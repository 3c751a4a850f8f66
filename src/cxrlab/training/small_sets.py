"""Small sets: keep the ImageNet features and train the head long enough, instead of
fine-tuning for too few optimizer steps.

The default recipe's 9 epochs are ~1170 optimizer steps on Kermany's 4173 training images but
45-54 on covid19's 167-201 (batch 32): there fine-tuning stops far from converged (validation
loss still falling at epoch 9; 81.3% pooled out-of-fold on a 3-fold cross-validation,
Covid recall 0.73, where the frozen backbone's head gets 92.8-93.6%), and nothing said so.
So when the recipe's epochs would take fewer than SMALL_STEPS optimizer steps and the user
has chosen neither the length (--epochs) nor the fine-tuning schedule, a pretrained recipe
trains the head only on the frozen backbone's pooled features (computed once: no
augmentation, unless one was asked for) for HEAD_EPOCHS epochs. The run logs the choice and
keeps it in run.json (`small_set`), a cross-validation in crossval.json. The time budget
plans the chosen run, so it holds.
Chosen on covid19's cross-validation (docs/recipes.md, "Small data sets";
benchmarks/small_sets.py); from-scratch recipes are left alone (not measured).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from cxrlab.config import RunConfig
from cxrlab.data.sources import load_source
from cxrlab.data.split import assign_splits
from cxrlab.models import starts_pretrained
from cxrlab.training.budget import steps_per_epoch

log = logging.getLogger("cxrlab")

# Fewer optimizer steps than this in the recipe's epochs make a set small: 9 epochs on fewer
# than ~1070 training images. Measured at 167 (covid19, 3 folds: frozen clearly better) and
# 4173 (Kermany: the fine-tuned default, val AUC 0.999); the boundary between is a choice.
SMALL_STEPS = 300
# the head's epochs on frozen features (early stopping usually ends them at 50-70): on
# covid19's CV 120 beat 30 with Lite2 (+9/-1 images, p 0.02), tied with Lite0 (+1/-3)
HEAD_EPOCHS = 120
# any of these given (on the command line, or named by a config.yaml): the user chose the
# schedule, and the rule stays out
CHOSEN = {"epochs", "freeze_backbone", "unfreeze_after", "wise_ft"}


@dataclass(frozen=True)
class SmallSet:
    """What the rule chose for one run (or every fold of a cross-validation) and why."""

    n_train: int
    steps_per_epoch: int
    recipe_epochs: int
    epochs: int  # of the head, on the frozen backbone
    augment: str
    small_steps: int

    @property
    def reason(self) -> str:
        cached = ("features computed once, no augmentation" if self.augment == "none"
                  else f"{self.augment} augmentation")
        return (f"small set: {self.n_train} training images, {self.steps_per_epoch} optimizer "
                f"steps an epoch (the recipe's {self.recipe_epochs} epochs: "
                f"{self.recipe_epochs * self.steps_per_epoch} steps, fewer than "
                f"{self.small_steps}) -> the backbone keeps its ImageNet weights (frozen, "
                f"{cached}) and the head trains {self.epochs} epochs; --epochs N or "
                f"--unfreeze-after N fine-tunes instead")

    def to_dict(self) -> dict:
        return {**asdict(self), "frozen": True, "reason": self.reason}


def applies(config: RunConfig) -> bool:
    """The user left the length and the fine-tuning schedule to the recipe (a saved
    config.yaml names them all) and the weights start pretrained (what was measured)."""
    return (not config.model_fields_set & CHOSEN
            and starts_pretrained(config.model, config.pretrained))


def small_set_recipe(config: RunConfig, n_train: int) -> SmallSet | None:
    """The small-set recipe for `n_train` training images; None when the rule does not apply
    or the recipe's epochs take SMALL_STEPS steps or more (pure: no data read)."""
    if not applies(config):
        return None
    steps = steps_per_epoch(n_train, config.batch_size)
    if config.epochs * steps >= SMALL_STEPS:
        return None
    augment = config.augment if "augment" in config.model_fields_set else "none"
    return SmallSet(n_train, steps, config.epochs, HEAD_EPOCHS, augment, SMALL_STEPS)


def with_recipe(config: RunConfig, chosen: SmallSet | None) -> RunConfig:
    """`config` training the chosen recipe, every choice named (a saved config.yaml
    retrains it); logs why."""
    if chosen is None:
        return config
    log.info("%s", chosen.reason)
    return RunConfig.build({**config.model_dump(), "epochs": chosen.epochs,
                            "freeze_backbone": True, "unfreeze_after": None,
                            "augment": chosen.augment})


def for_folds(config: RunConfig) -> SmallSet | None:
    """The recipe of every fold of `config`'s cross-validation: the pooled figures are one
    recipe's, so the smallest fold's training images decide (read from the split alone,
    nothing decoded)."""
    if not applies(config):
        return None
    source = load_source(Path(config.data), config.image_col, config.label_col)
    seed = config.seed if config.split_seed is None else config.split_seed  # as prepared
    sizes = [assign_splits(source, config.val_fraction, seed, config.group_regex,
                           config.folds, i).splits.count("train")
             for i in range(1, config.folds + 1)]
    return small_set_recipe(config, min(sizes))
