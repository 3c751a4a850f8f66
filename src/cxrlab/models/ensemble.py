"""An ensemble as one model: its members' mean probability, returned as a logit.

Averaging probabilities (not logits) is what Lakshminarayanan et al. 2017 and Ovadia et al.
2019 evaluate, and it keeps each member's confidence as it is. The mean is returned as the
logit a single model would give (1 logit: logit(mean sigmoid); K classes: log mean softmax),
so every caller that turns logits into probabilities (inference, ONNX export, Grad-CAM's
scores) treats the ensemble exactly like one network, and the exported file is one graph.

`fc` is an affine map on that logit, the identity until `cxrlab calibrate` folds a Platt
(a z + b) or temperature (z / T) map into it, as it does into a single run's final `fc`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cxrlab.models.tta import logit_of_mean_probability


class EnsembleModel(nn.Module):
    """Members (same inputs, same classes) -> the logit of their mean probability."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        outs = {m.num_classes for m in members}
        if len(outs) != 1:
            raise ValueError(f"ensemble members differ in their outputs: {sorted(outs)}")
        self.members = nn.ModuleList(members)
        self.num_classes = members[0].num_classes
        self.in_chans = members[0].in_chans
        # bf16 is a training matter (inference is fp32), kept for use_bf16's question
        self.cpu_bf16 = all(getattr(m, "cpu_bf16", True) for m in members)
        k = self.num_classes
        self.fc = nn.Linear(k, k)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(k))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([m(x).float() for m in self.members])  # (members, N, K)
        return self.fc(logit_of_mean_probability(z))  # as test-time augmentation's views

