"""Decode one image file into uint8 CHW at the target size; every odd format ends here.

16-bit grey (PNG mode I;16 / I, uint16 arrays) is scaled by a bit depth N, v -> v x 255 //
(2^N - 1), never stretched per image, and N is the same for every image of a dataset (a
`BitDepth`): the run's --bit-depth when given; else the depth the file declares (a PNG's sBIT
chunk); else the training data's depth, the bit length of the maximum over a sample of its
16-bit images that declare none, rounded up to an even number (min 8), found once when a run's
data is prepared and kept in run.json, so predict, evaluate, serve and the API read a film as
training did. Two films of one 12-bit detector (maxima 4000 and 4100, once read as 12- and
14-bit: 4x apart) now share one depth and keep their relative brightness. Only a read outside
a run (no dataset) falls back to the image's own maximum. Values above 2^N - 1 become 255.
Alpha is composited on black (X-ray background). channels=1 is ITU-R 601 luminance,
channels=3 RGB.

DICOM (`.dcm`/`.dicom`, or any file with the `DICM` magic) goes through pydicom: the modality
LUT (rescale) and the VOI LUT or window centre/width are applied when the file has them, and
their output range becomes 0..255; without a window, 0..255 is what the modality LUT makes of
the whole stored range (0..2^BitsStored-1, or signed when PixelRepresentation is 1), as a viewer
shows it, so films from one detector keep their relative brightness (BitsStored is the file's
declared depth, as sBIT is a PNG's; --bit-depth replaces both); MONOCHROME1 (white = low
values) is inverted so bone is bright as in every other format; multi-frame files are refused
(which frame would be the X-ray?). Compressed transfer syntaxes decode through permissively
licensed packages cxrlab depends on (dicom_codecs.py says which decodes what).
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from cxrlab.data import dicom_codecs
from cxrlab.errors import CxrlabError

# Imported inside the functions that need them: pydicom (heavy or
# optional; importing them here would slow every command that imports this module).

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey stripe
MIN_SIDE = 16
GREY_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
DICOM_EXTENSIONS = (".dcm", ".dicom")


def has_dicom_magic(head: bytes) -> bool:
    """The DICOM file format: a 128-byte preamble, then b"DICM"."""
    return len(head) >= 132 and head[128:132] == b"DICM"


def is_dicom(path: Path | str) -> bool:
    path = Path(path)
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    try:
        with path.open("rb") as f:
            return has_dicom_magic(f.read(132))
    except OSError:
        return False


MIN_BITS = 8  # the least depth a maximum implies (--bit-depth takes 8..16: RunConfig)


def bits_of_max(value: int) -> int:
    """The depth a maximum implies: its bit length rounded up to an even number, min 8 (10-,
    12-, 14- and 16-bit detectors; the rounding leaves room above a sampled maximum)."""
    bits = max(MIN_BITS, int(value).bit_length())
    return bits + bits % 2


@dataclass(frozen=True)
class BitDepth:
    """Which bit depth scales an image's integer pixels wider than 8 bits to 0..255: one rule
    for a dataset and for every image its run reads later (the module docstring's rule).

    `fixed`: --bit-depth, for every image whatever its file declares. `data`: the training
    data's depth, for images that declare none. Both None: a read outside any run.
    """

    fixed: int | None = None
    data: int | None = None

    def bits(self, declared: int | None, a: np.ndarray) -> int:
        if self.fixed is not None:
            return self.fixed
        if declared is not None:
            return declared
        if self.data is not None:
            return self.data
        return bits_of_max(a.max()) if a.size else MIN_BITS

    def key(self) -> str:
        """For cache keys: images decoded under another rule are other images."""
        return f"bits={self.fixed},{self.data}"


NO_RUN = BitDepth()


def _wide_to_8bit(im: Image.Image, depth: BitDepth, declared: int | None) -> Image.Image:
    a = np.asarray(im)
    if im.mode == "F":  # float data has no bit depth: stretch its range
        a = a.astype(np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = (np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo)) if hi > lo else a * 0
        return Image.fromarray(a.round().clip(0, 255).astype(np.uint8))
    return Image.fromarray(_depth_to_8bit(a, depth, declared))


def _depth_to_8bit(a: np.ndarray, depth: BitDepth = NO_RUN,
                   declared: int | None = None) -> np.ndarray:
    """Integer pixels scaled by the bit depth `depth` chooses (the module docstring's rule)."""
    a = a.astype(np.int64).clip(0, None)
    bits = depth.bits(declared, a)
    return (a * 255 // ((1 << bits) - 1)).clip(0, 255).astype(np.uint8)


def png_sbit(fp: BinaryIO) -> int | None:
    """The grey significant bits a PNG declares in its sBIT chunk (Pillow does not read it),
    or None: not a PNG, no sBIT (it comes before PLTE and IDAT), or a value outside 1..16.
    Leaves `fp` where it was."""
    pos = fp.tell()
    try:
        fp.seek(0)
        if fp.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = fp.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                data = fp.read(min(length, 4))
                return data[0] if data and 1 <= data[0] <= 16 else None
            if kind in (b"PLTE", b"IDAT", b"IEND"):
                return None
            fp.seek(length + 4, io.SEEK_CUR)  # the data and its CRC
    finally:
        fp.seek(pos)


def undeclared_max(path: Path | str) -> int | None:
    """The maximum of an integer image wider than 8 bits that declares no depth (no sBIT), the
    data a dataset's depth is found from; None for any other file (8-bit, DICOM, float,
    unreadable: reading it for training reports those)."""
    path = Path(path)
    try:
        if is_dicom(path):
            return None
        with path.open("rb") as f, Image.open(f) as im:
            if im.mode not in _WIDE_MODES or im.mode == "F":
                return None
            if im.format == "PNG" and png_sbit(f) is not None:
                return None
            im.load()
            a = np.asarray(im)
            return int(a.max()) if a.size else None
    except Exception:
        return None


def _to_mode(im: Image.Image, channels: int, depth: BitDepth = NO_RUN,
             declared: int | None = None) -> Image.Image:
    if im.mode in _WIDE_MODES:
        im = _wide_to_8bit(im, depth, declared)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
            im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB" if im.mode not in ("1",) else "L")  # CMYK, YCbCr, P, LAB, ...
    return im.convert("L" if channels == 1 else "RGB")


def read_image(path: Path | str, channels: int, size: int | None = None,
               bit_depth: BitDepth | None = None) -> np.ndarray:
    """uint8 (channels, H, W); resized (aspect not kept) with antialiasing when size given.
    `bit_depth`: the run's rule for 16-bit images (None: a read outside any run).

    JPEGs much larger than `size` are decoded at 1/2, 1/4 or 1/8 scale (`Image.draft`), which
    is several times faster and loses nothing the antialiased resize would have kept.
    """
    path = Path(path)
    if channels not in (1, 3):
        raise CxrlabError(f"--channels {channels}: must be 1 or 3")
    try:
        if path.stat().st_size == 0:
            raise CxrlabError(f"{path}: empty file (0 bytes)")
        with path.open("rb") as f:
            dicom = path.suffix.lower() in DICOM_EXTENSIONS or has_dicom_magic(f.read(132))
            f.seek(0)
            return _decode(f, str(path), channels, size, dicom=dicom, bit_depth=bit_depth)
    except FileNotFoundError:
        raise CxrlabError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CxrlabError(f"{path}: is a folder, not an image") from None
    except PermissionError:
        raise CxrlabError(f"{path}: permission denied") from None


def decode_image(data: bytes, channels: int, size: int | None = None,
                 name: str = "upload", max_pixels: int | None = None,
                 bit_depth: BitDepth | None = None) -> np.ndarray:
    """`read_image` for bytes in memory (uploads): nothing touches the disk. `max_pixels`
    lowers the decompression-bomb limit (a service decodes many images at once)."""
    if channels not in (1, 3):
        raise CxrlabError(f"--channels {channels}: must be 1 or 3")
    if not data:
        raise CxrlabError(f"{name}: empty file (0 bytes)")
    dicom = has_dicom_magic(data[:132]) or Path(name).suffix.lower() in DICOM_EXTENSIONS
    return _decode(io.BytesIO(data), name, channels, size, dicom=dicom, max_pixels=max_pixels,
                   bit_depth=bit_depth)


def _check_side(name: str, w: int, h: int, max_pixels: int | None = None) -> None:
    if min(w, h) < MIN_SIDE:
        raise CxrlabError(f"{name}: image is {w}x{h} px, smaller than {MIN_SIDE} px")
    # Our own check, not catch_warnings (not thread-safe): PIL only warns up to 2x this.
    limit = min(filter(None, (Image.MAX_IMAGE_PIXELS, max_pixels)), default=None)
    if limit and w * h > limit:
        raise CxrlabError(f"{name}: image is {w}x{h} px, over the decompression-bomb "
                          f"limit of {limit} pixels")


def _decode(fp: BinaryIO, name: str, channels: int, size: int | None,
            dicom: bool, max_pixels: int | None = None,
            bit_depth: BitDepth | None = None) -> np.ndarray:
    depth = bit_depth or NO_RUN
    try:
        if dicom:
            out = _to_mode(_dicom_image(fp, name, max_pixels, depth.fixed), channels)
        else:
            with Image.open(fp) as im:
                _check_side(name, *im.size, max_pixels)
                if size is not None and im.format == "JPEG":
                    im.draft("L" if channels == 1 else "RGB", (size, size))
                im.load()  # decode now, so truncation raises here
                declared = None
                if im.mode in _WIDE_MODES and im.format == "PNG":
                    declared = png_sbit(fp)
                out = _to_mode(im, channels, depth, declared)
        return _sized_chw(out, size)
    except CxrlabError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise CxrlabError(f"{name}: image too large (decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise CxrlabError(f"{name}: not an image (or a format cxrlab cannot read)") from None
    except OSError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CxrlabError(f"{name}: unreadable image ({reason})") from None
    except (ValueError, SyntaxError, TypeError, IndexError, EOFError) as e:
        # PIL's plugins raise these on corrupt headers and chunks
        raise CxrlabError(f"{name}: unreadable image ({type(e).__name__}: {e})") from None


def _sized_chw(im: Image.Image, size: int | None) -> np.ndarray:
    """An L or RGB image resized (when size given) -> uint8 (C, H, W)."""
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    a = np.asarray(im, dtype=np.uint8)
    return a[None].copy() if a.ndim == 2 else a.transpose(2, 0, 1).copy()


def convert_image(image: Image.Image | np.ndarray, channels: int, size: int | None = None,
                  name: str = "image", bit_depth: BitDepth | None = None) -> np.ndarray:
    """`read_image` for an image already in memory (the Python API): a PIL image, or a NumPy
    array H x W or H x W x C (C 1, 3 or 4), uint8 or uint16. The same mode conversion and
    resize as a file, so an array and the PNG it would be saved as give the same pixels
    (uint16 is scaled by the run's `bit_depth`, like a 16-bit PNG without sBIT)."""
    if channels not in (1, 3):
        raise CxrlabError(f"--channels {channels}: must be 1 or 3")
    if isinstance(image, Image.Image):
        im = image
    else:
        a = np.asarray(image)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
            raise CxrlabError(f"{name}: expected an array H x W or H x W x (1, 3 or 4), got "
                              f"shape {a.shape}")
        if a.dtype == np.uint16:
            a = _depth_to_8bit(a, bit_depth or NO_RUN)
        elif a.dtype != np.uint8:
            raise CxrlabError(f"{name}: expected uint8 or uint16 pixels, got {a.dtype}")
        im = Image.fromarray(np.ascontiguousarray(a))
    _check_side(name, *im.size)
    try:
        return _sized_chw(_to_mode(im, channels, bit_depth or NO_RUN), size)
    except (OSError, ValueError) as e:
        raise CxrlabError(f"{name}: cannot convert image ({e})") from None


# ---------------------------------------------------------------------------------------
# DICOM


def _read_dataset(fp: BinaryIO, name: str, header_only: bool = False):
    dicom_codecs.configure()
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        # force: raw DICOM without the 128-byte preamble still parses; a file that is not
        # DICOM at all then fails on the missing pixel data below.
        return pydicom.dcmread(fp, force=True, stop_before_pixels=header_only)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CxrlabError(f"{name}: unreadable DICOM file ({reason})") from None


def _dicom_image(fp: BinaryIO, name: str, max_pixels: int | None = None,
                 bits: int | None = None) -> Image.Image:
    """8-bit PIL image (L or RGB) of a single-frame DICOM, as its display would show it;
    `bits` (--bit-depth) replaces BitsStored."""
    ds = _read_dataset(fp, name)  # first: it sets pydicom up before pydicom is imported
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if "PixelData" not in ds:
        raise CxrlabError(f"{name}: DICOM file holds no image (no Pixel Data)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise CxrlabError(f"{name}: multi-frame DICOM ({frames} frames); cxrlab reads "
                          f"single-frame images only")
    _check_side(name, int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), max_pixels)
    try:
        arr = ds.pixel_array
    except Exception as e:  # corrupt or truncated pixel data, a syntax no plugin decodes
        raise CxrlabError(f"{name}: cannot decode the DICOM pixel data "
                          f"({_syntax(ds)}): {_decode_failure(e)}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        if arr.dtype != np.uint8:
            bits = bits if bits is not None else int(ds.get("BitsStored", 8) or 8)
            arr = (arr.astype(np.float64) * (255.0 / ((1 << bits) - 1))).round()
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8), mode="RGB")
    if arr.ndim != 2:
        raise CxrlabError(f"{name}: DICOM pixel data of shape {arr.shape} is not one image")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):  # PALETTE COLOR and friends
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        if rgb.dtype != np.uint8:
            rgb = rgb // 257
        return Image.fromarray(rgb.astype(np.uint8), mode="RGB")
    values = apply_modality_lut(arr, ds).astype(np.float64)
    lo, hi = _stored_range(arr, ds, bits)
    if ds.get("VOILUTSequence") or ("WindowCenter" in ds and "WindowWidth" in ds):
        # pydicom maps the window onto a fixed output range: find it from the extremes.
        with np.errstate(over="ignore"):
            values = apply_voi_lut(values, ds).astype(np.float64)
            if ds.get("VOILUTSequence"):
                lut = ds.VOILUTSequence[0].LUTData
                lut = (np.frombuffer(lut, "<u2") if isinstance(lut, bytes)
                       else np.asarray(lut)).astype(np.float64).ravel()
                lo, hi = float(lut.min()), float(lut.max())
            else:
                lo, hi = apply_voi_lut(np.array([-1e300, 1e300]), ds).astype(float).tolist()
    else:
        ends = apply_modality_lut(np.array([lo, hi]), ds).astype(np.float64)
        lo, hi = float(ends.min()), float(ends.max())
    scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
    out = scaled.round().clip(0, 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        out = 255 - out
    return Image.fromarray(out, mode="L")


def _syntax(ds) -> str:
    """The transfer syntax as a person and a search engine want it: name and UID."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        return "no transfer syntax in the file meta"
    return f"{ts.name}, {ts}" if ts.name != str(ts) else f"transfer syntax {ts}"


def _decode_failure(e: Exception) -> str:
    """pydicom's error on one line: "all plugins failed" is a header line, then one line per
    plugin ("pillow: ...", "cxrlab-gdcm: ..."); each plugin's reason is kept, less object
    reprs ("cannot identify image file <_io.BytesIO object at 0x7f...>")."""
    text = re.sub(r"\s*<[^<>\n]* at 0x[0-9a-fA-F]+>", "", str(e))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].startswith("Unable to decode as exceptions"):
        return "; ".join(lines[1:])
    return "; ".join(lines) or type(e).__name__


def _stored_range(arr: np.ndarray, ds, bits: int | None = None) -> tuple[float, float]:
    """The range BitsStored (or `bits`, --bit-depth) allows (signed when PixelRepresentation is
    1), whatever this image's own values reach: two films from one detector must not be
    scaled differently."""
    if bits is None:
        bits = int(ds.get("BitsStored", 0) or 0) or arr.dtype.itemsize * 8
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(1 << (bits - 1))), float((1 << (bits - 1)) - 1)
    return 0.0, float((1 << bits) - 1)


def image_header(path: Path | str) -> tuple[int, int, str, str]:
    """(width, height, PIL-style mode, format) without decoding the pixels."""
    path = Path(path)
    if is_dicom(path):
        with path.open("rb") as f:
            ds = _read_dataset(f, str(path), header_only=True)
        grey = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper().startswith("MONO")
        return int(ds.get("Columns", 0)), int(ds.get("Rows", 0)), "L" if grey else "RGB", "DICOM"
    with Image.open(path) as im:
        return im.size[0], im.size[1], im.mode, im.format or ""


def _is_grey(path: Path) -> bool | None:
    if is_dicom(path):
        try:
            with Path(path).open("rb") as f:
                ds = _read_dataset(f, str(path), header_only=True)
            return str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper().startswith(
                "MONOCHROME")
        except Exception:
            return None
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


def recompress_jpeg(images: np.ndarray, qualities: list[int]) -> np.ndarray:
    """uint8 (N, C, H, W) images, each JPEG-encoded at its quality and decoded again (what a
    PACS export or a screenshot does to a film): the stress test's `jpeg` shift and the
    `intensity` augmentation both go through here."""
    out = np.empty_like(images)
    for i, (img, q) in enumerate(zip(images, qualities, strict=True)):
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(q))
        dec = np.asarray(Image.open(buf))
        out[i] = dec[None] if img.shape[0] == 1 else dec.transpose(2, 0, 1)
    return out
