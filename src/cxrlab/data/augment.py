"""Batched, on-device augmentation: one affine matrix per image, one grid_sample per batch.

Per-image PIL transforms in worker processes cost more than the model on a small CPU; here the
whole batch is warped at once wherever it lives (CPU or GPU), and every random draw comes from
the caller's generator, so a seeded run sees the same augmented images every time.

Policies:
- "none": x itself, untouched.
- "flip": random horizontal flip per image (exact, no resampling).
- "light": the default recipe's: rotation +-10 deg, shift +-5%, isotropic zoom [0.9, 1.1],
  horizontal flip, brightness and contrast +-10%.
- "intensity": "light", then what differs most between intakes (exposure, detector, processing):
  contrast and brightness +-25%, gamma in [1/1.4, 1.4] (log-uniform), Gaussian blur (sigma
  0.3-1.2 px, a quarter of the images), Gaussian noise (up to 8 grey levels, half of them) and
  JPEG re-compression (quality 30-90, a third of them).
  Milder than `cxrlab evaluate --shift`'s moderate and severe levels, so that stress test still
  measures something the model never saw.
- "framing": "intensity" with the framing of the film drawn too, so that how much dark space
  lies beside the chest stops telling normal from pneumonia: a random-resized crop keeping
  60-100% of the area (aspect ratio log-uniform in [3/4, 4/3], so each side keeps 67-100%),
  placed anywhere inside the image (plus "light"'s +-5% shift), rotation +-10 deg and flip as
  in "light"; then, on half the images, the left and right margins brightened (a ramp from
  each edge 8-25% of the width deep, lifting dark pixels by up to 35% of the way to white,
  each side its own draw), as in intakes whose normal films show brighter lateral margins.
  Different from the stress test's framing shifts: its zoom is a centred, isotropic crop
  (81 / 64 / 49% of the area: the first two lie inside what is trained on here, the third
  outside), its border a black letterbox (never drawn here: the warp replicates the edge).
  An option, not the default: on the recipe proxy it held normal films' scores under tighter
  framing but cost validation AUC and specificity under blur, down-sampling and borders
  (docs/recipes.md, "Framing").
- "scale": "intensity" with the film's scale and framing drawn too, so that how much of the
  child (and of the dark space beside it) the film holds stops telling normal from pneumonia:
  an isotropic zoom log-uniform in [1/1.25, 1.25] of each side (zooming in keeps at least 80%
  of each side, so the lungs stay in view and the label stays true; zooming out shrinks the
  film into a black border of up to 10% a side, as a larger plate or a framed export does),
  aspect ratio log-uniform in [1/1.08, 1.08], then "light"'s shift, rotation and flip; what the
  warp uncovers is black (not the replicated edge). Measured against "intensity" on the
  proxy and the full Kermany run with the stress test (docs/recipes.md, "Framing").
- "intake" (the default since 2026-12-06): what differs between intakes, framing included.
  Half the images (drawn per image) get "scale"'s zoom in or out with its black border, the
  other half "intensity"'s small zoom, so a batch holds films framed as the training intake
  frames them beside zoomed and letterboxed ones; then "intensity"'s film with wider blur
  (a third of the images, sigma 0.3-2 px) and noise (up to 16 grey levels): edge contrast
  separates normal from pneumonia films at every scale (and a model that may not read the
  framing leans on it: with "intensity"'s film, geometry alone cost specificity on blurred and
  noisy films). Chosen at full size on paired validation and the stress test
  (docs/recipes.md, "Framing").
- "notebook": the Kaggle notebook's Keras ImageDataGenerator(rotation_range=30,
  width_shift_range=0.2, height_shift_range=0.2, shear_range=0.2, zoom_range=0.2,
  horizontal_flip=True, fill_mode="nearest"), with Keras' semantics: rotation and shear are
  drawn uniformly in degrees (Keras 2 reads shear_range as an angle in degrees, so 0.2 is a
  0.2 deg shear -- negligible, but that is what the notebook trained with), shifts as
  fractions of the size, zoom independently per axis in [0.8, 1.2], bilinear sampling,
  "nearest" fill = grid_sample's padding_mode="border".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cxrlab.data.images import recompress_jpeg
from cxrlab.errors import CxrlabError

POLICIES = ("none", "flip", "light", "intensity", "framing", "scale", "intake", "notebook")


@dataclass(frozen=True)
class _Affine:
    rotation_deg: float
    shift: float  # fraction of width/height
    shear_deg: float
    zoom: float  # factor drawn in [1 - zoom, 1 + zoom]
    zoom_per_axis: bool
    jitter: float  # brightness and contrast factor in [1 - jitter, 1 + jitter]; 0 = off
    film: bool = False  # gamma, blur and noise after the jitter ("intensity")
    framing: bool = False  # random-resized crop instead of zoom, margins brightened ("framing")
    scale: bool = False  # zoom in and out with aspect jitter, black fill ("scale")
    scale_share: float = 1.0  # share of images given scale's draws; the rest keep `zoom`'s
    wide_film: bool = False  # the film's blur and noise over WIDE_*'s ranges ("intake")


_AFFINE = {
    "light": _Affine(rotation_deg=10, shift=0.05, shear_deg=0, zoom=0.1, zoom_per_axis=False,
                     jitter=0.1),
    "intensity": _Affine(rotation_deg=10, shift=0.05, shear_deg=0, zoom=0.1,
                         zoom_per_axis=False, jitter=0.25, film=True),
    "framing": _Affine(rotation_deg=10, shift=0.05, shear_deg=0, zoom=0.0,
                       zoom_per_axis=True, jitter=0.25, film=True, framing=True),
    "scale": _Affine(rotation_deg=10, shift=0.05, shear_deg=0, zoom=0.0, zoom_per_axis=True,
                     jitter=0.25, film=True, scale=True),
    "intake": _Affine(rotation_deg=10, shift=0.05, shear_deg=0, zoom=0.1, zoom_per_axis=False,
                      jitter=0.25, film=True, scale=True, scale_share=0.5, wide_film=True),
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
    frame = None
    if p.framing:  # drawn after the 9 rows above, so the other policies keep their streams
        frame = framing_draws(_uniform(len(FRAMING_ROWS) * b, generator, dev).view(-1, b))
        zx, zy = frame["side_x"], frame["side_y"]
        # The crop's centre anywhere that keeps it inside the image, plus the usual shift.
        tx = (r[1] * 2 - 1) * ((1 - zx) / 2 + p.shift) * w
        ty = (r[2] * 2 - 1) * ((1 - zy) / 2 + p.shift) * h
    rest = None  # the images left with `zoom`'s draws when only a share get scale's
    if p.scale and p.scale_share >= 1:  # drawn after the 9 rows above, like "framing"
        zx, zy = scale_draws(_uniform(2 * b, generator, dev).view(2, b))
    elif p.scale:  # a third row picks the images
        u = _uniform(3 * b, generator, dev).view(3, b)
        sx, sy = scale_draws(u[:2])
        scaled = u[2] < p.scale_share
        zx, zy = torch.where(scaled, sx, zx), torch.where(scaled, sy, zy)
        rest = torch.nonzero(~scaled).flatten()

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
    grid = _affine_grid(m.to(work.dtype), h, w)
    out = F.grid_sample(work, grid, mode="bilinear",
                        padding_mode="zeros" if p.scale else "border", align_corners=False)
    if rest is not None and rest.numel():
        # The rest are "intensity"'s images: the replicated edge where the warp uncovers.
        out[rest] = F.grid_sample(work[rest], grid[rest], mode="bilinear",
                                  padding_mode="border", align_corners=False)
    if frame is not None:
        out = _brighten_margins(out, frame)

    if p.jitter:
        # Contrast about the image mean, then brightness; one fused multiply-add per image.
        c = 1 + (r[7] * 2 - 1) * p.jitter
        bright = 1 + (r[8] * 2 - 1) * p.jitter
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        scale = (c * bright).view(b, 1, 1, 1).to(out.dtype)
        offset = mean * ((1 - c) * bright).view(b, 1, 1, 1).to(out.dtype)
        out.mul_(scale).add_(offset).clamp_(0.0, 1.0)  # out is grid_sample's own: in place
    if p.film:
        out = _film(out, generator, wide=p.wide_film)
    return out.to(x.dtype)


SCALE = 1.25  # "scale": zoom of each side log-uniform in [1/SCALE, SCALE] (output -> input)
SCALE_ASPECT = 1.08  # its aspect ratio log-uniform in [1/A, A]


def scale_draws(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """"scale"'s output -> input zoom of x and y from two rows of uniform draws: above 1
    zooms out (the film shrinks into a black border), below 1 zooms in."""
    zoom = torch.exp((u[0] * 2 - 1) * math.log(SCALE))
    aspect = torch.exp((u[1] * 2 - 1) * math.log(SCALE_ASPECT))
    return zoom * aspect.sqrt(), zoom / aspect.sqrt()


CROP_AREA = (0.6, 1.0)  # "framing": share of the image's area a crop keeps (uniform)
CROP_ASPECT = 4 / 3  # crop's aspect ratio (width/height share) log-uniform in [1/A, A]
MARGIN_P = 0.5  # share of images whose lateral margins are brightened
MARGIN_DEPTH = (0.08, 0.25)  # how far in from each edge the brightening reaches (of the width)
MARGIN_LIFT = 0.35  # largest lift at the edge, as a share of the way from a pixel to white
FRAMING_ROWS = ("area", "aspect", "margins", "depth_left", "depth_right", "lift_left",
                "lift_right")


def framing_draws(u: torch.Tensor) -> dict[str, torch.Tensor]:
    """"framing"'s parameters from uniform draws `u` (one row per FRAMING_ROWS entry, one
    column per image): the crop's area and aspect, the side fractions it keeps (output ->
    input zoom, at most 1: a crop never zooms out), and each lateral margin's depth and lift
    (lift 0 on the images not drawn for it)."""
    area = CROP_AREA[0] + u[0] * (CROP_AREA[1] - CROP_AREA[0])
    aspect = torch.exp((u[1] * 2 - 1) * math.log(CROP_ASPECT))
    on = (u[2] < MARGIN_P).to(u.dtype)
    depth = [MARGIN_DEPTH[0] + u[i] * (MARGIN_DEPTH[1] - MARGIN_DEPTH[0]) for i in (3, 4)]
    return {"area": area, "aspect": aspect,
            "side_x": (area * aspect).sqrt().clamp(max=1.0),
            "side_y": (area / aspect).sqrt().clamp(max=1.0),
            "depth_left": depth[0], "depth_right": depth[1],
            "lift_left": u[5] * MARGIN_LIFT * on, "lift_right": u[6] * MARGIN_LIFT * on}


def _brighten_margins(out: torch.Tensor, frame: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each lateral margin pulled towards white by a linear ramp: `lift` at the edge, 0 at
    `depth` x the width in; dark pixels gain most (x + a (1 - x)), so [0, 1] is kept."""
    b, _, _, w = out.shape
    xs = (torch.arange(w, device=out.device, dtype=torch.float32) + 0.5) / w  # (W,)

    def ramp(dist: torch.Tensor, side: str) -> torch.Tensor:  # (B, W)
        depth = frame[f"depth_{side}"].view(b, 1).to(out.device)
        lift = frame[f"lift_{side}"].view(b, 1).to(out.device)
        return lift * (1 - dist / depth).clamp_min(0)

    a = (ramp(xs.view(1, w), "left") + ramp(1 - xs.view(1, w), "right")).clamp_max(1.0)
    return out.add_(a.view(b, 1, 1, w).to(out.dtype) * (1 - out))  # grid_sample's own tensor


