"""DICOM wherever an image is accepted: files built here with pydicom, no download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrlab.config import RunConfig
from cxrlab.data.images import decode_image, guess_channels, image_header, read_image
from cxrlab.data.sources import load_source
from cxrlab.deploy.predict import predict_paths
from cxrlab.errors import CxrlabError
from cxrlab.training.lifecycle import train_run
from tests.conftest import make_kermany_folder


def write_dicom(path: Path, arr: np.ndarray, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, preamble: bool = True, **elements) -> Path:
    """A minimal valid DICOM file (Secondary Capture) holding `arr`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = "DX"
    bits = bits_stored or arr.dtype.itemsize * 8
    ds.set_pixel_data(arr, photometric, bits)
    for k, v in elements.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def ramp12(h: int = 32, w: int = 64) -> np.ndarray:
    """12-bit values 0..4095 across the width."""
    row = np.linspace(0, 4095, w).round().astype(np.uint16)
    return np.tile(row, (h, 1))


def test_12_bit_is_scaled_by_its_bit_depth(tmp_path):
    a = ramp12()
    got = read_image(write_dicom(tmp_path / "a.dcm", a, bits_stored=12), 1)
    assert got.shape == (1, 32, 64) and got.dtype == np.uint8
    expected = (a.astype(float) * 255 / 4095).round()
    assert np.abs(got[0].astype(int) - expected).max() <= 1
    assert got.min() == 0 and got.max() == 255


