"""Batched, on-device augmentation: one affine matrix per image, one grid_sample per batch.

Per-image PIL transforms in worker processes cost more than the model on a small CPU; here the
whole batch is warped at once wherever it lives (CPU or GPU), and every random draw comes from
the caller's generator, so a seeded run sees the same augmented images every time.

Policies:
- "none": x itself, untouched.
- "flip": random horizontal flip per image (exact, no resampling).
- "light": the default recipe's: rotation +-10 deg, shift +-5%, isotropic zoom [0.9, 1.1],
  horizontal flip, brightness and contrast +-10%.
- "notebook": the Kaggle notebook's Keras ImageDataGenerator(rotation_range=30,
  width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2, zoom_range=0.2,
  horizontal_flip=True, fill_mode="nearest"), with Keras' semantics: rotation and shear are
  drawn uniformly in degrees (Keras 2 reads shear_range as an angle in degrees, so 0.2 is a
  0.2 deg shear -- negligible, but that is what the notebook trained with), shifts as
  fractions of the size, zoom independently per axis in [0.8, 1.2], bilinear sampling,
  "nearest" fill = grid_sample's padding_mode="border".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxrlab.errors import CxrlabError

POLICIES = ("none", "flip", "light", "notebook")


@dataclass(frozen=True)
class _Affine:
    rotation_deg: float
    shift: float  # fraction of width/height
    shear_deg: float
    zoom: float  # factor drawn in [1 - zoom, 1 + zoom]
    zoom_per_axis: bool
    jitter: float  # brightness and contrast factor in [1 - jitter, 1 + jitter]; 0 = off


_AFFINE = {
    "light": _Affine(rotation_deg=10, shift=0.05, shear_deg=0, zoom=0.1, zoom_per_axis=False,
                     jitter=0.1),
    "notebook": _Affine(rotation_deg=30, shift=0.2, shear_deg=0.2, zoom=0.2, zoom_per_axis=True,
                        jitter=0.0),
}


def augment_batch(x: torch.Tensor, policy: str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Augment a (B, C, H, W) float batch in [0, 1]; same shape, dtype and device."""
    if policy not in POLICIES:
        raise CxrlabError(f"augment {policy!r}: choose from {', '.join(POLICIES)}")
    if policy == "none":
        return x
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"augment_batch needs a (B, C, H, W) float tensor, got "
                         f"{tuple(x.shape)} {x.dtype}")
    b = x.shape[0]
    if b == 0:
        return x
    if policy == "flip":
        flip = _uniform(b, generator, x.device) < 0.5
        return torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
    return _affine_policy(x, _AFFINE[policy], generator)


def _uniform(n: int, generator: torch.Generator | None, device: torch.device,
             low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """U[low, high) draws made on the generator's device, then moved to the data's."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float32)
    return (u * (high - low) + low).to(device)


def _affine_policy(x: torch.Tensor, p: _Affine, generator: torch.Generator | None) -> torch.Tensor:
    b, _, h, w = x.shape
    dev = x.device
    # One batched draw of all parameters (order fixed: reproducible for a given seed).
    r = _uniform(9 * b, generator, dev).view(9, b)
    theta = torch.deg2rad((r[0] * 2 - 1) * p.rotation_deg)
    tx = (r[1] * 2 - 1) * p.shift * w  # pixels
    ty = (r[2] * 2 - 1) * p.shift * h
    shear = torch.deg2rad((r[3] * 2 - 1) * p.shear_deg)
    zx = 1 + (r[4] * 2 - 1) * p.zoom
    zy = 1 + (r[5] * 2 - 1) * p.zoom if p.zoom_per_axis else zx
    flip = torch.where(r[6] < 0.5, -1.0, 1.0)

    # Output -> input map in centred pixel coordinates (x right, y down), composed like Keras:
    # rotation @ shift @ shear @ zoom, then the horizontal flip of the output.
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero, one = torch.zeros_like(cos), torch.ones_like(cos)
    rot = _mat(cos, -sin, zero, sin, cos, zero)
    shift = _mat(one, zero, tx, zero, one, ty)
    shr = _mat(one, -torch.sin(shear), zero, zero, torch.cos(shear), zero)
    zoom = _mat(zx, zero, zero, zero, zy, zero)
    fl = _mat(flip, zero, zero, zero, one, zero)
    m = rot @ shift @ shr @ zoom @ fl
    # To affine_grid's normalised coordinates (align_corners=False): pixel = norm * size / 2.
    s = torch.tensor([w / 2, h / 2, 1.0], device=dev)
    m = (m / s.view(1, 3, 1)) * s.view(1, 1, 3)  # S^-1 @ m @ S with S = diag(w/2, h/2, 1)

    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    grid = F.affine_grid(m[:, :2, :].to(work.dtype), [b, 1, h, w], align_corners=False)
    out = F.grid_sample(work, grid, mode="bilinear", padding_mode="border", align_corners=False)

    if p.jitter:
        # Contrast about the image mean, then brightness; one fused multiply-add per image.
        c = 1 + (r[7] * 2 - 1) * p.jitter
        bright = 1 + (r[8] * 2 - 1) * p.jitter
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        scale = (c * bright).view(b, 1, 1, 1).to(out.dtype)
        offset = mean * ((1 - c) * bright).view(b, 1, 1, 1).to(out.dtype)
        out.mul_(scale).add_(offset).clamp_(0.0, 1.0)  # out is grid_sample's own: in place
    return out.to(x.dtype)


def _mat(a, b, c, d, e, f) -> torch.Tensor:
    """Batch of 3x3 homogeneous matrices [[a, b, c], [d, e, f], [0, 0, 1]] from (B,) tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=1).view(-1, 3, 3)

