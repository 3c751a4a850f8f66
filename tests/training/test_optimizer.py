"""The run's optimizer is fused for speed and makes the same update as torch's plain loop."""

from __future__ import annotations

import copy

import pytest
import torch

from cxrlab.config import RunConfig
from cxrlab.training.optim import make_optimizer

PLAIN = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_fused_update_matches_the_plain_loop(name):
    cfg = RunConfig.build({"data": "x", "optimizer": name, "lr": 1e-2, "weight_decay": 0.05})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 1))
    plain_model = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    fused = make_optimizer(model.parameters(), cfg, torch.device("cpu"))
    assert fused.defaults["fused"] is True
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "foreach": False}
    if name == "sgd":
        kwargs.update(momentum=cfg.momentum, nesterov=True)
    plain = PLAIN[name](plain_model.parameters(), **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    moved = 0.0
    for (k, p), q in zip(model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((p - start[k]).abs().max()))
    assert moved > 1e-3  # the parameters really were updated
