"""cxrlab.data.images: every pixel format to uint8 CHW, and every way a file can be bad."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from cxrlab.data.images import guess_channels, read_image
from cxrlab.errors import CxrlabError

GRADIENT = np.tile((np.arange(64) * 4).astype(np.uint8), (64, 1))  # dark left, bright right


def _save(path, im: Image.Image, **kw):
    im.save(path, **kw)
    return path


def _left_right(a):
    return float(a[..., :8].mean()), float(a[..., -8:].mean())


@pytest.mark.parametrize("name, make", [
    ("l.png", lambda: Image.fromarray(GRADIENT)),
    ("rgb.jpg", lambda: Image.fromarray(np.stack([GRADIENT] * 3, -1))),
    ("rgba.png", lambda: Image.fromarray(np.stack([GRADIENT] * 3 + [GRADIENT * 0 + 255], -1))),
    ("la.png", lambda: Image.fromarray(GRADIENT).convert("LA")),
    ("p.png", lambda: Image.fromarray(np.stack([GRADIENT] * 3, -1)).convert("P")),
    ("cmyk.jpg", lambda: Image.fromarray(np.stack([GRADIENT] * 3, -1)).convert("CMYK")),
    ("bits.png", lambda: Image.fromarray(GRADIENT > 127)),  # mode "1"
    ("i16.png", lambda: Image.fromarray(GRADIENT.astype(np.uint16) * 257)),
])
def test_formats_decode_to_chw_uint8(tmp_path, name, make):
    p = _save(tmp_path / name, make(), **({"quality": 95} if name.endswith("jpg") else {}))
    for channels in (1, 3):
        a = read_image(p, channels, 32)
        assert a.shape == (channels, 32, 32) and a.dtype == np.uint8 and a.flags.writeable
        left, right = _left_right(a)
        assert right > left + 150, (name, left, right)  # the gradient survives, not inverted
    full = read_image(p, 1, None)
    assert full.shape == (1, 64, 64)
    if name in ("l.png", "i16.png"):  # lossless: exact values
        assert np.array_equal(full[0], GRADIENT)


def test_rgb_channels_and_luminance(tmp_path):
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    p = _save(tmp_path / "c.png", Image.fromarray(rgb))
    a3 = read_image(p, 3, None)
    assert a3[:, 0, 0].tolist() == [200, 100, 50]
    assert read_image(p, 1, None)[0, 0, 0] == round(200 * .299 + 100 * .587 + 50 * .114)
    grey = _save(tmp_path / "g.png", Image.fromarray(GRADIENT))
    g3 = read_image(grey, 3, None)
    assert np.array_equal(g3[0], g3[1]) and np.array_equal(g3[0], g3[2])


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.full((32, 32, 4), 255, np.uint8)
    rgba[:, :16, 3] = 0  # left half transparent white
    p = _save(tmp_path / "a.png", Image.fromarray(rgba))
    a = read_image(p, 1, None)[0]
    assert a[:, :16].max() == 0 and a[:, 16:].min() == 255


def test_palette_with_transparency(tmp_path):
    im = Image.fromarray(np.where(GRADIENT > 127, 1, 0).astype(np.uint8), mode="P")
    im.putpalette([255, 255, 255, 200, 200, 200] + [0] * 762)
    im.info["transparency"] = 0  # index 0 (white) transparent -> black
    p = _save(tmp_path / "pt.png", im, transparency=0)
    a = read_image(p, 1, None)[0]
    assert a[:, :8].max() == 0 and a[:, -8:].min() == 200


@pytest.mark.parametrize("scale, bits", [(1, 8), (16, 12), (257, 16)])
def test_16bit_scaled_by_bit_depth(tmp_path, scale, bits):
    """Full 16-bit range / 257; 12-bit data in a 16-bit PNG fills 0..255, not 0..15."""
    p = tmp_path / f"x{bits}.png"
    values = GRADIENT.astype(np.uint16) * scale
    Image.fromarray(values).save(p)
    assert Image.open(p).mode.startswith("I")
    a = read_image(p, 1, None)[0].astype(int)
    expected = values.astype(np.int64) * 255 // (2**bits - 1)
    assert np.abs(a - expected).max() <= 1 and a.max() >= 250


def test_16bit_keeps_brightness_between_images_of_one_depth(tmp_path):
    bright, dim = tmp_path / "b.png", tmp_path / "d.png"
    Image.fromarray(np.full((32, 32), 4000, np.uint16)).save(bright)
    Image.fromarray(np.full((32, 32), 2100, np.uint16)).save(dim)  # also 12-bit: no stretch
    assert read_image(bright, 1, None).max() == 249 and read_image(dim, 1, None).max() == 130


def test_resize_antialiases_and_draft_matches_full_decode(tmp_path):
    yy, xx = np.mgrid[:1200, :1000]
    smooth = (127 + 100 * np.sin(xx / 90) * np.cos(yy / 70)).astype(np.uint8)
    p = _save(tmp_path / "big.jpg", Image.fromarray(smooth), quality=95)
    fast = read_image(p, 1, 64)[0].astype(int)  # decoded at 1/8 scale, then resized
    ref = np.asarray(Image.fromarray(smooth).resize((64, 64), Image.Resampling.LANCZOS))
    assert fast.shape == (64, 64) and np.abs(fast - ref.astype(int)).mean() < 3
    stripes = np.zeros((64, 64), np.uint8)
    stripes[:, ::2] = 255  # 1-px stripes average to grey with antialiasing, never alias
    q = _save(tmp_path / "stripes.png", Image.fromarray(stripes))
    small = read_image(q, 1, 16)[0]
    assert 100 < small.mean() < 155 and small.std() < 20


def test_png_named_jpg_is_read_by_content(tmp_path):
    p = _save(tmp_path / "really_png.jpg", Image.fromarray(np.full((20, 20), 200, np.uint8)),
              format="PNG")
    assert read_image(p, 1, 16).mean() == pytest.approx(200, abs=1)


def _jpeg_bytes(size=64):
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size, size), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name, content, needle", [
    ("zero.png", b"", "empty file"),
    ("text.png", b"hello, this is not a PNG", "not an image"),
    ("trunc.jpeg", _jpeg_bytes()[: len(_jpeg_bytes()) // 2], "truncated"),
    ("noeoi.jpeg", _jpeg_bytes()[:-2], "unreadable image"),
    ("trunc.png", _png_bytes()[: len(_png_bytes()) // 2], "unreadable image"),
])
def test_bad_files(tmp_path, name, content, needle):
    p = tmp_path / name
    p.write_bytes(content)
    for size in (32, None):
        with pytest.raises(CxrlabError, match=needle) as e:
            read_image(p, 1, size)
        assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("shape", [(8, 8), (8, 40), (40, 15)])
def test_too_small(tmp_path, shape):
    p = _save(tmp_path / "small.png", Image.fromarray(np.zeros(shape, np.uint8)))
    with pytest.raises(CxrlabError, match=f"small.png: image is {shape[1]}x{shape[0]} px, "
                                          "smaller than 16 px"):
        read_image(p, 1, 32)


def test_missing_file_and_bad_channels(tmp_path):
    with pytest.raises(CxrlabError, match="gone.png: no such file"):
        read_image(tmp_path / "gone.png", 1, 32)
    p = _save(tmp_path / "g.png", Image.fromarray(GRADIENT))
    with pytest.raises(CxrlabError, match="channels 2"):
        read_image(p, 2, 32)


@pytest.mark.parametrize("limit", [3000, 1500])  # PIL warns above 1x, raises above 2x
def test_decompression_bomb(tmp_path, monkeypatch, limit):
    p = _save(tmp_path / "bomb.png", Image.fromarray(GRADIENT))  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(CxrlabError, match="bomb.png: .*decompression-bomb"):
            read_image(p, 1, 32)
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a user's -W error
        with pytest.raises(CxrlabError, match="bomb.png: .*decompression-bomb"):
            read_image(p, 1, 32)


def test_guess_channels(tmp_path):
    grey_rgb = _save(tmp_path / "g.jpg", Image.fromarray(np.stack([GRADIENT] * 3, -1)))
    p16 = _save(tmp_path / "x.png", Image.fromarray(GRADIENT.astype(np.uint16) * 16))
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 255
    red = _save(tmp_path / "red.png", Image.fromarray(colour))
    broken = tmp_path / "broken.png"
    broken.write_text("nope")
    assert guess_channels([grey_rgb, p16, broken]) == 1
    assert guess_channels([grey_rgb, red]) == 3
    assert guess_channels([]) == 1


def test_real_kermany_jpegs(shared_data):
    paths = sorted((shared_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:4]
    for p in paths:
        a = read_image(p, 1, 64)
        assert a.shape == (1, 64, 64) and a.std() > 10
        assert read_image(p, 3, None).shape == (3, 224, 224)
    assert guess_channels(paths) == 1  # X-rays stored as RGB JPEGs are grey


# -- 16-bit: one bit depth for a dataset and every image its run reads later -----------------

def _film(path, peak: int, level: int = 2000, sbit: int | None = None, k: int = 0):
    """A 16-bit film of a 12-bit detector: mostly `level`, a corner at `peak` (and a mark at
    column 8 + k in the top row, so that no two films are copies)."""
    from PIL import PngImagePlugin

    a = np.full((32, 32), level, np.uint16)
    a[:4, :4] = peak
    a[0, 8 + k] = peak
    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, pnginfo=info)
    return path


def test_16bit_films_of_one_dataset_share_one_scale_in_training_and_after(tmp_path):
    """Maxima 4000 and 4100 were read as 12- and 14-bit (4x apart); now the dataset's sampled
    maximum sets one depth (4100 -> 14 bits), kept in run.json, and a path, an upload and a
    uint16 array are read at predict time exactly as the training cache read them."""
    import cxrlab
    from cxrlab.config import RunConfig
    from cxrlab.data.prepared import prepare_data
    from cxrlab.deploy.serve import Inference

    root = tmp_path / "films"
    films = [_film(root / c / f"{c}{i}.png", 4000 if i % 2 else 4100, k=6 * j + i)
             for j, c in enumerate(("NORMAL", "PNEUMONIA")) for i in range(6)]
    level = 2000 * 255 // (2**14 - 1)
    data = prepare_data(RunConfig(data=str(root), image_size=32))
    assert (data.images[:, 0, 8:, 8:] == level).all()  # v -> one value in every film
    assert sorted({int(x) for x in data.images[:, 0, 0, 0]}) == [62, 63]  # 4000, 4100
    assert data.bit_depth.data == 14

    run = cxrlab.train(root, tmp_path / "run", model="cnn", image_size=32, epochs=1,
                       augment="none", batch_size=8)
    assert json.loads((run.path / "run.json").read_text())["data_bit_depth"] == 14
    assert run.config.bit_depth is None
    dim, bright = films[0], films[1]
    for f in (dim, bright):
        want = data.images[films.index(f)]
        assert np.array_equal(run._pixels(f), want)
        assert np.array_equal(run._pixels(np.asarray(Image.open(f))), want)
        assert np.array_equal(Inference(run.path).decode(f.read_bytes(), f.name), want)


def test_bit_depth_option_is_recorded_and_used_by_the_run(tmp_path, capsys, monkeypatch):
    from tests.test_cli import assert_user_error, run_cli

    root = tmp_path / "films"
    for j, c in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(6):
            _film(root / c / f"{c}{i}.png", 4000 if i % 2 else 4100, k=6 * j + i)
    base = ["train", root, "--model", "cnn", "--image-size", "32", "--epochs", "1",
            "--augment", "none", "--quiet"]
    code, _, err = run_cli([*base, "--out", tmp_path / "x", "--bit-depth", "7"], capsys,
                           monkeypatch)
    assert_user_error(code, err, "--bit-depth 7")
    code, _, err = run_cli([*base, "--out", tmp_path / "r", "--bit-depth", "12"], capsys,
                           monkeypatch)
    assert code == 0, err
    import cxrlab

    run = cxrlab.load(tmp_path / "r")
    assert run.config.bit_depth == 12
    assert json.loads((run.path / "run.json").read_text())["data_bit_depth"] is None
    film = root / "NORMAL" / "NORMAL0.png"  # peak 4100: over 12 bits, so 255
    got = run._pixels(film)[0]
    assert got[10, 10] == 2000 * 255 // 4095 and got[0, 0] == 255


def test_png_sbit_declares_the_depth_and_the_option_overrides_it(tmp_path):
    from cxrlab.data.cache import load_images
    from cxrlab.data.images import BitDepth, convert_image, png_sbit

    declared = _film(tmp_path / "s.png", 300, level=200, sbit=12)
    with declared.open("rb") as f:
        assert png_sbit(f) == 12 and f.tell() == 0
    plain = _film(tmp_path / "p.png", 300, level=200)
    with plain.open("rb") as f:
        assert png_sbit(f) is None
    assert read_image(declared, 1)[0, 0, 0] == 300 * 255 // 4095  # not 10-bit from its max
    assert read_image(declared, 1, None, BitDepth(data=14))[0, 0, 0] == 300 * 255 // 4095
    assert read_image(declared, 1, None, BitDepth(fixed=10))[0, 0, 0] == 300 * 255 // 1023
    assert read_image(plain, 1, None, BitDepth(data=12))[0, 0, 0] == 300 * 255 // 4095
    arr = np.asarray(Image.open(plain))
    assert np.array_equal(convert_image(arr, 1, None, bit_depth=BitDepth(data=12)),
                          read_image(plain, 1, None, BitDepth(data=12)))
    assert read_image(plain, 1, None, BitDepth(fixed=8))[0, 0, 0] == 255  # over 2^8 - 1
    # the rule is part of the cache key: other rule, other pixels
    d = tmp_path / "cache"
    a, _ = load_images([plain], 32, 1, cache_dir=d, bit_depth=BitDepth(data=12))
    b, _ = load_images([plain], 32, 1, cache_dir=d, bit_depth=BitDepth(data=16))
    assert a[0, 0, 10, 10] == 200 * 255 // 4095 and b[0, 0, 10, 10] == 200 * 255 // 65535


def test_bit_depth_option_replaces_dicom_bits_stored(tmp_path):
    from cxrlab.data.images import BitDepth
    from tests.data.test_dicom import ramp12, write_dicom

    as12 = read_image(write_dicom(tmp_path / "a.dcm", ramp12(), bits_stored=12), 1)
    as16 = write_dicom(tmp_path / "b.dcm", ramp12(), bits_stored=16)
    assert read_image(as16, 1).max() < 20  # BitsStored 16: 12-bit data is dim
    assert np.array_equal(read_image(as16, 1, None, BitDepth(fixed=12)), as12)
    assert np.array_equal(read_image(as16, 1, None, BitDepth(data=12)), read_image(as16, 1))
