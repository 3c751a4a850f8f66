"""Model registry: `create_model("resnet18", num_classes=1, in_chans=1)` and friends.

Each architecture registers one-line factories with `@register_model` (timm-style); everything
that builds a model goes through `create_model`, so names, options and errors are the same for
the CLI, the trainer and the tests. A user's own network comes in through
`register_custom_model` (custom.py; public as `cxrlab.register_model`), which checks it.

May import: errors only: config (the recipe) and everything else sit above the models
(tests/test_layers.py).
"""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path
from urllib.parse import urlparse

import torch

from cxrlab.errors import CxrlabError

# Importing a model module registers its names.
from cxrlab.models import cnn as _cnn  # noqa: F401
from cxrlab.models import densenet as _densenet  # noqa: F401
from cxrlab.models import efficientnet_lite as _efficientnet_lite  # noqa: F401
from cxrlab.models import resnet as _resnet  # noqa: F401
from cxrlab.models import vgg as _vgg  # noqa: F401
from cxrlab.models.base import _REGISTRY, ImageClassifier, register_model
from cxrlab.models.custom import (
    BackboneClassifier,
    import_model,
    is_custom,
    register_custom_model,
)
from cxrlab.models.heads import check_head

__all__ = ["BackboneClassifier", "ImageClassifier", "create_model", "has_packaged_weights",
           "import_model", "list_models", "load_pretrained", "register_custom_model",
           "register_model", "resolve_pretrained", "starts_pretrained"]

PACKAGED = "imagenet"  # create_model(pretrained="imagenet"): the weights installed with cxrlab
URL_TIMEOUT_S = 30


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int, in_chans: int = 1, *,
                 dropout: float | None = None, batchnorm: bool = True,
                 pretrained: str | Path | None = None, head: str = "linear",
                 intensity: str = "fixed", **options) -> ImageClassifier:
    """Build a registered model.

    dropout: None = the model's own default (none for ResNets, the notebook's rates for `cnn`);
    a number = that rate (for `cnn` it replaces every rate; 0 turns dropout off everywhere).
    pretrained: None = random init; "imagenet" = the ImageNet weights installed with the
    package (efficientnet_lite*); a path or http(s) URL of a state dict in torchvision layout
    (or the architecture's published layout, or a cxrlab model.pt); the head is left freshly
    initialised. head: one of heads.HEADS. options: model-specific (e.g. `image_size` for
    cnn; the others accept and ignore it). intensity: "fixed" (one mean/std for every image)
    or "image" (each image standardised by its own mean and std first; see base.py).
    """
    check_head(head)
    if not import_model(name):
        raise CxrlabError(f"unknown model {name!r}; choose from: {', '.join(list_models())} "
                          "(a network of your own: cxrlab.register_model it in this process "
                          "first, or name it package.module:factory)")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise CxrlabError(f"num_classes: must be a positive integer, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise CxrlabError(f"in_chans: must be a positive integer, got {in_chans!r}")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise CxrlabError(f"dropout: must be in [0, 1), got {dropout}")
    try:
        model = _REGISTRY[name](num_classes=num_classes, in_chans=in_chans, dropout=dropout,
                                batchnorm=batchnorm, head=head, **options)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        bad = str(e).split("unexpected keyword argument")[-1].strip()
        raise CxrlabError(f"model {name!r}: unknown option {bad}") from None
    model.set_intensity(intensity)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def has_packaged_weights(name: str) -> bool:
    """Models whose ImageNet weights install with cxrlab (the `pretrained` extra)."""
    return name.startswith("efficientnet_lite") and not is_custom(name)


def starts_pretrained(name: str, value: str | None) -> bool:
    """Does a run with this model and `pretrained` value start from trained weights?"""
    return resolve_pretrained(name, value) is not None


def resolve_pretrained(name: str, value: str | None) -> str | None:
    """A config's `pretrained` -> create_model's: None means the model's default (its
    packaged ImageNet weights if it has them, else none); "none" means from scratch."""
    if value is None:
        return PACKAGED if has_packaged_weights(name) else None
    if value.lower() == "none":
        return None
    return value


def load_pretrained(model: ImageClassifier, path: str | Path) -> None:
    """Load weights into `model` (all but the head), checking every key and shape: the
    packaged ImageNet weights ("imagenet"), a local file, or a URL via the torch hub cache."""
    text = str(path)
    if text == PACKAGED:
        if not hasattr(model, "load_packaged_weights"):
            raise CxrlabError(f"--pretrained {PACKAGED}: {type(model).__name__} has no "
                              "packaged weights; give a state dict file or URL")
        model.load_packaged_weights()
        return
    if text.startswith(("http://", "https://")):
        obj, where = _fetch_url(text), text
    else:
        path = Path(path).expanduser()
        if not path.is_file():
            raise CxrlabError(f"{path}: pretrained weights file not found")
        obj, where = _torch_load(path, str(path)), str(path)
    for wrapper in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj:
        raise CxrlabError(f"{where}: expected a state dict (a mapping of name -> tensor)")
    model.load_source_state_dict(obj, where)


def _torch_load(path: Path, where: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors all mean the same to the user
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CxrlabError(f"{where}: not a PyTorch state dict ({type(e).__name__}: "
                          f"{msg})") from None


def _fetch_url(url: str):
    """torch.hub's cache: a file named like the URL's basename in <hub dir>/checkpoints is
    used as is; otherwise it is downloaded there once (a bounded wait when offline)."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    name = Path(urlparse(url).path).name
    if not name:
        raise CxrlabError(f"--pretrained {url}: the URL names no file")
    cached = cache / name
    if not cached.is_file():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(URL_TIMEOUT_S)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise CxrlabError(f"--pretrained {url}: the weights could not be reached "
                              f"({reason}); download the file and pass its path, or put it "
                              f"in {cache}") from None
        finally:
            socket.setdefaulttimeout(old)
    return _torch_load(cached, f"{url} (cached as {cached})")
