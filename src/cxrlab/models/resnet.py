"""ResNet-18/50 (He et al. 2015), built here with torchvision's parameter names.

Same names (conv1, bn1, layer1.0.conv1, layer1.0.downsample.0/1, ..., fc) and same shapes as
torchvision, so a torchvision state dict loads without a rename table and the parameter counts
match torchvision's exactly (11,689,512 / 25,557,032 at 3 channels and 1000 classes).

Options: `in_chans` (1 for X-rays: a third of the first conv's cost), `dropout` before the
head, `batchnorm=False` (BatchNorm becomes Identity; convs keep bias=False). With batch norm the
last BN of each residual branch starts at gamma=0 (each block starts as the identity: trains
faster, Goyal et al. 2017); without it the branch's last conv starts at zero instead (Fixup's
idea), otherwise activations double with every block and a deep net starts at inf.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.models.base import (
    ImageClassifier,
    load_matching_state_dict,
    register_model,
)


def _norm(channels: int, batchnorm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None,
                 batchnorm: bool):
        super().__init__()
        self.conv1 = _conv3x3(in_ch, width, stride)
        self.bn1 = _norm(width, batchnorm)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = _norm(width, batchnorm)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def branch_end(self) -> tuple[nn.Conv2d, nn.Module]:
        return self.conv2, self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None,
                 batchnorm: bool):
        super().__init__()
        self.conv1 = _conv1x1(in_ch, width)
        self.bn1 = _norm(width, batchnorm)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = _norm(width, batchnorm)
        self.conv3 = _conv1x1(width, width * self.expansion)
        self.bn3 = _norm(width * self.expansion, batchnorm)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def branch_end(self) -> tuple[nn.Conv2d, nn.Module]:
        return self.conv3, self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(ImageClassifier):
    feature_layer = "layer4"
    first_conv = "conv1"
    classifier = "fc"

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 num_classes: int = 1, in_chans: int = 1, *, dropout: float | None = None,
                 batchnorm: bool = True, image_size: int | None = None, head: str = "linear"):
        # image_size is accepted for a uniform create_model interface and not needed:
        # global average pooling makes the network work at any size.
        super().__init__(num_classes, in_chans, num_features=512 * block.expansion)
        self.batchnorm = batchnorm
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = _norm(64, batchnorm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._in_ch = 64
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.init_head(head, dropout)
        self._init_weights()

    def _make_layer(self, block, width: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in_ch != width * block.expansion:
            downsample = nn.Sequential(_conv1x1(self._in_ch, width * block.expansion, stride),
                                       _norm(width * block.expansion, self.batchnorm))
        out = [block(self._in_ch, width, stride, downsample, self.batchnorm)]
        self._in_ch = width * block.expansion
        out += [block(self._in_ch, width, 1, None, self.batchnorm) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, BasicBlock | Bottleneck):
                conv, norm = m.branch_end()
                nn.init.zeros_(norm.weight if isinstance(norm, nn.BatchNorm2d) else conv.weight)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def stage_names(self) -> list[tuple[str, ...]]:
        return [("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)]


def load_torchvision_state_dict(model: ResNet, state_dict: Mapping[str, torch.Tensor],
                                source: str = "torchvision weights") -> None:
    """Load a torchvision ResNet state dict (head excepted) into `model`, asserting every key
    and shape; the model then normalises with ImageNet's statistics, as those weights expect.
    See `load_matching_state_dict` for the 3 -> 1 channel rule."""
    if not isinstance(model, ResNet):
        raise CxrlabError(f"{source}: torchvision ResNet weights need a resnet model")
    load_matching_state_dict(model, state_dict, source)


@register_model("resnet18")
def resnet18(**kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@register_model("resnet50")
def resnet50(**kwargs) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)
