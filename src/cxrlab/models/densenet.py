"""DenseNet-121 (Huang et al. 2017; CheXNet's backbone), MONAI's implementation.

MONAI's `features` are torchvision's modules, except that each dense layer nests its parts one
level deeper (`denselayer1.layers.norm1` for torchvision's `denselayer1.norm1`, or the older
`denselayer1.norm.1` of torchvision's published .pth files); `torchvision_to_monai` renames
both, the rest of the names match. torchvision applies a ReLU after `norm5` in forward; here
that is `final_act`, so `forward_features` is the map torchvision pools (and Grad-CAM hooks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from cxrlab.models.base import ImageClassifier, load_matching_state_dict, register_model

# torchvision >= 0.3 module names and the older published files' names
_NEW = re.compile(r"^(.*denselayer\d+)\.((?:norm|relu|conv)[12])\.(.*)$")
_OLD = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.([12])\.(.*)$")


def torchvision_to_monai(key: str) -> str:
    if m := _OLD.match(key):
        return f"{m[1]}.layers.{m[2]}{m[3]}.{m[4]}"
    if m := _NEW.match(key):
        return f"{m[1]}.layers.{m[2]}.{m[3]}"
    return key


class DenseNet121(ImageClassifier):
    feature_layer = "final_act"
    first_conv = "features.conv0"
    classifier = "fc"
    source_classifier = "classifier"

    def __init__(self, num_classes: int = 1, in_chans: int = 1, *, dropout: float | None = None,
                 batchnorm: bool = True, image_size: int | None = None, head: str = "linear"):
        # batchnorm/image_size: accepted for the uniform interface; DenseNet needs its BNs.
        super().__init__(num_classes, in_chans, num_features=1024)
        # Imported here, not at the top: `import monai` loads all of MONAI (and MLflow when
        # installed), the larger part of `import cxrlab.models`; only a DenseNet needs it.
        from monai.networks.nets import DenseNet121 as MonaiDenseNet121

        self.features = MonaiDenseNet121(spatial_dims=2, in_channels=in_chans,
                                         out_channels=1).features
        self.final_act = nn.ReLU()
        self.init_head(head, dropout)

    def forward_backbone(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.features(x))

    def stage_names(self) -> list[tuple[str, ...]]:
        """The stem, then each dense block with the transition (or final norm) after it."""
        f = "features."
        return [(f + "conv0", f + "norm0"),
                *((f"{f}denseblock{i}", f"{f}transition{i}") for i in (1, 2, 3)),
                (f + "denseblock4", f + "norm5")]

    def load_source_state_dict(self, state_dict: Mapping[str, torch.Tensor],
                               source: str) -> None:
        load_matching_state_dict(
            self, {torchvision_to_monai(k): v for k, v in state_dict.items()}, source)


@register_model("densenet121")
def densenet121(**kwargs) -> DenseNet121:
    return DenseNet121(**kwargs)
