"""Batched augmentation: contracts (shape, dtype, identity, seeds) and Keras' geometry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cxrlab.data.augment as aug
from cxrlab.data.augment import POLICIES, augment_batch
from cxrlab.errors import CxrlabError


def smooth_batch(b: int = 6, c: int = 1, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth, left-right asymmetric images in [0, 1] (bilinear warps of noise are not smooth)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h // 4, w // 4, generator=g)
    x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x[..., : h // 3, : w // 4] = 1.0  # a bright corner: flips and shifts are visible
    return x.clamp(0, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("shape", [(4, 1, 32, 32), (3, 3, 24, 40)])
def test_shape_dtype_and_device_kept(policy, shape):
    x = smooth_batch(*shape)
    out = augment_batch(x, policy, gen(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert torch.isfinite(out).all()


def test_none_is_exactly_the_input():
    x = smooth_batch()
    assert augment_batch(x, "none", gen(0)) is x


@pytest.mark.parametrize("policy", ["flip", "light", "intensity", "framing", "intake",
                                    "notebook"])
def test_seeded_runs_repeat_and_other_seeds_differ(policy):
    x = smooth_batch(8)
    a = augment_batch(x, policy, gen(1))
    assert torch.equal(a, augment_batch(x, policy, gen(1)))
    assert not torch.equal(a, augment_batch(x, policy, gen(2)))
    assert augment_batch(x, policy).shape == x.shape  # global RNG when no generator


def test_flip_flips_some_images_exactly_and_leaves_the_others():
    x = smooth_batch(16)
    out = augment_batch(x, "flip", gen(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x, strict=True)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 16


@pytest.mark.parametrize("policy", ["light", "notebook"])
def test_warps_change_images_but_keep_mean_intensity(policy):
    x = smooth_batch(16, h=48, w=48)
    x[..., : 16, : 12] = x.mean()  # no dominant corner: a shift then moves the mean little
    out = augment_batch(x, policy, gen(0))
    per_image = (out - x).abs().mean(dim=(1, 2, 3))
    assert (per_image > 1e-3).all()  # every image changed
    assert (out.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))).abs().mean() < 0.05
    assert out.min() >= 0 and out.max() <= 1


def fixed_draws(monkeypatch, values: list[float]) -> None:
    """Every image gets the same draws: values[i] for parameter i (see _affine_policy)."""
    def fake(n, generator, device, low=0.0, high=1.0):
        return torch.tensor(values, dtype=torch.float32).repeat_interleave(n // len(values))
    monkeypatch.setattr(aug, "_uniform", fake)


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 24, 40)])
def test_middle_draws_are_the_identity(monkeypatch, shape):
    """Zero rotation/shift/shear, zoom 1, no flip, no jitter -> the input back (also for
    non-square images: checks the pixel <-> affine_grid coordinate conversion)."""
    fixed_draws(monkeypatch, [0.5] * 9)
    x = smooth_batch(*shape)
    for policy in ("light", "notebook"):
        assert torch.allclose(augment_batch(x, policy), x, atol=1e-5)


def keras_apply_affine_transform(img, theta, tx, ty, shear, zx, zy):
    """Keras 2's apply_affine_transform (rows, cols image; angles in degrees), re-typed."""
    from scipy import ndimage

    t = np.deg2rad(theta)
    s = np.deg2rad(shear)
    m = (np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
         @ np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]])
         @ np.array([[1, -np.sin(s), 0], [0, np.cos(s), 0], [0, 0, 1]])
         @ np.diag([zx, zy, 1.0]))
    h, w = img.shape
    ox, oy = h / 2 - 0.5, w / 2 - 0.5
    m = np.array([[1, 0, ox], [0, 1, oy], [0, 0, 1]]) @ m @ np.array(
        [[1, 0, -ox], [0, 1, -oy], [0, 0, 1]])
    m[:, [0, 1]] = m[:, [1, 0]]
    m[[0, 1]] = m[[1, 0]]
    return ndimage.affine_transform(img, m[:2, :2], m[:2, 2], order=1, mode="nearest")


