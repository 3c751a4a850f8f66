"""Your own network in cxrlab: `cxrlab.register_model(name, factory)`.

Once registered, `model=name` works wherever a built-in name does (train, ablate, compare,
evaluate, predict, Grad-CAM, export, serve) in this Python process; a run of it loads in any
process that registered the same name first. Named "package.module:factory" instead
(`--model mypkg.nets:make_net`), it needs no registering: any process, the `cxrlab` command
included, imports the factory when it meets the name (import_model).

The factory is called each time cxrlab builds the model, with those of these keyword arguments
it names (`**kwargs` takes them all):

- `num_classes`: outputs (1 for two classes: one logit, the evidence for the second class);
- `in_chans`: 1 (grey) or 3 (colour);
- `image_size`: the side of the square input (64 when cxrlab builds the model only to list
  its layers and stages);
- `dropout` (None = your default), `batchnorm`, `head` (`linear`, `mlp-bn`, `vgg`), and any
  other option create_model was given.

It returns either
- a **backbone**: any `nn.Module` mapping images (B, in_chans, H, W), already normalised, to a
  feature map (B, C, h, w). cxrlab wraps it in `BackboneClassifier`: the normalisation, the
  head (`head=`: global average pool, dropout, Linear), Grad-CAM on the backbone's output,
  its top-level children as the stages `--frozen-stages` counts; or
- an **`ImageClassifier`** subclass (cxrlab.models.base) for full control: implement
  `forward_backbone`, call `init_head` (or write `forward_head`), set `feature_layer`,
  `first_conv`, `classifier`; override `stage_names` for a finer split.

Either way the result is checked once, on zeros at `image_size` px, against the contract the
fine-tuning stages, Grad-CAM and the feature cache rely on: `forward_features` gives a
(B, C, h, w) map with C = `num_features`, `forward_head` of it (or of its (B, C) average) gives
(B, num_classes) logits.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

import torch
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.models.base import _REGISTRY, ImageClassifier

CHECK_SIZE = 64  # px: the contract check's input side when no image_size is given
_CUSTOM: set[str] = set()  # names registered through register_custom_model


class BackboneClassifier(ImageClassifier):
    """A plain backbone with cxrlab's normalisation and head: what most own networks need."""

    feature_layer = "backbone"
    classifier = "fc"

    def __init__(self, backbone: nn.Module, num_classes: int, in_chans: int,
                 num_features: int, head: str = "linear", dropout: float | None = None):
        super().__init__(num_classes, in_chans, num_features)
        self.backbone = backbone
        convs = [n for n, m in backbone.named_modules() if isinstance(m, nn.Conv2d)]
        self.first_conv = f"backbone.{convs[0]}" if convs else ""
        self.init_head(head, dropout)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def stage_names(self) -> list[tuple[str, ...]]:
        """The backbone's top-level children with parameters, input end first (in the order
        they were assigned, which for nn.Sequential is the order they run)."""
        stages = [(f"backbone.{n}",) for n, m in self.backbone.named_children()
                  if any(True for _ in m.parameters())]
        return stages or [("backbone",)]


def register_custom_model(name: str, factory: Callable[..., nn.Module] | None = None, *,
                          replace: bool = False):
    """Register `factory` as model `name` (see the module's docstring for the contract).

    As a call, `register_custom_model("mynet", make_net)`, it returns the factory; without a
    factory it is a decorator. A built-in name is refused; registering a name of your own again
    needs `replace=True` (re-running a notebook cell, say)."""
    if factory is None:
        return functools.partial(register_custom_model, name, replace=replace)
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise CxrlabError(f"register_model: the name must be a non-empty string without "
                          f"surrounding spaces, got {name!r}")
    if not callable(factory):
        raise CxrlabError(f"register_model {name!r}: the factory must be callable (a class or "
                          f"a function returning an nn.Module), got {type(factory).__name__}")
    if name in _REGISTRY and name not in _CUSTOM:
        raise CxrlabError(f"register_model {name!r}: a built-in model has that name; choose "
                          "another")
    if name in _CUSTOM and not replace:
        raise CxrlabError(f"register_model {name!r}: already registered; pass replace=True "
                          "to replace it")
    _REGISTRY[name] = functools.partial(_build, name, factory)
    _CUSTOM.add(name)
    return factory


def is_custom(name: str) -> bool:
    return name in _CUSTOM


