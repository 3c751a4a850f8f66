"""VGG-19 (Simonyan & Zisserman 2014), built here with torchvision's parameter names.

`features.N` are exactly torchvision's (`vgg19`: conv/ReLU/pool; `vgg19_bn`: conv/BN/ReLU/pool),
so a torchvision state dict loads without a rename table; torchvision's `classifier.*` (the
4096-wide fully connected layers, 120 M of VGG's 144 M parameters, sized for 7x7 maps at
224 px) is the part replaced: our heads pool globally (see heads.py; `--head vgg` is the
notebook's 512 -> 256 -> classes head). The notebook's VGG19 had no batch norm, hence
`vgg19` ignores `batchnorm` and `vgg19_bn` is the variant with it.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrlab.models.base import ImageClassifier, register_model

CFG_19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(ImageClassifier):
    feature_layer = "features"
    first_conv = "features.0"
    classifier = "fc"
    source_classifier = "classifier"

    def __init__(self, num_classes: int = 1, in_chans: int = 1, *, dropout: float | None = None,
                 batchnorm: bool = False, image_size: int | None = None, head: str = "linear",
                 cfg: tuple = CFG_19):
        super().__init__(num_classes, in_chans, num_features=512)
        layers: list[nn.Module] = []
        ch = in_chans
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(ch, v, 3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            ch = v
        self.features = nn.Sequential(*layers)
        self.init_head(head, dropout)
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def stage_names(self) -> list[tuple[str, ...]]:
        """The five conv blocks, each ending at its max-pool."""
        stages: list[tuple[str, ...]] = []
        block: list[str] = []
        for name, m in self.features.named_children():
            block.append(f"features.{name}")
            if isinstance(m, nn.MaxPool2d):
                stages.append(tuple(block))
                block = []
        return stages + ([tuple(block)] if block else [])


@register_model("vgg19")
def vgg19(batchnorm: bool = True, **kwargs) -> VGG:
    # batchnorm is ignored: plain VGG-19 (torchvision's vgg19, the notebook's) has none.
    return VGG(batchnorm=False, **kwargs)


@register_model("vgg19_bn")
def vgg19_bn(batchnorm: bool = True, **kwargs) -> VGG:
    return VGG(batchnorm=True, **kwargs)