GAMMA = 1.4  # gamma drawn log-uniformly in [1/GAMMA, GAMMA]
BLUR_P, BLUR_SIGMA = 0.25, (0.3, 1.2)  # share of images blurred; sigma range in pixels
NOISE_P, NOISE_MAX = 0.5, 8 / 255  # share of images with noise; largest sigma
# "intake"'s wider film: sharpness and noise separate normal from pneumonia films too, so a
# model that may not use the framing leans on them unless they vary more (docs/recipes.md).
WIDE_BLUR_P, WIDE_BLUR_SIGMA = 1 / 3, (0.3, 2.0)
WIDE_NOISE_MAX = 16 / 255
JPEG_P, JPEG_QUALITY = 1 / 3, (30, 90)  # share of images re-compressed; quality range


def _film(out: torch.Tensor, generator: torch.Generator | None,
          wide: bool = False) -> torch.Tensor:
    """Gamma, blur, noise and JPEG of "intensity" on a float batch in [0, 1] (drawn after the
    affine draws, so "light" keeps its random stream); `wide`: "intake"'s blur and noise."""
    blur_p, blur_sigma = (WIDE_BLUR_P, WIDE_BLUR_SIGMA) if wide else (BLUR_P, BLUR_SIGMA)
    noise_max = WIDE_NOISE_MAX if wide else NOISE_MAX
    b, c, h, w = out.shape
    dev = out.device
    r = _uniform(7 * b, generator, dev).view(7, b)
    g = torch.exp((r[0] * 2 - 1) * math.log(GAMMA)).view(b, 1, 1, 1).to(out.dtype)
    out = out.clamp_min(1e-6).pow(g)
    blur = torch.nonzero(r[1] < blur_p).flatten()
    if blur.numel():
        # Only the drawn images, one sigma each: a separable Gaussian as a grouped conv.
        n = blur.numel()
        sigma = blur_sigma[0] + r[2][blur] * (blur_sigma[1] - blur_sigma[0])
        radius = math.ceil(3 * blur_sigma[1])
        t = torch.arange(-radius, radius + 1, device=dev, dtype=out.dtype)
        k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(out.dtype)) ** 2)
        k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, taps)
        y = out[blur].reshape(1, n * c, h, w)
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, k.view(n * c, 1, 1, -1), groups=n * c)
        out[blur] = F.conv2d(y, k.view(n * c, 1, -1, 1), groups=n * c).view(n, c, h, w)
    noisy = torch.nonzero(r[3] < NOISE_P).flatten()
    if noisy.numel():
        gen_device = generator.device if generator is not None else dev
        z = torch.randn((noisy.numel(), c, h, w), generator=generator, device=gen_device,
                        dtype=torch.float32).to(dev, out.dtype)
        out[noisy] += z * (r[4][noisy] * noise_max).view(-1, 1, 1, 1).to(out.dtype)
    out = out.clamp_(0.0, 1.0)
    quality = JPEG_QUALITY[0] + r[6] * (JPEG_QUALITY[1] - JPEG_QUALITY[0])
    pick = torch.nonzero(r[5] < JPEG_P).flatten().tolist()
    if pick:
        out[pick] = _jpeg(out[pick], quality[pick].round().int().tolist())
    return out


