"""Which package decodes which compressed DICOM transfer syntax, and a GDCM plugin for pydicom.

All decoders here are permissively licensed; pydicom's only other route to JPEG Lossless and
12-bit JPEG is pylibjpeg-libjpeg (GPL-3.0), which cxrlab must not need. `configure` sets pydicom
up once per process:

| transfer syntax                               | decoded by                               |
| JPEG Lossless (process 14, and SV1)           | GDCM (this module's plugin)              |
| JPEG Extended (8-bit, and 12-bit process 4)   | Pillow (8-bit), GDCM                     |
| JPEG-LS lossless and near-lossless            | GDCM (CharLS inside)                     |
| JPEG 2000 (lossless and lossy), HTJ2K         | pylibjpeg-openjpeg, then Pillow (J2K)    |
| JPEG Baseline                                 | Pillow                                   |
| RLE Lossless, deflate, uncompressed           | pydicom itself                           |

Why not pydicom's defaults: its GDCM plugin refuses 12-bit JPEG although GDCM's 12-bit IJG
codec decodes it (pydicom's own 12-bit reference file gives its reference values, a GDCM round
trip is within 1: tests/data/test_dicom.py), and it goes first for JPEG 2000, where GDCM aborts the
whole process (an uncaught C++ exception) on corrupt data. pyjpegls 1.5.1 (CharLS) is left
out: on truncated JPEG-LS it took 17-39 s per 64x64 frame to fail; GDCM fails at once.
Left as is: on a corrupt JPEG (not JPEG-LS) stream GDCM's libjpeg still prints a line or two
("Corrupt JPEG data: ...") to the C stderr; silencing that would mean redirecting file
descriptor 2, which other threads share.
"""

from __future__ import annotations

import logging
import sys
import threading

# Imported inside the functions that need them: gdcm, pydicom (heavy or
# optional; importing them here would slow every command that imports this module).

# UIDs as strings: importing pydicom would import gdcm before _import_gdcm can guard it.
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")  # lossless, near-lossless
GDCM_SYNTAXES = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", JPEG_EXTENDED, *JPEG_LS)
DECODER_DEPENDENCIES = {ts: ("python-gdcm>=3.0.10",) for ts in GDCM_SYNTAXES}
_LABEL = "cxrlab-gdcm"
_lock = threading.Lock()
_configured = False


def _import_gdcm():
    """gdcm, imported once; None when it is not installed.

    gdcm.py first tries `import dl` (a Python 2 module) and crashes with AttributeError when
    the working directory holds a folder named dl; a None in sys.modules makes that import fail
    the way gdcm expects. GDCM's own messages (on C stderr, some even on success: "Unsupported
    JPEG data precision 12" before its 12-bit codec takes over) are switched off: a failure
    reaches the user as one line from images.py.
    """
    if "gdcm" not in sys.modules and "dl" not in sys.modules:
        sys.modules["dl"] = None  # type: ignore[assignment]
        try:
            import gdcm
        except ImportError:
            return None
        finally:
            del sys.modules["dl"]
    gdcm = sys.modules.get("gdcm")
    if gdcm is not None:
        gdcm.Trace.SetError(False)
        gdcm.Trace.SetWarning(False)
    return gdcm


class _NoTracebacks(logging.Filter):
    """pydicom logs each failed plugin's traceback before it raises (and even when a later
    plugin succeeds); the user gets images.py's one line naming the file and syntax instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None


def configure() -> None:
    """Once per process, before pydicom decodes anything (thread-safe)."""
    global _configured
    with _lock:
        if _configured:
            return
        logging.getLogger("pydicom.pixels.decoders.base").addFilter(_NoTracebacks())
        _import_gdcm()  # before pydicom imports it unguarded
        from pydicom import uid
        from pydicom.pixels import get_decoder

        for ts in (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless,
                   uid.JPEGLosslessSV1, uid.JPEGLSLossless, uid.JPEGLSNearLossless,
                   uid.JPEG2000Lossless, uid.JPEG2000):  # where pydicom would use GDCM
            decoder = get_decoder(ts)
            if "gdcm" in decoder.available_plugins:
                decoder.remove_plugin("gdcm")
            if ts in GDCM_SYNTAXES and _LABEL not in decoder.available_plugins:
                decoder.add_plugin(_LABEL, (__name__, "decode_frame"))
        _configured = True


def is_available(tsyntax: str) -> bool:
    """pydicom's plugin interface: can this plugin decode `tsyntax` here?"""
    return tsyntax in DECODER_DEPENDENCIES and _import_gdcm() is not None


def decode_frame(src: bytes, runner) -> bytes:
    """One encoded frame -> its raw little-endian samples (pydicom's plugin interface); pydicom's
    GDCM plugin less its 12-bit JPEG refusal, with a readable error."""
    import gdcm

    ts = str.__str__(runner.transfer_syntax)
    bits = runner.bits_stored
    if ts in JPEG_LS:
        if bits in (6, 7):  # GDCM returns wrong pixels for these (pydicom issue 2008)
            raise ValueError("GDCM cannot decode 6- or 7-bit JPEG-LS")
        runner.set_option("planar_configuration", 0)  # GDCM returns JPEG-LS colour by pixel
        bits = runner.get_option("jls_precision", bits)
        runner.set_option("bits_allocated", 8 if bits <= 8 else 16)
    fragment = gdcm.Fragment()
    fragment.SetByteStringValue(src)
    fragments = gdcm.SequenceOfFragments.New()
    fragments.AddFragment(fragment)
    elem = gdcm.DataElement(gdcm.Tag(0x7FE0, 0x0010))
    elem.SetValue(fragments.__ref__())
    img = gdcm.Image()
    img.SetNumberOfDimensions(2)
    img.SetDimensions((runner.columns, runner.rows, 1))
    img.SetDataElement(elem)
    pi = gdcm.PhotometricInterpretation.GetPIType(str(runner.photometric_interpretation))
    img.SetPhotometricInterpretation(gdcm.PhotometricInterpretation(pi))
    if runner.samples_per_pixel > 1:
        img.SetPlanarConfiguration(runner.planar_configuration)
    img.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(ts)))
    container = runner.bits_allocated
    if ts == JPEG_EXTENDED and _jpeg_precision(src) in (8, 12):
        # GDCM picks its 8/12/16-bit IJG codec from this; the 16-bit one fails on a 12-bit
        # stream and prints "Unsupported JPEG data precision 12" before GDCM retries (the
        # 12-bit codec still writes 16-bit samples).
        container = _jpeg_precision(src)
    img.SetPixelFormat(gdcm.PixelFormat(runner.samples_per_pixel, container, bits, bits - 1,
                                        runner.pixel_representation))
    frame = img.GetBuffer()
    if not frame:  # GDCM's only sign of failure
        raise ValueError("GDCM could not decode it (corrupt or truncated data)")
    return frame.encode("utf-8", "surrogateescape")  # GDCM hands the char* back as str


def _jpeg_precision(src: bytes) -> int | None:
    """The sample precision P in a JPEG stream's frame header (SOFn), None when not found."""
    i = 2  # after SOI
    while i + 4 < len(src) and src[i] == 0xFF:
        marker = src[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return src[i + 4]
        else:
            i += 2 + int.from_bytes(src[i + 2:i + 4], "big")
    return None