@pytest.mark.parametrize("flip", [False, True])
def test_notebook_matches_keras_image_data_generator(monkeypatch, flip):
    pytest.importorskip("scipy")
    draws = [0.9, 0.2, 0.7, 0.8, 0.3, 0.6, 0.2 if flip else 0.8, 0.5, 0.5]
    fixed_draws(monkeypatch, draws)
    x = smooth_batch(1, h=40, w=40)
    out = augment_batch(x, "notebook")[0, 0].numpy()
    u = [2 * d - 1 for d in draws]  # the draws mapped to [-1, 1)
    ref = keras_apply_affine_transform(
        x[0, 0].numpy(), theta=30 * u[0], tx=0.2 * 40 * u[1], ty=0.2 * 40 * u[2],
        shear=0.2 * u[3], zx=1 + 0.2 * u[4], zy=1 + 0.2 * u[5])
    if flip:
        ref = ref[:, ::-1]
    assert np.abs(out - ref).max() < 1e-4
    assert np.abs(out - x[0, 0].numpy()).max() > 0.1


def test_bf16_in_bf16_out():
    x = smooth_batch(4).to(torch.bfloat16)
    for policy in POLICIES:
        assert augment_batch(x, policy, gen(0)).dtype == torch.bfloat16


def test_unknown_policy_is_a_user_error():
    with pytest.raises(CxrlabError,
                       match="choose from none, flip, light, intensity, framing, scale, "
                             "intake, notebook"):
        augment_batch(smooth_batch(), "heavy")


def film(monkeypatch, x, gamma=aug.GAMMA, blur=0.0, noise=0.0, jpeg=0.0, seed=0):
    """Only the intensity part of "intensity", with each of its parts switched on or off."""
    monkeypatch.setattr(aug, "GAMMA", gamma)
    monkeypatch.setattr(aug, "BLUR_P", blur)
    monkeypatch.setattr(aug, "NOISE_P", noise)
    monkeypatch.setattr(aug, "JPEG_P", jpeg)
    return aug._film(x.clone(), gen(seed))


def test_intensity_gamma_is_one_power_per_image_in_range(monkeypatch):
    x = smooth_batch(32, h=32, w=32)
    out = film(monkeypatch, x)
    mid = (x > 0.2) & (x < 0.8)
    g = (out.log() / x.log())[mid].view(-1)
    per_image = [(out[i].log() / x[i].log())[mid[i]] for i in range(32)]
    assert all(p.max() - p.min() < 1e-3 for p in per_image)  # one gamma per image
    gs = torch.stack([p.mean() for p in per_image])
    assert (gs > 1 / aug.GAMMA - 1e-3).all() and (gs < aug.GAMMA + 1e-3).all()
    assert (gs < 0.95).any() and (gs > 1.05).any()  # lighter and darker mid-tones both occur
    assert g.numel() > 0


def test_intensity_blur_smooths_and_noise_adds_a_little(monkeypatch):
    x = torch.zeros(4, 1, 32, 32)
    x[..., :, 16:] = 1.0  # a sharp edge
    x = x * 0.6 + 0.2
    blurred = film(monkeypatch, x, gamma=1.0, blur=1.0)
    edge = lambda t: (t[..., 1:] - t[..., :-1]).abs().amax(dim=(1, 2, 3))  # noqa: E731
    assert (edge(blurred) < 0.9 * edge(x)).all()  # every image blurred (sigma >= 0.3 px)
    assert torch.allclose(blurred.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-3)
    noisy = film(monkeypatch, x, gamma=1.0, noise=1.0)
    sd = (noisy - x).std(dim=(1, 2, 3))
    assert (sd <= aug.NOISE_MAX * 1.1).all() and (sd > 0).any()
    assert torch.equal(film(monkeypatch, x, gamma=1.0), x)  # every part off: untouched


