"""Decode one image file into uint8 CHW at the target size; every odd format ends here."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from cxrlab.errors import CxrlabError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe
MIN_SIDE = 16


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit X-rays often use 10-14 bits: stretch the used range, not the type's range.
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba)
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    if channels == 1:
        return im.convert("L")
    return im.convert("RGB")


def read_image(path: Path | str, channels: int, size: int | None = None) -> np.ndarray:
    """uint8 (channels, H, W); resized (aspect not kept) with antialiasing when size given."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CxrlabError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if min(w, h) < MIN_SIDE:
                    raise CxrlabError(f"{path}: image is {w}x{h} px, smaller than {MIN_SIDE} px")
                if size is not None and im.format == "JPEG":
                    im.draft("L" if channels == 1 else "RGB", (size, size))
                im.load()
                im = _to_mode(im, channels)
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR, reducing_gap=2.0)
                a = np.asarray(im, dtype=np.uint8)
    except CxrlabError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CxrlabError(f"{path}: image too large (decompression bomb guard)") from None
    except UnidentifiedImageError:
        raise CxrlabError(f"{path}: not an image (or a format cxrlab cannot read)") from None
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CxrlabError(f"{path}: unreadable image ({reason})") from None
    except (ValueError, SyntaxError) as e:
        raise CxrlabError(f"{path}: unreadable image ({e})") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1).copy()


def _is_grey(path: Path) -> bool | None:
    try:
        with Image.open(path) as im:
            if im.mode in ("L", "LA", "1", "I;16", "I;16B", "I;16L", "I", "F"):
                return True
            im.draft("RGB", (64, 64))
            a = np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.int16)
    except Exception:
        return None
    return int(np.abs(a - a.mean(axis=2, keepdims=True)).max()) <= 8


def guess_channels(paths: list[Path], sample: int = 24) -> int:
    """1 when the images are grey (X-rays, even when stored as RGB), else 3."""
    if not paths:
        return 1
    step = max(1, len(paths) // sample)
    votes = [_is_grey(Path(p)) for p in list(paths)[::step][:sample]]
    votes = [v for v in votes if v is not None]
    return 1 if not votes or all(votes) else 3
