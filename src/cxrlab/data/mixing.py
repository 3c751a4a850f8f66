"""Mixup and CutMix on a whole training batch, with soft targets.

Mixup (Zhang et al., ICLR 2018): x = lam x_i + (1 - lam) x_j, targets mixed the same way.
CutMix (Yun et al., ICCV 2019): a box of image j pasted into image i, lam = the share of image
i left, targets mixed by that share. As timm's batch mode: one lam per batch, drawn from
Beta(alpha, alpha), each image mixed with the batch in reverse order (the loader already
shuffled it); with both on, each batch is one or the other with probability 1/2.

Every draw comes from the caller's generator (the run's augmentation generator, saved in its
checkpoints), so a seeded run mixes the same way every time and a resumed one goes on
exactly. The Beta draw is the inverse CDF of a uniform one: torch's Beta sampler has no
generator argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy.special import betaincinv


@dataclass(frozen=True)
class Mixed:
    x: torch.Tensor  # the mixed images
    target: torch.Tensor  # (B, K) soft targets: lam * one_hot(y) + (1 - lam) * one_hot(y[perm])
    lam: float  # share of each image's own content (CutMix: the exact pixel share)
    perm: torch.Tensor  # the partner of each image
    box: tuple[int, int, int, int] | None = None  # CutMix: (top, bottom, left, right) pasted


def _uniform(generator: torch.Generator | None, n: int = 1) -> list[float]:
    device = generator.device if generator is not None else "cpu"
    return torch.rand(n, generator=generator, device=device, dtype=torch.float64).tolist()


def beta(alpha: float, u: float) -> float:
    """The Beta(alpha, alpha) quantile of u: a Beta draw from a uniform one."""
    return float(betaincinv(alpha, alpha, u))


def mix_batch(x: torch.Tensor, y: torch.Tensor, n_classes: int, mixup: float = 0.0,
              cutmix: float = 0.0, generator: torch.Generator | None = None) -> Mixed:
    """Mix a (B, C, H, W) float batch with labels `y` (B,); `mixup` / `cutmix`: the alpha of
    each (0 = off; at least one above 0)."""
    if mixup <= 0 and cutmix <= 0:
        raise ValueError("mix_batch needs mixup or cutmix > 0")
    u_switch, u_lam, u_top, u_left = _uniform(generator, 4)  # always 4: a fixed stream
    use_cutmix = cutmix > 0 and (mixup <= 0 or u_switch < 0.5)
    lam = beta(cutmix if use_cutmix else mixup, u_lam)
    perm = torch.arange(x.shape[0] - 1, -1, -1, device=x.device)
    box = None
    if use_cutmix:
        h, w = x.shape[-2:]
        top, bottom, left, right = cut_box(h, w, lam, u_top, u_left)
        out = x.clone()
        out[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (h * w)  # the box as cut, clipped
        box = (top, bottom, left, right)
    else:
        out = x * lam + x[perm] * (1.0 - lam)
    one_hot = torch.nn.functional.one_hot(y.long(), n_classes).to(torch.float32)
    target = one_hot * lam + one_hot[perm] * (1.0 - lam)
    return Mixed(out, target, lam, perm, box)


def cut_box(h: int, w: int, lam: float, u_top: float, u_left: float
            ) -> tuple[int, int, int, int]:
    """CutMix's box: sides sqrt(1 - lam) of the image's, centre uniform, clipped to it."""
    r = math.sqrt(1.0 - lam)
    ch, cw = round(h * r), round(w * r)
    cy, cx = int(u_top * h), int(u_left * w)
    top, bottom = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    left, right = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    return top, bottom, left, right