@pytest.mark.parametrize("part", ["blur", "noise"])
def test_blur_and_noise_touch_only_the_images_drawn_for_them(monkeypatch, part):
    x = torch.zeros(16, 2, 24, 24)
    x[..., :, 12:] = 1.0
    x = x * 0.6 + 0.2
    out = film(monkeypatch, x, gamma=1.0, **{part: 0.5})
    kept = [torch.equal(o, xi) for o, xi in zip(out, x, strict=True)]
    assert 0 < sum(kept) < 16  # some drawn, some not
    changed = ~torch.tensor(kept)
    assert ((out[changed] - x[changed]).abs().amax(dim=(1, 2, 3)) > 1e-3).all()


@pytest.mark.parametrize("shape", [(5, 24, 40), (1, 7, 3)])
def test_affine_grid_is_torchs(shape):
    b, h, w = shape
    m = torch.randn(b, 3, 3, generator=gen(4))
    ref = torch.nn.functional.affine_grid(m[:, :2], [b, 1, h, w], align_corners=False)
    assert torch.allclose(aug._affine_grid(m, h, w), ref, atol=1e-6)


@pytest.mark.parametrize("c", [1, 3])
def test_intensity_jpeg_recompresses_every_picked_image(monkeypatch, c):
    x = smooth_batch(4, c=c, h=48, w=48)
    x = x + 0.1 * torch.rand(x.shape, generator=gen(3))  # fine detail JPEG must lose
    x = x.clamp(0, 1)
    out = film(monkeypatch, x, gamma=1.0, jpeg=1.0)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, (out * 255).round() / 255)  # decoded 8-bit images
    err = (out - x).abs().mean(dim=(1, 2, 3))
    assert (err > 2 / 255).all() and (err < 0.1).all()  # every image changed, none ruined


# -- "framing" --------------------------------------------------------------------------------


def draws(n: int = 4000, seed: int = 0) -> dict[str, torch.Tensor]:
    u = torch.rand(len(aug.FRAMING_ROWS), n, generator=gen(seed))
    return aug.framing_draws(u)


def test_framing_draws_cover_their_ranges_and_nothing_else():
    d = draws()
    lo, hi = aug.CROP_AREA
    assert d["area"].min() >= lo and d["area"].max() <= hi
    assert d["area"].min() < lo + 0.01 and d["area"].max() > hi - 0.01  # the whole range
    a = aug.CROP_ASPECT
    assert d["aspect"].min() >= 1 / a - 1e-6 and d["aspect"].max() <= a + 1e-6
    assert d["aspect"].min() < 1 / a + 0.01 and d["aspect"].max() > a - 0.01
    assert ((d["aspect"] < 1).float().mean() - 0.5).abs() < 0.05  # log-uniform: symmetric
    # side fractions: never a zoom out, never below sqrt(area_min / aspect_max)
    for side in ("side_x", "side_y"):
        assert d[side].max() <= 1.0
        assert d[side].min() >= (lo / a) ** 0.5 - 1e-6
        assert d[side].min() < (lo / a) ** 0.5 + 0.02
    unclamped = (d["side_x"] < 1) & (d["side_y"] < 1)
    kept = (d["side_x"] * d["side_y"])[unclamped]
    assert torch.allclose(kept, d["area"][unclamped], atol=1e-5)  # the area drawn is kept
    # the crop is a real crop, not the identity: every image loses some of its area or aspect
    assert (d["side_x"] * d["side_y"] < 1 - 1e-4).float().mean() > 0.98
    # margins: about MARGIN_P of the images, depth and lift in range, 0 elsewhere
    on = d["lift_left"] > 0
    assert ((on.float().mean() - aug.MARGIN_P).abs() < 0.03)
    assert torch.equal(on, d["lift_right"] > 0)
    for side in ("left", "right"):
        lift, depth = d[f"lift_{side}"], d[f"depth_{side}"]
        assert lift.min() >= 0 and lift.max() <= aug.MARGIN_LIFT
        assert lift.max() > 0.95 * aug.MARGIN_LIFT
        assert depth.min() >= aug.MARGIN_DEPTH[0] and depth.max() <= aug.MARGIN_DEPTH[1]
    assert not torch.equal(d["lift_left"], d["lift_right"])  # each side its own draw