def _jpeg(x: torch.Tensor, qualities: list[int]) -> torch.Tensor:
    """Each image re-compressed as JPEG at its quality, through PIL on the CPU (a few ms a
    batch: there is no batched JPEG codec in torch)."""
    u8 = (x.float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    return torch.from_numpy(recompress_jpeg(u8, qualities)).to(x.device, x.dtype) / 255


def _affine_grid(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.affine_grid(m[:, :2], align_corners=False) as two broadcast multiply-adds: on the CPU
    affine_grid's batched matmul over a (B, H*W, 3) base grid cost about as much as the
    grid_sample it feeds (docs/performance.md)."""
    xs = ((torch.arange(w, device=m.device, dtype=m.dtype) * 2 + 1) / w - 1).view(1, 1, w)
    ys = ((torch.arange(h, device=m.device, dtype=m.dtype) * 2 + 1) / h - 1).view(1, h, 1)

    def coordinate(i: int) -> torch.Tensor:  # (B, H, W): row i of m applied to (x, y, 1)
        a, b, c = (m[:, i, j, None, None] for j in range(3))
        return a * xs + (b * ys + c)

    return torch.stack([coordinate(0), coordinate(1)], dim=-1)


def _mat(a, b, c, d, e, f) -> torch.Tensor:
    """Batch of 3x3 homogeneous matrices [[a, b, c], [d, e, f], [0, 0, 1]] from (B,) tensors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=1).view(-1, 3, 3)
