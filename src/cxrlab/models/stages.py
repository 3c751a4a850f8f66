"""A model's stages as the fine-tuning schedule sees them: names, output strides, and how many
are "early" (fine resolution: edges and textures), which the recipe keeps frozen."""

from __future__ import annotations

import functools
import itertools

import torch
from torch import nn

from cxrlab.models import create_model
from cxrlab.models.base import _REGISTRY


def model_stages(name: str) -> tuple[tuple[tuple[str, ...], ...], tuple[int, ...]]:
    """A registered model's stages and their output strides (built once per factory, small,
    on CPU: a model registered again with replace=True is looked at again)."""
    return _model_stages(name, _REGISTRY.get(name))


@functools.cache
def _model_stages(name: str, factory) -> tuple[tuple[tuple[str, ...], ...], tuple[int, ...]]:
    model = create_model(name, num_classes=1, in_chans=1)
    return tuple(model.stage_names()), tuple(stage_strides(model))


def stage_strides(model: nn.Module, side: int = 64) -> list[int]:
    """Each stage's output stride (input side / output side), from one small forward."""
    sides: list[int] = []
    hooks = [model.get_submodule(stage[-1]).register_forward_hook(
        lambda _m, _i, out: sides.append(out.shape[-1])) for stage in model.stage_names()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model.forward_features(torch.zeros(1, model.in_chans, side, side))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [max(1, round(side / s)) for s in sides]


def early_stages(name: str, max_stride: int = 8) -> int:
    """How many leading stages work at 1/`max_stride` of the input's side or finer."""
    _, strides = model_stages(name)
    return sum(1 for _ in itertools.takewhile(lambda s: s <= max_stride, strides))