def test_framing_repeats_for_a_seed_and_differs_from_intensity():
    x = smooth_batch(8, h=40, w=40)
    a = augment_batch(x, "framing", gen(5))
    assert torch.equal(a, augment_batch(x, "framing", gen(5)))
    assert not torch.equal(a, augment_batch(x, "framing", gen(6)))
    assert not torch.equal(a, augment_batch(x, "intensity", gen(5)))


def framing_fixed(monkeypatch, affine: list[float], frame: list[float]) -> None:
    """Every image gets the same draws: the 9 affine rows, then the framing (or scale) rows."""
    calls = iter([affine, frame])

    def fake(n, generator, device, low=0.0, high=1.0):
        values = next(calls)
        return torch.tensor(values, dtype=torch.float32).repeat_interleave(n // len(values))
    monkeypatch.setattr(aug, "_uniform", fake)
    monkeypatch.setattr(aug, "_film", lambda out, generator, wide=False: out)  # geometry only


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 24, 40)])
def test_framing_full_area_square_centred_unlit_is_the_identity(monkeypatch, shape):
    x = smooth_batch(*shape)
    framing_fixed(monkeypatch, [0.5] * 9, [1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(augment_batch(x, "framing"), x, atol=1e-5)


def test_framing_crop_is_the_region_it_says(monkeypatch):
    """Area 0.64, square, pushed to the top-left corner: the output is that 80% crop of the
    image scaled up (no rotation, flip, jitter or margins)."""
    h = w = 40
    x = smooth_batch(1, h=h, w=w)
    u_area = (0.64 - aug.CROP_AREA[0]) / (aug.CROP_AREA[1] - aug.CROP_AREA[0])
    shift_to_corner = (0.1 / (0.1 + 0.05) * -1 + 1) / 2  # tx = -(1-s)/2 w: the left edge
    framing_fixed(monkeypatch, [0.5, shift_to_corner, shift_to_corner, 0.5, 0.5, 0.5, 0.8,
                                0.5, 0.5], [u_area, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0])
    out = augment_batch(x, "framing")
    crop = x[..., :32, :32]  # 80% of each side, from the top-left corner
    ref = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear",
                                          align_corners=False)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # edges: sampling differs
    assert (out - ref)[inner].abs().max() < 0.03
    assert (out - x).abs().max() > 0.1


def test_framing_brightens_the_lateral_margins_only(monkeypatch):
    x = torch.full((1, 1, 32, 40), 0.1)  # dark everywhere
    framing_fixed(monkeypatch, [0.5] * 9, [1.0, 0.5, 0.0, 1.0, 0.0, 1.0, 0.5])
    out = augment_batch(x, "framing")[0, 0]
    lift = (out - 0.1) / 0.9  # share of the way to white
    left_depth = aug.MARGIN_DEPTH[1] * 40  # 10 px
    right_depth = aug.MARGIN_DEPTH[0] * 40  # 3.2 px
    assert torch.allclose(lift[:, 0], torch.full((32,), aug.MARGIN_LIFT * (1 - 0.5 / left_depth)),
                          atol=1e-5)
    assert torch.allclose(lift[:, -1], torch.full((32,), aug.MARGIN_LIFT / 2 *
                                                  (1 - 0.5 / right_depth)), atol=1e-5)
    assert (lift[:, 10:36] == 0).all()  # the middle untouched
    assert (lift[0, :10].diff() < 0).all()  # fading inwards
    assert torch.equal(out[0], out[-1])  # the same for every row


def test_framing_keeps_range_and_varies_the_margins_of_a_real_looking_batch():
    x = smooth_batch(64, h=48, w=48)
    x[..., :, :6] = 0.02  # dark lateral margins, as beside a child's chest
    x[..., :, -6:] = 0.02
    out = augment_batch(x, "framing", gen(0))
    assert out.min() >= 0 and out.max() <= 1
    margin = torch.cat([out[..., :, :4], out[..., :, -4:]], -1).mean(dim=(1, 2, 3))
    assert margin.min() < 0.1 and margin.max() > 0.3  # some stay dark, some do not


# -- "scale" ----------------------------------------------------------------------------------


def test_scale_draws_cover_both_directions_within_their_ranges():
    zx, zy = aug.scale_draws(torch.rand(2, 4000, generator=gen(0)))
    zoom, aspect = (zx * zy).sqrt(), zx / zy
    s, a = aug.SCALE, aug.SCALE_ASPECT
    assert zoom.min() >= 1 / s - 1e-5 and zoom.max() <= s + 1e-5
    assert zoom.min() < 1 / s + 0.01 and zoom.max() > s - 0.01  # the whole range
    assert ((zoom < 1).float().mean() - 0.5).abs() < 0.05  # in as often as out (log-uniform)
    assert aspect.min() >= 1 / a - 1e-5 and aspect.max() <= a + 1e-5
    assert aspect.min() < 1 / a + 0.005 and aspect.max() > a - 0.005
    # zooming in keeps at least 1 / (SCALE * sqrt(ASPECT)) of each side: the lungs stay in view
    assert min(zx.min(), zy.min()) >= 1 / (s * a ** 0.5) - 1e-5


def scale_fixed(monkeypatch, affine: list[float], zoom: float, aspect: float = 1.0) -> None:
    """Every image gets the same draws: the 9 affine rows, then this zoom and aspect."""
    framing_fixed(monkeypatch, affine, [(math.log(zoom) / math.log(aug.SCALE) + 1) / 2,
                                        (math.log(aspect) / math.log(aug.SCALE_ASPECT) + 1) / 2])


@pytest.mark.parametrize("shape", [(2, 1, 32, 32), (2, 3, 24, 40)])
def test_scale_one_centred_is_the_identity(monkeypatch, shape):
    x = smooth_batch(*shape)
    scale_fixed(monkeypatch, [0.5] * 9, zoom=1.0)
    assert torch.allclose(augment_batch(x, "scale"), x, atol=1e-5)


def test_scale_zooming_out_shrinks_the_film_into_a_black_border(monkeypatch):
    """Zoom 1.25 (output -> input): the image shrinks to 80% of each side, centred, and the
    10% it uncovers on every side is black (a letterbox, as the stress test's border)."""
    h = w = 40
    x = smooth_batch(1, h=h, w=w) * 0.8 + 0.2  # nothing black inside
    scale_fixed(monkeypatch, [0.5] * 9, zoom=aug.SCALE)
    out = augment_batch(x, "scale")
    assert (out[..., :3, :] == 0).all() and (out[..., -3:, :] == 0).all()
    assert (out[..., :, :3] == 0).all() and (out[..., :, -3:] == 0).all()
    small = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear",
                                            align_corners=False)
    assert (out[..., 6:34, 6:34] - small[..., 2:30, 2:30]).abs().max() < 0.05
    assert (out[..., 5:35, 5:35] > 0.15).all()  # the film itself stays