def import_model(name: str) -> bool:
    """Register a model named by where its factory lives, "package.module:factory", by
    importing it; True when `name` is (now) registered.

    A name registered in one Python process is unknown to the next, so a run trained on
    `register_model("mynet", ...)` cannot be evaluated, served or ablated by the `cxrlab`
    command. A "module:factory" name travels in config.yaml and every process can import it
    (the module must be importable there: installed, or on PYTHONPATH)."""
    if name in _REGISTRY:
        return True
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr.isidentifier():
        return False
    try:
        factory = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise CxrlabError(f"--model {name}: cannot import {module!r} ({e}); is it installed "
                          "or on PYTHONPATH?") from None
    except AttributeError:
        raise CxrlabError(f"--model {name}: {module!r} has no {attr!r}") from None
    register_custom_model(name, factory)
    return True


def _build(name: str, factory: Callable[..., nn.Module], **kwargs) -> ImageClassifier:
    """Call the factory with the arguments it names, wrap a backbone, check the contract."""
    kwargs = {**kwargs, "image_size": kwargs.get("image_size") or CHECK_SIZE}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: give it everything
        params = None
    takes_all = params is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
    given = kwargs if takes_all else {k: v for k, v in kwargs.items() if k in params}
    made = factory(**given)
    num_classes, in_chans = kwargs["num_classes"], kwargs["in_chans"]
    side = kwargs["image_size"]
    if isinstance(made, ImageClassifier):
        model = made
        if (model.num_classes, model.in_chans) != (num_classes, in_chans):
            raise CxrlabError(f"model {name!r}: built with num_classes={model.num_classes}, "
                              f"in_chans={model.in_chans}; cxrlab asked for "
                              f"num_classes={num_classes}, in_chans={in_chans}")
    elif isinstance(made, nn.Module):
        channels = _feature_shape(name, made, in_chans, side, "the backbone")[1]
        model = BackboneClassifier(made, num_classes, in_chans, channels,
                                   head=kwargs.get("head", "linear"),
                                   dropout=kwargs.get("dropout"))
    else:
        raise CxrlabError(f"model {name!r}: the factory returned {type(made).__name__}, not "
                          "an nn.Module")
    check_contract(name, model, side)
    return model


def _dry_run(model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
             x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()  # BatchNorm1d refuses a batch of 1 in training mode
    try:
        with torch.no_grad():
            return fn(x)
    finally:
        model.train(was_training)


def _zeros(model: nn.Module, in_chans: int, side: int) -> torch.Tensor:
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(2, in_chans, side, side, device=device)


def _feature_shape(name: str, module: nn.Module, in_chans: int, side: int,
                   what: str) -> tuple[int, ...]:
    try:
        out = _dry_run(module, module, _zeros(module, in_chans, side))
    except Exception as e:  # the user's code: say whose and on what
        raise CxrlabError(f"model {name!r}: {what} failed on a (2, {in_chans}, {side}, {side}) "
                          f"input: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                          ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CxrlabError(f"model {name!r}: {what} must return a feature map (B, C, h, w), "
                          f"got {shape}")
    return tuple(out.shape)


def check_contract(name: str, model: ImageClassifier, side: int = CHECK_SIZE) -> None:
    """forward_features -> (B, num_features, h, w); forward_head of it, and of its pooled
    (B, num_features) form where the head pools, -> (B, num_classes)."""
    feats = _feature_shape(name, _Features(model), model.in_chans, side, "forward_features")
    if feats[1] != model.num_features:
        raise CxrlabError(f"model {name!r}: forward_features gives {feats[1]} channels but "
                          f"num_features is {model.num_features}")
    x = _zeros(model, model.in_chans, side)
    cases = [("forward_head(forward_features(x))",
              lambda x: model.forward_head(model.forward_features(x)))]
    if model.pooled_head:
        cases.append(("forward_head of pooled features (the feature cache)",
                      lambda x: model.forward_head(model.forward_features(x).mean(dim=(2, 3)))))
    for what, fn in cases:
        try:
            out = _dry_run(model, fn, x)
        except Exception as e:
            hint = " (a head that does not pool needs pooled_head = False)" if (
                what.startswith("forward_head of pooled")) else ""
            raise CxrlabError(f"model {name!r}: {what} failed: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from None
        if tuple(out.shape) != (2, model.num_classes):
            hint = "; a head that does not pool needs pooled_head = False" if (
                what.startswith("forward_head of pooled")) else ""
            raise CxrlabError(f"model {name!r}: {what} gives shape {tuple(out.shape)}, "
                              f"expected (2, {model.num_classes}){hint}")
    for attr in ("feature_layer", "first_conv"):
        path = getattr(model, attr)
        if path:
            try:
                model.get_submodule(path)
            except AttributeError:
                raise CxrlabError(f"model {name!r}: {attr} {path!r} is not a module of the "
                                  "model") from None


class _Features(nn.Module):
    """model.forward_features as a module's forward (for _feature_shape)."""

    def __init__(self, model: ImageClassifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)
