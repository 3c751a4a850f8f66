"""Decode one image file into uint8 CHW at the target size; every odd format ends here.

16-bit grey (PNG mode I;16 / I) is scaled by its bit depth, not stretched per image: the
depth is the image maximum's bit length rounded up to an even number (min 8), so 12-bit
X-rays stored in 16-bit PNGs fill 0..255 (x 255/4095) and full-range 16-bit is divided by 257,
while two images of the same depth keep their relative brightness. Alpha is composited on
black (X-ray background). channels=1 is ITU-R 601 luminance, channels=3 RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from cxrlab.errors import CxrlabError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe
MIN_SIDE = 16
GREY_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _wide_to_8bit(im: Image.Image) -> Image.Image:
    a = np.asarray(im)
    if im.mode == "F":  # float data has no bit depth: stretch its range
        a = a.astype(np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = (np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo)) if hi > lo else a * 0
        return Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    a = a.astype(np.int64).clip(0, None)
    bits = max(8, int(a.max()).bit_length())
    bits += bits % 2
    return Image.fromarray((a * 255 // ((1 << bits) - 1)).astype(np.uint8))


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in _WIDE_MODES:
        im = _wide_to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB" if im.mode not in ("1",) else "L")  # CMYK, YCbCr, P, LAB, ...
    return im.convert("L" if channels == 1 else "RGB")


def read_image(path: Path | str, channels: int, size: int | None = None) -> np.ndarray:
    """uint8 (channels, H, W); resized (aspect not kept) with antialiasing when size given.

    JPEGs much larger than `size` are decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`), which
    is several times faster and loses nothing the antialiased resize would have kept.
    """
    path = Path(path)
    if channels not in (1, 3):
        raise CxrlabError(f"--channels {channels}: must be 1 or 3")
    try:
        if path.stat().st_size == 0:
            raise CxrlabError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as im:
            w, h = im.size
            if min(w, h) < MIN_SIDE:
                raise CxrlabError(f"{path}: image is {w}x{h} px, smaller than {MIN_SIDE} px")
            # Our own check, not catch_warnings (not thread-safe): PIL only warns up to 2x this.
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                raise CxrlabError(f"{path}: image is {w}x{h} px, over the decompression-bomb "
                                  f"limit of {Image.MAX_IMAGE_PIXELS} pixels")
            if size is not None and im.format == "JPEG":
                im.draft("L" if channels == 1 else "RGB", (size, size))
            im.load()  # decode now, so truncation raises here
            out = _to_mode(im, channels)
            if size is not None and out.size != (size, size):
                out = out.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            a = np.asarray(out, dtype=np.uint8)
    except CxrlabError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CxrlabError(f"{path}: image too large (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise CxrlabError(f"{path}: not an image (or a format cxrlab cannot read)") from None
    except FileNotFoundError:
        raise CxrlabError(f"{path}: no such file") from None
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CxrlabError(f"{path}: unreadable image ({reason})") from None
    except (ValueError, SyntaxError, TypeError, IndexError, EOFError) as e:
        # PIL's plugins raise these on corrupt headers and chunks
        raise CxrlabError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    return a[None].copy() if a.ndim == 2 else a.transpose(2, 0, 1).copy()


def _is_grey(path: Path) -> bool | None:
    try:
        with Image.open(path) as im:
            if im.mode in GREY_MODES or im.mode == "LA":
                return True
            im.draft("RGB", (64, 64))
            a = np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.int16)
    except Exception:  # a bad file gets no vote; load_images reports it properly
        return None
    return int(np.abs(a - a.mean(axis=2, keepdims=True)).max()) <= 8


def guess_channels(paths: list[Path], sample: int = 24) -> int:
    """1 when the images are grey (X-rays, even when stored as RGB), else 3."""
    paths = list(paths)
    if not paths:
        return 1
    step = max(1, len(paths) // sample)
    votes = [_is_grey(Path(p)) for p in paths[::step][:sample]]
    votes = [v for v in votes if v is not None]
    return 1 if not votes or all(votes) else 3