def test_scale_zooming_in_is_the_central_crop(monkeypatch):
    h = w = 40
    x = smooth_batch(1, h=h, w=w)
    scale_fixed(monkeypatch, [0.5] * 9, zoom=0.8)
    out = augment_batch(x, "scale")
    ref = torch.nn.functional.interpolate(x[..., 4:36, 4:36], size=(h, w), mode="bilinear",
                                          align_corners=False)
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (out - ref)[inner].abs().max() < 0.03
    assert out.min() > 0 or x.min() == 0  # nothing uncovered when zooming in


def test_scale_varies_framing_of_a_real_batch_in_both_directions():
    """Real films: some come out letterboxed (black rim), some zoomed in (rim from inside the
    film), and the policy repeats for a seed and differs from "intensity"."""
    from PIL import Image

    root = Path(__file__).resolve().parents[2] / "src" / "cxrlab" / "demo_data"
    files = sorted(root.rglob("*.jp*g"))[:24]
    assert len(files) == 24
    x = torch.stack([torch.from_numpy(np.asarray(
        Image.open(f).convert("L").resize((64, 64)), dtype=np.float32) / 255)[None]
        for f in files])
    a = augment_batch(x, "scale", gen(1))
    assert torch.equal(a, augment_batch(x, "scale", gen(1)))
    assert not torch.equal(a, augment_batch(x, "intensity", gen(1)))
    rim = torch.cat([a[..., :, :2], a[..., :, -2:]], -1).amax(dim=(1, 2, 3))
    assert (rim < 0.05).any() and (rim > 0.2).any()
    assert a.min() >= 0 and a.max() <= 1


