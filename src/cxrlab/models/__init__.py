"""Model registry: `create_model("resnet18", num_classes=1, in_chans=1)` and friends.

Each architecture registers one-line factories with `@register_model` (timm-style); everything
that builds a model goes through `create_model`, so names, options and errors are the same for
the CLI, the trainer and the tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cxrlab.errors import CxrlabError
from cxrlab.models import cnn as _cnn  # noqa: F401  (registers "cnn")
from cxrlab.models import efficientnet_lite as _efficientnet_lite  # noqa: F401
from cxrlab.models import resnet as _resnet  # noqa: F401  (registers "resnet18", "resnet50")
from cxrlab.models.base import (
    _REGISTRY,
    ImageClassifier,
    load_matching_state_dict,
    register_model,
)

__all__ = ["ImageClassifier", "create_model", "list_models", "load_pretrained", "register_model"]


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_chans: int = 1, *,
                 dropout: float | None = None, batchnorm: bool = True,
                 pretrained: str | Path | None = None, **options) -> ImageClassifier:
    """Build a registered model.

    dropout: None = the model's own default (none for ResNets, the notebook's rates for `cnn`);
    a number = that rate (for `cnn` it replaces every rate; 0 turns dropout off everywhere).
    pretrained: path to a .pth/.pt state dict in torchvision layout (or a cxrlab model.pt);
    the head is left freshly initialised. options: model-specific (e.g. `image_size` for cnn;
    the ResNets accept and ignore it).
    """
    if name not in _REGISTRY:
        raise CxrlabError(f"unknown model {name!r}; choose from: {', '.join(list_models())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CxrlabError(f"num_classes: must be a positive integer, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise CxrlabError(f"in_chans: must be a positive integer, got {in_chans!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise CxrlabError(f"dropout: must be in [0, 1), got {dropout}")
    try:
        model = _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, dropout=dropout,
                                batchnorm=batchnorm, **options)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).split("unexpected keyword argument")[-1].strip()
        raise CxrlabError(f"model {name!r}: unknown option {bad}") from None
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def load_pretrained(model: ImageClassifier, path: str | Path) -> None:
    """Load a local state dict file into `model` (all but the head), checking every shape."""
    text = str(path)
    if text.startswith(("http://", "https://")):
        raise CxrlabError(f"pretrained {text}: URLs are not supported yet; download the file "
                          "and pass its path")
    path = Path(path).expanduser()
    if not path.is_file():
        raise CxrlabError(f"{path}: pretrained weights file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean the same to the user
        raise CxrlabError(f"{path}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise CxrlabError(f"{path}: expected a state dict (a mapping of name -> tensor)")
    load_matching_state_dict(model, obj, source=str(path))
