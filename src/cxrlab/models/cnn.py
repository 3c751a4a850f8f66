"""The small CNN of the well-known Kaggle pneumonia notebook (Keras), rebuilt in PyTorch.

Stem: two 16-filter 3x3 convs (ReLU, 'same') + max-pool. Then four blocks at 32/64/128/256
filters, each [2 separable 3x3 convs (depthwise 3x3 + pointwise 1x1 + ReLU, like Keras'
SeparableConv2D) + BatchNorm + max-pool], Dropout 0.2 after the last two. Head: flatten, dense
blocks (Linear + ReLU + BatchNorm1d + Dropout) 512/0.7, 128/0.5, 64/0.3, output Linear.

The head flattens (as the notebook does), so the first Linear's size depends on the image size:
the model is built for one `image_size` (default 180, the notebook's) and says so when fed
another. Options:
- `dropout=None` keeps the notebook's rates; a number replaces each of its 5 rates (0 = no
  dropout at all, the ablation); it does not scale them or add Dropout elsewhere.
- `batchnorm=False` removes every BatchNorm layer.
"""

from __future__ import annotations

import torch
from torch import nn

from cxrlab.errors import CxrlabError
from cxrlab.models.base import ImageClassifier, make_dropout, register_model

NOTEBOOK_BLOCK_DROPOUT = (0.0, 0.0, 0.2, 0.2)
NOTEBOOK_DENSE = ((512, 0.7), (128, 0.5), (64, 0.3))


class SeparableConv2d(nn.Sequential):
    """Keras SeparableConv2D: depthwise 3x3 (no bias) + pointwise 1x1 (bias) + ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__(
            nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1),
            nn.ReLU(inplace=True),
        )


def _conv_block(in_ch: int, out_ch: int, dropout: float, batchnorm: bool) -> nn.Sequential:
    layers: list[nn.Module] = [SeparableConv2d(in_ch, out_ch), SeparableConv2d(out_ch, out_ch)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers += [nn.MaxPool2d(2), make_dropout(dropout)]
    return nn.Sequential(*layers)


class NotebookCNN(ImageClassifier):
    feature_layer = "blocks.3"
    first_conv = "stem.0"
    classifier = "fc"
    pooled_head = False  # flattens: no pooled-feature cache, no heads.py heads

    def __init__(self, num_classes: int = 1, in_chans: int = 1, *, dropout: float | None = None,
                 batchnorm: bool = True, image_size: int = 180,
                 widths: tuple[int, ...] = (32, 64, 128, 256), head: str = "linear"):
        super().__init__(num_classes, in_chans, num_features=widths[-1])
        if head != "linear":
            raise CxrlabError(f"--head {head}: the cnn has the notebook's own flatten + dense "
                              "head; other heads need a pooled backbone (e.g. resnet18)")
        self.image_size = image_size
        # Five 2x2 max-pools (floor each time): the spatial size the head is built for.
        side = image_size
        for _ in range(len(widths) + 1):
            side //= 2
        if side < 1:
            raise CxrlabError(f"image_size {image_size}: the cnn needs at least "
                              f"{2 ** (len(widths) + 1)} px (it halves the image "
                              f"{len(widths) + 1} times)")
        self.feature_side = side

        def rate(notebook: float) -> float:  # only where the notebook has a Dropout
            return notebook if dropout is None or notebook == 0 else dropout

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        chans = (16, *widths)
        self.blocks = nn.Sequential(*[
            _conv_block(chans[i], chans[i + 1], rate(NOTEBOOK_BLOCK_DROPOUT[i]), batchnorm)
            for i in range(len(widths))
        ])
        dense: list[nn.Module] = []
        n_in = widths[-1] * side * side
        for units, p in NOTEBOOK_DENSE:
            dense += [nn.Linear(n_in, units), nn.ReLU(inplace=True)]
            if batchnorm:
                dense.append(nn.BatchNorm1d(units))
            dense.append(make_dropout(rate(p)))
            n_in = units
        self.dense = nn.Sequential(*dense)
        self.fc = nn.Linear(n_in, num_classes)

    def trainable_head_names(self) -> tuple[str, ...]:
        return ("dense", "fc")  # a cnn model.pt still transfers its dense blocks

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))

    def stage_names(self) -> list[tuple[str, ...]]:
        return [("stem",), *((f"blocks.{i}",) for i in range(len(self.blocks)))]

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Flatten (not pool, as in the notebook) + dense blocks + output Linear."""
        if feats.shape[-2:] != (self.feature_side, self.feature_side):
            raise CxrlabError(
                f"cnn: built for image_size {self.image_size} (a {self.feature_side}x"
                f"{self.feature_side} feature map) but got a {feats.shape[-2]}x"
                f"{feats.shape[-1]} one; create it with image_size matching the input")
        x = self.dense(torch.flatten(feats, 1))
        return x if pre_logits else self.fc(x)


@register_model("cnn")
def cnn(**kwargs) -> NotebookCNN:
    return NotebookCNN(widths=(32, 64, 128, 256), **kwargs)
