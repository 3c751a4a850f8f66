"""The model contract every architecture follows, the registry, and weight loading.

`ImageClassifier` fixes the split timm uses: `forward_features` (normalise + backbone -> the
last feature map, what Grad-CAM, feature caching and frozen backbones need) and `forward_head`
(pool/flatten + classifier -> logits). Inputs are float images in [0, 1]; the model owns its
normalisation (buffers saved with the weights), so no caller has to remember it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.models.heads import HEAD_MODULES, attach_head, pooled_head

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Scratch models: X-rays in [0, 1] sit roughly around 0.5 with a spread of ~0.25.
SCRATCH_MEAN = 0.5
SCRATCH_STD = 0.25
# intensity="image": each image is first mapped to this mean and spread (a typical film of the
# Kermany training set: grey level ~122/255, spread ~58/255), so what the pretrained
# normalisation then sees is a film of ordinary exposure whatever the intake's was.
FILM_MEAN = 0.48
FILM_STD = 0.23
INTENSITY_MODES = ("fixed", "image")

_REGISTRY: dict[str, Callable[..., ImageClassifier]] = {}


def register_model(name: str) -> Callable:
    """Decorator: make a factory reachable as `create_model(name, ...)` (timm-style)."""

    def deco(fn: Callable[..., ImageClassifier]) -> Callable[..., ImageClassifier]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


class ImageClassifier(nn.Module):
    """Base of every cxrlab model: normalisation buffers + the features/head split.

    Subclasses implement `forward_backbone` and set `feature_layer` (dotted name of the module
    whose output is the last feature map: Grad-CAM hooks it), `first_conv` (name of the first
    conv, whose weights are adapted when pretrained weights have other input channels) and
    `classifier` (name of the final Linear: the part never loaded from pretrained weights).
    """

    feature_layer: str = ""
    first_conv: str = ""
    classifier: str = "fc"
    # Prefix of the classifier in the weights this architecture is usually loaded from
    # (torchvision's `classifier` for VGG/DenseNet): skipped when loading, like our own head.
    source_classifier: str = "fc"
    # True when forward_head starts with global average pooling (every heads.py head): then
    # a frozen backbone's pooled features can be cached. The notebook CNN flattens instead.
    pooled_head: bool = True
    # Whether `precision: auto` trains in bf16 on a CPU that has it: False where fp32 ran
    # faster there (memory-bound depthwise convolutions gain nothing and pay for the casts).
    cpu_bf16: bool = True

    def __init__(self, num_classes: int, in_chans: int, num_features: int,
                 mean: float | Sequence[float] = SCRATCH_MEAN,
                 std: float | Sequence[float] = SCRATCH_STD):
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = num_features  # channels of the forward_features output
        self.register_buffer("pixel_mean", torch.zeros(1, in_chans, 1, 1))
        self.register_buffer("pixel_std", torch.ones(1, in_chans, 1, 1))
        self.set_pixel_stats(mean, std)

    def set_pixel_stats(self, mean: float | Sequence[float] | torch.Tensor,
                        std: float | Sequence[float] | torch.Tensor) -> None:
        """Per-channel mean/std in [0, 1] units; 3 values for a 1-channel model are averaged."""
        for buf, val in ((self.pixel_mean, mean), (self.pixel_std, std)):
            t = torch.as_tensor(val, dtype=torch.float32).flatten()
            if t.numel() == 3 and self.in_chans == 1:
                t = t.mean(0, keepdim=True)
            if t.numel() == 1:
                t = t.expand(self.in_chans)
            if t.numel() != self.in_chans:
                raise CxrlabError(f"pixel stats: {t.numel()} values for {self.in_chans} channels")
            buf.copy_(t.view(1, -1, 1, 1))

    per_image: bool = False  # set_intensity("image")

    def set_intensity(self, mode: str) -> None:
        """"image": standardise each image by its own mean and spread before the fixed
        normalisation, so a brighter, darker, flatter or harsher film (another site's exposure,
        processing or window) reaches the backbone as the same input. In the model, not the
        data path: evaluate, predict, serve and the ONNX file inherit it."""
        if mode not in INTENSITY_MODES:
            raise CxrlabError(f"intensity {mode!r}: choose from {', '.join(INTENSITY_MODES)}")
        self.per_image = mode == "image"

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)  # a blank image stays blank
            x = (x - mean) / std * FILM_STD + FILM_MEAN
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) in [0, 1] -> last feature map (B, num_features, h, w)."""
        return self.forward_backbone(self.normalize(x))

    def init_head(self, head: str, dropout: float | None) -> None:
        """The named head of `heads.py` (`linear`, `mlp-bn`, `vgg`) on `num_features`."""
        attach_head(self, head, self.num_features, self.num_classes, dropout)

    def head_names(self) -> tuple[str, ...]:
        """Top-level module names that make up the head (everything else is the backbone)."""
        return tuple(n for n in HEAD_MODULES if hasattr(self, n)) or (self.classifier,)

    def trainable_head_names(self) -> tuple[str, ...]:
        """What `--freeze-backbone` leaves trainable (the head, plus any dense blocks)."""
        return self.head_names()

    def stage_names(self) -> list[tuple[str, ...]]:
        """The backbone's stages, input end first (the stem is the first), each as the dotted
        names of its modules: what `--frozen-stages N` counts. Default: each top-level
        backbone module is a stage; architectures with a finer natural split override it."""
        head = set(self.trainable_head_names())
        return [(n,) for n, m in self.named_children()
                if n not in head and any(True for _ in m.parameters())]

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, dropout, the head (see heads.py) -> logits (B, num_classes).
        Also accepts already pooled features (B, C): what feature caching feeds it."""
        return pooled_head(self, feats, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def load_source_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                               source: str) -> None:
        """Load weights in the layout this architecture is published in (torchvision's by
        default; DenseNet and EfficientNet-Lite rename first), head excepted."""
        load_matching_state_dict(self, state_dict, source)


def make_dropout(p: float) -> nn.Module:
    """Identity at p=0, so 'no dropout' leaves no Dropout module behind (and none to forget)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def load_matching_state_dict(model: ImageClassifier, state_dict: Mapping[str, torch.Tensor],
                             source: str = "state dict",
                             imagenet_stats: tuple = (IMAGENET_MEAN, IMAGENET_STD)) -> None:
    """Load every backbone weight from `state_dict` (our names = torchvision's names), asserting
    each key and shape, like nanoGPT's from_pretrained; no strict=False-and-hope.

    - The head (`model.head_names()`, e.g. `fc.*`) and the source's classifier
      (`model.source_classifier`) are skipped: the new task has its own head.
    - A 3-channel first conv loaded into a 1-channel model is summed over its input channels:
      exactly what the 3-channel net computes on a grey image repeated 3 times (up to the
      per-channel normalisation, which becomes the mean of the 3).
    - `num_batches_tracked` may be missing (torchvision's own files predate it).
    - Pixel stats come from the dict when it holds them (a cxrlab model.pt), else ImageNet's
      (torchvision weights expect ImageNet-normalised input).
    Any missing key, unexpected key or shape mismatch raises CxrlabError naming the first one.
    """
    src = dict(state_dict)
    for prefix in ("module.", "model."):  # DataParallel/DDP; a Lightning checkpoint's model
        if src and all(k.startswith(prefix) for k in src):
            src = {k.removeprefix(prefix): v for k, v in src.items()}
    heads = tuple(f"{n}." for n in model.head_names())
    src_head = model.source_classifier + "."
    stats = ("pixel_mean", "pixel_std")
    own = model.state_dict()
    first = model.first_conv + ".weight"
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    loaded: dict[str, torch.Tensor] = {}
    for key, target in own.items():
        if key.startswith(heads) or key in stats:
            continue
        if key not in src:
            if key.endswith("num_batches_tracked"):
                continue
            raise CxrlabError(f"{source}: missing key '{key}'")
        value = src[key]
        if not isinstance(value, torch.Tensor):
            raise CxrlabError(f"{source}: key '{key}' is not a tensor")
        if key == first and value.ndim == 4 and value.shape[1] == 3 and target.shape[1] == 1:
            value = value.sum(dim=1, keepdim=True)
        if value.shape != target.shape:
            raise CxrlabError(f"{source}: key '{key}' has shape {tuple(value.shape)}, "
                              f"the model expects {tuple(target.shape)}")
        loaded[key] = value
    extra = [k for k in src if k not in own and not k.startswith((*heads, src_head))
             and k not in stats]
    if extra:
        hint = ""
        if not has_bn and any(".running_mean" in k or k.startswith("bn") for k in extra):
            hint = " (the weights were trained with batch norm: use batchnorm=True)"
        raise CxrlabError(f"{source}: unexpected key '{extra[0]}'{hint}")
    with torch.no_grad():
        for key, value in loaded.items():
            own[key].copy_(value)
    if all(k in src for k in stats):
        model.set_pixel_stats(src["pixel_mean"], src["pixel_std"])
    else:
        model.set_pixel_stats(*imagenet_stats)
