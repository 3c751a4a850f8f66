"""Size and cost of a model: parameters, multiply-accumulates, a layer table (Keras-like).

Everything is measured by running one real forward pass (batch of 1, eval mode, no grad) with
hooks, so the numbers describe the model as built, not a formula that can drift from it.
`build_on_meta` builds it on PyTorch's meta device for that: shapes without memory, random
initialisation or arithmetic (what made `cxrlab models` slow), and the same counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str  # dotted module name, as in the state dict
    type: str  # class name
    output_shape: tuple[int, ...]  # without the batch dimension
    params: int  # parameters of this layer (a module called twice is listed twice)


def build_on_meta(name: str, **options) -> nn.Module:
    """`create_model(name, **options)` on the meta device: every parameter, buffer and output
    has its shape and no data. Parameter counts, multiply-adds and the layer table equal the
    real model's (tests/models); it cannot predict anything."""
    from cxrlab.models import create_model

    with torch.device("meta"):
        return create_model(name, **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _run_with_hooks(model: nn.Module, image_size: int,
                    hook: Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]) -> None:
    """One forward pass on zeros with `hook(name, module, input, output)` on every leaf."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    in_chans = getattr(model, "in_chans", 3)
    x = torch.zeros(1, in_chans, image_size, image_size, device=device, dtype=dtype)
    handles = []
    for name, module in model.named_modules():
        if next(module.children(), None) is None:  # leaf
            handles.append(module.register_forward_hook(
                lambda m, inp, out, name=name: hook(name, m, inp[0] if inp else None, out)))
    was_training = model.training
    try:
        model.eval()  # BatchNorm1d refuses a batch of 1 in training mode
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one image through the Conv2d and Linear layers (the rest is
    negligible). conv: output elements x in_ch/groups x kh x kw; linear: out x in features."""
    total = 0

    def hook(name: str, m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out.numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    _run_with_hooks(model, image_size, hook)
    return int(total)


def model_summary(model: nn.Module, image_size: int) -> list[LayerRow]:
    """Leaf modules in the order they run, with output shapes at `image_size` and parameters
    (like Keras' model.summary() / torchsummary)."""
    rows: list[LayerRow] = []

    def hook(name: str, m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> None:
        shape = tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ()
        rows.append(LayerRow(name, type(m).__name__, shape,
                             sum(p.numel() for p in m.parameters(recurse=False))))

    _run_with_hooks(model, image_size, hook)
    return rows


def render_summary(rows: list[LayerRow], console: Console, title: str | None = None) -> None:
    """Print `rows` as a table; the total counts each layer once even if it ran twice."""
    table = Table("layer", "type", "output shape", "params", title=title)
    seen: dict[str, int] = {}
    for r in rows:
        table.add_row(r.name, r.type, " x ".join(map(str, r.output_shape)), f"{r.params:,}")
        seen[r.name] = r.params
    table.caption = f"{sum(seen.values()):,} parameters in {len(seen)} layers"
    console.print(table)