# -- "intake" (the default) --------------------------------------------------------------------


def test_intake_gives_half_the_images_scale_and_the_rest_intensity(monkeypatch):
    """Per image, "intake"'s warp is exactly "intensity"'s or "scale"'s (same seed, film off):
    about half each, so a batch keeps the training intake's framings beside zoomed and
    letterboxed ones."""
    monkeypatch.setattr(aug, "_film", lambda out, generator, wide=False: out)
    x = smooth_batch(64, h=40, w=40) * 0.8 + 0.2
    g = augment_batch(x, "intake", gen(1))
    assert torch.equal(g, augment_batch(x, "intake", gen(1)))
    as_intensity = [torch.equal(a, b) for a, b in zip(g, augment_batch(x, "intensity", gen(1)),
                                                       strict=True)]
    as_scale = [torch.allclose(a, b, atol=1e-6)
                for a, b in zip(g, augment_batch(x, "scale", gen(1)), strict=True)]
    assert all(i != s for i, s in zip(as_intensity, as_scale, strict=True))
    assert 20 <= sum(as_scale) <= 44  # p = 0.5 each: 32 expected
    black = [bool((img == 0).any()) for img in g]  # only a scale draw uncovers black
    assert any(black) and not any(b for b, s in zip(black, as_scale, strict=True) if not s)


def test_intake_film_blurs_and_adds_noise_over_wider_ranges(monkeypatch):
    """"intake"'s film: a third of the images blurred up to sigma 2 px (intensity: a quarter,
    1.2 px) and noise up to 16 grey levels (8)."""
    monkeypatch.setattr(aug, "GAMMA", 1.0)
    monkeypatch.setattr(aug, "JPEG_P", 0.0)
    x = torch.zeros(300, 1, 32, 32)
    x[..., :, 16:] = 1.0
    x = x * 0.6 + 0.2
    edge = lambda t: (t[..., 1:] - t[..., :-1]).abs().amax(dim=(1, 2, 3))  # noqa: E731
    monkeypatch.setattr(aug, "NOISE_P", 0.0)
    for wide, share, weakest in ((False, 1 / 4, 0.6 * 0.32), (True, 1 / 3, 0.6 * 0.20)):
        out = aug._film(x.clone(), gen(0), wide=wide)
        blurred = edge(out) < 0.999 * edge(x)
        assert abs(blurred.float().mean().item() - share) < 0.07
        # the flattest edge: a step of 0.6 under the largest sigma (erf steps of 1 pixel)
        assert abs(edge(out).min().item() - weakest) < 0.03
    monkeypatch.setattr(aug, "NOISE_P", 1.0)
    monkeypatch.setattr(aug, "BLUR_P", 0.0)
    monkeypatch.setattr(aug, "WIDE_BLUR_P", 0.0)
    for wide, top in ((False, 8 / 255), (True, 16 / 255)):
        sd = (aug._film(x.clone(), gen(1), wide=wide) - x).std(dim=(1, 2, 3))
        assert sd.max() <= top * 1.1 and sd.max() > top * 0.9


def test_intake_repeats_and_differs_from_its_parents():
    x = smooth_batch(8, h=40, w=40)
    a = augment_batch(x, "intake", gen(2))
    assert torch.equal(a, augment_batch(x, "intake", gen(2)))
    assert not torch.equal(a, augment_batch(x, "intake", gen(3)))
    for parent in ("intensity", "scale"):
        assert not torch.equal(a, augment_batch(x, parent, gen(2)))
