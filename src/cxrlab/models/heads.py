"""The classification heads every pooled-feature model can wear, in one place.

All heads start from the global average of the last feature map (a mean: AdaptiveAvgPool2d's
CUDA backward is not deterministic), so a frozen backbone's pooled features are all a head
ever sees (what feature caching relies on). Module names are fixed so state dicts stay stable:

- `linear` (default): dropout (the model's `dropout`, off by default) -> `fc`.
- `mlp-bn` (the ResNet50V2 notebook): Linear(F, 128) -> ReLU -> BatchNorm1d -> Dropout 0.2
  -> `fc`.
- `vgg` (the VGG19 notebook): Linear(F, 256) -> ReLU -> Dropout 0.1 -> `fc`.

The hidden part lives in `head_mlp` (an Identity, hence no state-dict keys, for `linear`), the
final Linear in `fc`: a `linear` model's keys are exactly torchvision's (`fc.weight`, ...).
"""

from __future__ import annotations

import torch
from torch import nn

from cxrlab.errors import CxrlabError

HEADS = ("linear", "mlp-bn", "vgg")
# Attribute names of the head's parts on a model: never loaded from pretrained weights, the
# only parameters trained when the backbone is frozen.
HEAD_MODULES = ("head_drop", "head_mlp", "fc")


def check_head(head: str) -> str:
    if head not in HEADS:
        raise CxrlabError(f"--head {head}: unknown head; choose from: {', '.join(HEADS)}")
    return head


def attach_head(model: nn.Module, head: str, num_features: int, num_classes: int,
                dropout: float | None) -> None:
    """Give `model` the named head as `head_drop`, `head_mlp` and `fc`."""
    check_head(head)
    model.head_kind = head
    model.head_drop = nn.Dropout(dropout) if dropout else nn.Identity()
    if head == "linear":
        model.head_mlp = nn.Identity()
        width = num_features
    elif head == "mlp-bn":
        width = 128
        model.head_mlp = nn.Sequential(nn.Linear(num_features, width), nn.ReLU(inplace=True),
                                       nn.BatchNorm1d(width), nn.Dropout(0.2))
    else:  # vgg
        width = 256
        model.head_mlp = nn.Sequential(nn.Linear(num_features, width), nn.ReLU(inplace=True),
                                       nn.Dropout(0.1))
    model.fc = nn.Linear(width, num_classes)


def pooled_head(model: nn.Module, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """(B, C, h, w) feature map (or (B, C) pooled features) -> logits (B, num_classes)."""
    x = feats.mean(dim=(2, 3)) if feats.ndim == 4 else feats
    x = model.head_mlp(model.head_drop(x))
    return x if pre_logits else model.fc(x)