def test_bits_stored_sets_the_scale_not_the_image_maximum(tmp_path):
    """Two 12-bit films from one detector, one dim (max 1000) and one bright (max 4000): a
    stored value means the same grey in both, as on a viewer without a window."""
    y, x = np.mgrid[0:32, 0:64]
    dim = (x * 1000 // 63).astype(np.uint16)
    bright = (x * 4000 // 63).astype(np.uint16)
    bright[0, :] = dim[0, :]  # the same stored values on one row of each film
    got_dim = read_image(write_dicom(tmp_path / "dim.dcm", dim, bits_stored=12), 1)[0]
    got_bright = read_image(write_dicom(tmp_path / "bright.dcm", bright, bits_stored=12), 1)[0]
    assert np.array_equal(got_dim[0], got_bright[0])
    assert np.array_equal(got_dim[0], (dim[0] * 255.0 / 4095).round().astype(np.uint8))
    assert got_dim.max() == round(1000 * 255 / 4095) and got_bright.max() == 249
    # 12-bit values declared as 16 bits stored are scaled as 16-bit, as the file says
    as16 = read_image(write_dicom(tmp_path / "as16.dcm", ramp12(), bits_stored=16), 1)
    assert as16.max() == round(4095 * 255 / 65535)


def test_signed_pixels_are_scaled_by_their_signed_range(tmp_path):
    a = np.tile(np.linspace(-2048, 2047, 64).round().astype(np.int16), (32, 1))
    narrow = (a // 8).astype(np.int16)  # -256..255: same detector, little contrast
    got = read_image(write_dicom(tmp_path / "s.dcm", a, bits_stored=12), 1)[0]
    assert got[0, 0] == 0 and got[0, -1] == 255
    got_narrow = read_image(write_dicom(tmp_path / "n.dcm", narrow, bits_stored=12), 1)[0]
    expected = ((narrow[0].astype(float) + 2048) * 255 / 4095).round()
    assert np.array_equal(got_narrow[0], expected.astype(np.uint8))  # not stretched


def test_monochrome1_is_inverted(tmp_path):
    a = ramp12()
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", a, bits_stored=12), 1)
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", a, "MONOCHROME1", bits_stored=12), 1)
    assert np.array_equal(m1, 255 - m2)
    assert m1[0, 0, 0] == 255 and m1[0, 0, -1] == 0  # low values are white in MONOCHROME1


def test_window_centre_and_width_are_applied(tmp_path):
    a = ramp12()
    path = write_dicom(tmp_path / "w.dcm", a, bits_stored=12, WindowCenter=2048,
                       WindowWidth=1024)
    got = read_image(path, 1)[0].astype(int)
    v = a.astype(float)
    expected = np.clip(((v - 2047.5) / 1023 + 0.5) * 255, 0, 255).round()  # PS3.3 C.11.2.1.2
    assert np.abs(got - expected).max() <= 1
    assert (got[:, v[0] < 1500] == 0).all() and (got[:, v[0] > 2600] == 255).all()


def test_rescale_then_window_in_output_units(tmp_path):
    a = ramp12()  # stored 0..4095, rescaled to -1024..3071 (CT-like units)
    path = write_dicom(tmp_path / "r.dcm", a, bits_stored=12, RescaleSlope=1,
                       RescaleIntercept=-1024, WindowCenter=0, WindowWidth=2001)
    got = read_image(path, 1)[0].astype(int)
    v = a.astype(float) - 1024
    expected = np.clip(((v + 0.5) / 2000 + 0.5) * 255, 0, 255).round()
    assert np.abs(got - expected).max() <= 1


def test_voi_lut_sequence_is_applied(tmp_path):
    a = ramp12()
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "US", (4095 - np.arange(4096)).tolist())  # LUTData, inverting
    path = write_dicom(tmp_path / "l.dcm", a, bits_stored=12, VOILUTSequence=Sequence([item]))
    plain = read_image(write_dicom(tmp_path / "p.dcm", a, bits_stored=12), 1)
    got = read_image(path, 1)
    assert np.abs(got.astype(int) - (255 - plain.astype(int))).max() <= 1


def test_8_bit_dicom_equals_the_same_pixels_as_png(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    dcm = write_dicom(tmp_path / "x.dcm", a)
    png = tmp_path / "x.png"
    Image.fromarray(a, mode="L").save(png)
    for channels, size in ((1, None), (1, 32), (3, 32)):
        assert np.array_equal(read_image(dcm, channels, size), read_image(png, channels, size))
    assert np.array_equal(decode_image(dcm.read_bytes(), 1, 32), read_image(png, 1, 32))
    assert image_header(dcm) == (48, 40, "L", "DICOM")


def test_rgb_dicom(tmp_path):
    a = np.zeros((32, 32, 3), dtype=np.uint8)
    a[..., 0] = 200
    got = read_image(write_dicom(tmp_path / "c.dcm", a, "RGB"), 3)
    assert got.shape == (3, 32, 32) and (got[0] == 200).all() and (got[1:] == 0).all()
    assert guess_channels([tmp_path / "c.dcm"]) == 3


def test_multi_frame_is_refused_with_one_line(tmp_path):
    a = np.stack([ramp12(), ramp12()])
    path = write_dicom(tmp_path / "cine.dcm", a, bits_stored=12)
    with pytest.raises(CxrlabError, match="multi-frame") as e:
        read_image(path, 1)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and "2 frames" in str(e.value)


def test_not_dicom_with_dicom_extension_names_the_file(tmp_path):
    bad = tmp_path / "fake.dcm"
    bad.write_bytes(b"this is not a dicom file at all" * 10)
    with pytest.raises(CxrlabError, match="fake.dcm"):
        read_image(bad, 1)
    empty = write_dicom(tmp_path / "nopix.dcm", ramp12(), bits_stored=12)
    from pydicom import dcmread

    ds = dcmread(empty)
    del ds.PixelData
    ds.save_as(empty)
    with pytest.raises(CxrlabError, match="no Pixel Data"):
        read_image(empty, 1)


def test_dicom_without_extension_is_found_by_magic(tmp_path):
    root = make_kermany_folder(tmp_path / "d", 4, 4, size=32)
    write_dicom(root / "NORMAL" / "IM9000", ramp12(), bits_stored=12)  # PACS export, no suffix
    (root / "NORMAL" / "README").write_text("not an image")
    names = [r.path.name for r in load_source(root).records]
    assert "IM9000" in names and "README" not in names
    assert read_image(root / "NORMAL" / "IM9000", 1, 32).shape == (1, 32, 32)


def test_tiny_dicom_is_refused(tmp_path):
    with pytest.raises(CxrlabError, match="smaller than"):
        read_image(write_dicom(tmp_path / "t.dcm", np.zeros((8, 8), np.uint8)), 1)


def _png_to_dicom(png: Path, bits: int = 12) -> Path:
    """The same X-ray as a 12-bit DICOM (values x 4095/255), the PNG removed."""
    a = np.asarray(Image.open(png).convert("L")).astype(np.uint16) * 4095 // 255
    out = write_dicom(png.with_suffix(".dcm"), a.astype(np.uint16), bits_stored=bits)
    png.unlink()
    return out


def test_train_and_predict_on_a_folder_with_dicoms(tmp_path):
    root = make_kermany_folder(tmp_path / "data", 10, 10, size=32)
    converted = [_png_to_dicom(p) for p in sorted(root.rglob("*.png"))[::2]]
    assert len(converted) == 10
    cfg = RunConfig(data=str(root), model="cnn", image_size=32, epochs=1, batch_size=8)
    result = train_run(cfg, tmp_path / "run", progress=False)
    assert result.n_train + result.n_val == 20  # every DICOM was read
    rows = predict_paths(tmp_path / "run", [root / "PNEUMONIA"])
    assert len(rows) == 10 and all("error" not in r for r in rows)
    assert sum(r["path"].endswith(".dcm") for r in rows) == 5
    assert {r["class"] for r in rows} <= {"NORMAL", "PNEUMONIA"}


def test_data_summary_reads_dicom_headers(tmp_path):
    from cxrlab.data.audit import summarize

    root = make_kermany_folder(tmp_path / "d", 4, 4, size=32)
    write_dicom(root / "NORMAL" / "IM-0100-0001.dcm", ramp12(), bits_stored=12)
    write_dicom(root / "NORMAL" / "IM-0101-0001.dcm", np.stack([ramp12()] * 2), bits_stored=12)
    d = summarize(load_source(root)).to_dict()
    assert d["sizes"]["formats"] == {"DICOM": 1, "PNG": 8} and d["sizes"]["width"]["max"] == 64
    assert [(Path(p).name, "multi-frame" in why) for p, why in d["unreadable"]] == [
        ("IM-0101-0001.dcm", True)]


# ---------------------------------------------------------------------------------------
# Compressed transfer syntaxes, as a PACS sends them: files encoded here by GDCM or pydicom.

def film12(h: int = 64, w: int = 64) -> np.ndarray:
    """A smooth 12-bit 'film' with some noise: what lossy codecs see in an X-ray."""
    y, x = np.mgrid[0:h, 0:w]
    noise = np.random.default_rng(0).integers(0, 40, (h, w))
    return (300 + x * 40 + y * 15 + noise).clip(0, 4095).astype(np.uint16)


def _gdcm_transcode(src: Path, dst: Path, ts: str, near: int = 0) -> Path:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(ts)))
    if near:
        codec = gdcm.JPEGLSCodec()
        codec.SetLossless(False)
        codec.SetLossyError(near)
        change.SetUserCodec(codec)
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return dst


def _pydicom_compress(src: Path, dst: Path, ts: str, **kwargs) -> Path:
    from pydicom import dcmread

    ds = dcmread(src)
    ds.compress(ts, **kwargs)
    ds.save_as(dst)
    return dst


# (transfer syntax UID, how the file is made, largest grey-level difference allowed)
COMPRESSED = {
    "jpeg-lossless-p14": ("1.2.840.10008.1.2.4.57", _gdcm_transcode, {}, 0),
    "jpeg-lossless-sv1": ("1.2.840.10008.1.2.4.70", _gdcm_transcode, {}, 0),
    "jpeg-extended-12bit": ("1.2.840.10008.1.2.4.51", _gdcm_transcode, {}, 1),
    "jpeg-ls-lossless": ("1.2.840.10008.1.2.4.80", _gdcm_transcode, {}, 0),
    "jpeg-ls-near-lossless": ("1.2.840.10008.1.2.4.81", _gdcm_transcode, {"near": 8}, 1),
    "jpeg2000-lossless": ("1.2.840.10008.1.2.4.90", _pydicom_compress, {}, 0),
    "jpeg2000": ("1.2.840.10008.1.2.4.91", _pydicom_compress, {"j2k_cr": [20]}, 2),
    "rle": ("1.2.840.10008.1.2.5", _pydicom_compress, {}, 0),
}


@pytest.mark.parametrize("kind", COMPRESSED)
def test_compressed_syntax_decodes_like_the_uncompressed_file(tmp_path, kind, capfd):
    from pydicom import dcmread

    ts, make, kwargs, tolerance = COMPRESSED[kind]
    raw = write_dicom(tmp_path / "raw.dcm", film12(), bits_stored=12)
    path = make(raw, tmp_path / f"{kind}.dcm", ts, **kwargs)
    assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
    if tolerance:  # lossy really is lossy here, so the tolerance is tested
        assert not np.array_equal(dcmread(path).pixel_array, film12())
    expected = read_image(raw, 1, 64).astype(int)
    got = read_image(path, 1, 64)
    assert got.shape == (1, 64, 64) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected).max() <= tolerance
    assert capfd.readouterr().err == ""  # no decoder chatter on the C stderr either


