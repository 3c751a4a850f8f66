"""Test-time augmentation: a model that scores each image and a few views of it, as one model.

`with_tta(model, "flip")` returns an nn.Module whose output is the logit of the MEAN
PROBABILITY over the views (one logit for 2 classes, the log of the mean softmax for K), so
everything downstream (`probabilities`, thresholds, metrics, ONNX export) is unchanged: the
sigmoid/softmax of the output is the average of the views' probabilities, exactly. Averaging
probabilities, not logits, is the convention the ensembles share (models/ensemble.py), so a TTA
wrapper around an ensemble averages every member on every view.

The views are batched into one forward pass (V x N images), each one inference pass: flip
doubles the cost of a prediction. benchmarks/tta.py measured what it bought on the default
recipe, and that a tighter-framing view (the central 90% resized back up, the stress test's
weakest shift) cost accuracy under tighter framing: it is not offered (docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cxrlab.errors import CxrlabError


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirrored left-right (a chest film's anatomy is nearly symmetric; the heart is not)."""
    return torch.flip(x, dims=[-1])


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"identity": identity, "hflip": hflip}
# setting -> the views it averages (the image itself always first)
TTA: dict[str, tuple[str, ...]] = {"none": ("identity",), "flip": ("identity", "hflip")}


def check_tta(name: str, option: str = "--tta") -> str:
    if name not in TTA:
        raise CxrlabError(f"{option} {name}: choose from {', '.join(TTA)}")
    return name


def passes(name: str) -> int:
    """Inference passes per image under this setting (its cost relative to none)."""
    return len(TTA[check_tta(name)])


def _log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """log sigmoid(z), finite for every finite z, in ops ONNX Runtime computes the same way
    (torch's log_sigmoid exports as Log(Sigmoid): -inf below z ~ -88)."""
    return torch.clamp(z, max=0.0) - torch.log1p(torch.exp(-torch.abs(z)))


def _log_mean_exp(a: torch.Tensor) -> torch.Tensor:
    """log(mean(exp(a))) over dim 0, shifted by the maximum so that nothing overflows."""
    top = a.amax(dim=0)
    return top + torch.log(torch.exp(a - top).mean(dim=0))


def logit_of_mean_probability(logits: torch.Tensor) -> torch.Tensor:
    """(V, N, K) logits of V views (or members) -> (N, K) logits whose sigmoid (K = 1) or
    softmax is the mean of the V probabilities; in log space, so no probability of 0 or 1
    in float32 becomes an infinite logit."""
    if logits.shape[-1] == 1:
        return _log_mean_exp(_log_sigmoid(logits)) - _log_mean_exp(_log_sigmoid(-logits))
    return _log_mean_exp(torch.log_softmax(logits, dim=-1))


class TestTimeAugmentation(nn.Module):
    """`model` scored on each of `views` of its input; returns the logit of their mean
    probability (see the module docstring)."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, model: nn.Module, tta: str):
        super().__init__()
        self.model = model
        self.tta = check_tta(tta)
        self.views = TTA[tta]
        for attr in ("num_classes", "in_chans", "cpu_bf16"):  # what callers ask a model
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        batch = torch.cat([VIEWS[v](x) for v in self.views])
        logits = self.model(batch).float()
        return logit_of_mean_probability(logits.reshape(len(self.views), n, -1))


def with_tta(model: nn.Module, tta: str) -> nn.Module:
    """`model` under TTA setting `tta` ("none": `model` itself; an already wrapped model is
    re-wrapped, never wrapped twice)."""
    check_tta(tta)
    model = without_tta(model)
    return model if tta == "none" else TestTimeAugmentation(model, tta).eval()


def without_tta(model: nn.Module) -> nn.Module:
    """The model under any TTA wrapper (Grad-CAM explains the model itself, one view)."""
    return model.model if isinstance(model, TestTimeAugmentation) else model


def tta_of(model: nn.Module) -> str:
    return model.tta if isinstance(model, TestTimeAugmentation) else "none"