def test_12_bit_jpeg_as_modalities_write_it(capfd):
    """A 12-bit precision JPEG Extended stream (GDCM itself writes 16-bit precision ones); the
    file ships in pydicom's wheel, its reference values are pydicom's own."""
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / "JPGExtended.dcm"
    if not path.exists():
        pytest.skip("this pydicom wheel ships no JPGExtended.dcm")
    got = read_image(path, 1)[0]
    arr = pydicom.dcmread(path).pixel_array
    assert arr[420, 140] == 244 and arr[230, 120] == 95
    assert np.array_equal(got, (arr * 255.0 / 4095).round().astype(np.uint8))
    assert capfd.readouterr().err == ""  # GDCM's "Unsupported JPEG data precision 12" is gone


@pytest.mark.parametrize("kind, damage, syntax", [
    ("jpeg-ls-lossless", "truncate", "JPEG-LS Lossless Image Compression, 1.2.840.10008.1.2.4.80"),
    # GDCM aborts the whole process on this one: it must never be asked
    ("jpeg2000-lossless", "garble", "JPEG 2000 Image Compression (Lossless Only), "
                                    "1.2.840.10008.1.2.4.90"),
])
def test_corrupt_compressed_pixels_give_one_line_and_no_traceback(tmp_path, kind, damage,
                                                                     syntax, capfd, caplog):
    import logging
    import sys

    from pydicom import dcmread
    from pydicom.encaps import encapsulate, generate_frames

    ts, make, kwargs, _ = COMPRESSED[kind]
    raw = write_dicom(tmp_path / "raw.dcm", film12(), bits_stored=12)
    ds = dcmread(make(raw, tmp_path / "ok.dcm", ts, **kwargs))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    if damage == "truncate":
        frame = frame[: len(frame) // 3]
    else:
        frame = frame[:40] + np.random.default_rng(1).bytes(len(frame) - 40)
    ds.PixelData = encapsulate([frame])
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    handler = logging.StreamHandler(sys.stderr)  # as the CLI's log handler would print
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(CxrlabError) as e:
            read_image(bad, 1, 64)
    finally:
        logging.getLogger().removeHandler(handler)
    msg = str(e.value)
    assert msg.startswith(f"{bad}: cannot decode the DICOM pixel data ({syntax})")
    assert "\n" not in msg and " at 0x" not in msg  # no "<_io.BytesIO object at 0x...>"
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.exc_info]


def test_a_folder_named_dl_does_not_break_the_gdcm_import(tmp_path):
    """gdcm.py tries `import dl`; a dl/ folder in the working directory used to crash it."""
    import os
    import subprocess
    import sys

    path = write_dicom(tmp_path / "x.dcm", ramp12(), bits_stored=12)
    (tmp_path / "dl").mkdir()
    code = ("from cxrlab.data.images import read_image; import sys; "
            "print(read_image(sys.argv[1], 1).max())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "255"
