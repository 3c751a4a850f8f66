"""Hostile and odd inputs: each works, or ends in the one-line error (exit 2) through the real
CLI; never a traceback, never a run directory marked complete.

Cases already covered elsewhere are not repeated here: truncated JPEG with --skip-bad, a text
file named .png, an 8x8 image, CSV columns and missing files (test_cli.py); every pixel format
and bad file at the decoder (test_images.py); CSV with BOM, CRLF and duplicate rows
(test_sources.py).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrlab.data.images import read_image
from cxrlab.data.sources import load_source, require_trainable
from cxrlab.errors import CxrlabError
from cxrlab.run import read_split_csv
from cxrlab.training.checkpoints import AtomicCheckpointIO
from tests.conftest import make_kermany_folder
from tests.test_cli import assert_user_error, not_complete, run_cli

FAST = ["--model", "cnn", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--quiet"]


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                              0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def jpeg_bytes(size: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size), np.uint8)).save(
        buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def data(tmp_path) -> Path:
    return make_kermany_folder(tmp_path / "data", 8, 8, size=32)


def train(args, out: Path, capsys, monkeypatch, *extra):
    return run_cli(["train", *map(str, args), "--out", out, *FAST, *extra], capsys, monkeypatch)


# -- odd files that must work ---------------------------------------------------------------


def test_odd_but_valid_files_train_and_bad_ones_are_skipped(data, tmp_path, capsys,
                                                             monkeypatch, caplog):
    normal = data / "NORMAL"
    grey = np.asarray(Image.open(next(normal.iterdir())))
    Image.fromarray(grey).save(normal / "really a png.jpg", format="PNG")
    Image.fromarray(np.stack([grey] * 3, -1)).convert("CMYK").save(normal / "cmyk.jpg")
    Image.fromarray(grey.astype(np.uint16) * 257).save(normal / "sixteen bit.png")
    odd_name = os.fsencode(normal) + b"/caf\xe9-latin1.png"  # not UTF-8: bytes on Linux
    shutil.copyfile(os.fsencode(normal / "sixteen bit.png"), odd_name)
    os.symlink("loop.png", normal / "loop.png")  # a symlink to itself
    os.symlink("..", normal / "parent")  # a folder loop
    (data / "PNEUMONIA with space").mkdir()
    for f in sorted((data / "PNEUMONIA").iterdir())[:4]:
        f.rename(data / "PNEUMONIA with space" / f.name)
    (data / "NORMAL" / "zero.png").write_bytes(b"")
    (data / "NORMAL" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    Image.new("L", (1, 1)).save(data / "PNEUMONIA" / "one.png")
    run = tmp_path / "run with space"
    code, _, err = train([data], run, capsys, monkeypatch, "--skip-bad")
    assert code == 0, err
    for name in ("zero.png", "bomb.png", "one.png"):  # listed as skipped, not in the run
        assert name in err + caplog.text
        assert name.encode() not in (run / "split.csv").read_bytes()
    assert json.loads((run / "run.json").read_text())["state"] == "complete"
    rows = read_split_csv(run / "split.csv")
    names = {os.fsencode(Path(r["path"]).name) for r in rows}
    assert {b"really a png.jpg", b"cmyk.jpg", b"sixteen bit.png", b"caf\xe9-latin1.png"} <= names
    assert len(rows) == 8 + 8 + 4  # the loops added nothing
    assert {r["label"] for r in rows} == {"NORMAL", "PNEUMONIA", "PNEUMONIA with space"}


# -- bad files: one line, exit 2, no run ------------------------------------------------------


@pytest.mark.parametrize("name, content, needle", [
    ("zero.png", b"", "empty file"),
    ("cut.jpeg", jpeg_bytes()[:300], "runcated"),
    ("one.png", None, "1x1 px"),
    ("bomb.png", png_header_only(100_000, 100_000), "decompression-bomb"),
], ids=["zero-byte", "truncated-jpeg", "1x1", "100000x100000-header"])
def test_bad_file_is_one_line_and_skip_bad_lists_it(data, tmp_path, capsys, monkeypatch, name,
                                                   content, needle):
    bad = data / "NORMAL" / name
    if content is None:
        Image.new("L", (1, 1)).save(bad)
    else:
        bad.write_bytes(content)
    code, _, err = train([data], tmp_path / "run", capsys, monkeypatch)
    assert_user_error(code, err, name, needle)
    assert not (tmp_path / "run").exists()


def test_bad_file_through_a_real_process_prints_no_traceback(data, tmp_path):
    (data / "NORMAL" / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.run([sys.executable, "-m", "cxrlab.cli", "train", str(data), "--out",
                        str(tmp_path / "run"), *FAST], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("cxrlab: error:")]
    assert len(lines) == 1 and "bomb.png" in lines[0], p.stderr


# -- labels and CSV -----------------------------------------------------------------------------


def test_labels_differing_only_in_case(data, tmp_path, capsys, monkeypatch):
    shutil.copytree(data / "NORMAL", data / "normal")
    code, _, err = train([data], tmp_path / "run", capsys, monkeypatch)
    assert_user_error(code, err, "'NORMAL' and 'normal'", "differ only in case")
    shutil.rmtree(data / "normal")
    rows = [f"{p.relative_to(data)},{'Pneumonia' if i % 2 else 'pneumonia'}"
            for i, p in enumerate(sorted((data / "PNEUMONIA").iterdir()))]
    rows += [f"{p.relative_to(data)},NORMAL" for p in sorted((data / "NORMAL").iterdir())]
    (data / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    code, _, err = train([data / "m.csv"], tmp_path / "run", capsys, monkeypatch)
    assert_user_error(code, err, "m.csv", "differ only in case")
    assert not (tmp_path / "run").exists()


def test_csv_with_bom_crlf_duplicates_and_a_missing_value(data, tmp_path, capsys, monkeypatch):
    rows = [f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    rows = rows + rows[:3]  # duplicate rows
    csv = data / "m.csv"
    csv.write_bytes(("\ufeffpath,label\r\n" + "\r\n".join(rows[:5] + ["NORMAL/x.png,"]
                                                          + rows[5:]) + "\r\n").encode())
    code, _, err = train([csv], tmp_path / "run", capsys, monkeypatch)
    assert_user_error(code, err, "m.csv", "line 7", "empty label")
    assert not (tmp_path / "run").exists()
    ok = csv.with_name("ok.csv")
    ok.write_bytes(csv.read_bytes().replace(b"NORMAL/x.png,\r\n", b""))
    s = load_source(ok)  # the same without the missing value: duplicates counted once
    assert len(s.records) == 16 and s.classes == ["NORMAL", "PNEUMONIA"]


# -- output directory -----------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod; the EROFS case below "
                                              "covers the same refusal")
def test_read_only_out_dir_chmod(data, tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, _, err = train([data], parent / "run", capsys, monkeypatch)
    finally:
        parent.chmod(0o755)
    assert_user_error(code, err, "--out", "cannot write")


def test_read_only_or_full_out_dir_is_refused_before_training(data, tmp_path, capsys,
                                                             monkeypatch):
    import cxrlab.run as runmod
    import cxrlab.training.lifecycle as trainmod  # where train_run finds fit

    fit_calls = []
    monkeypatch.setattr(trainmod, "fit", lambda *a, **k: fit_calls.append(1))
    real_write = Path.write_text

    def read_only(self, *a, **k):
        if self.name == ".write-test":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", read_only)
        code, _, err = train([data], tmp_path / "ro", capsys, monkeypatch)
    assert_user_error(code, err, "--out", "Read-only file system")

    class Usage:
        free = 5 * 2**20

    monkeypatch.setattr(runmod.shutil, "disk_usage", lambda p: Usage())
    code, _, err = train([data], tmp_path / "full", capsys, monkeypatch)
    assert_user_error(code, err, "--out", "not enough free disk space", "5 MiB free")
    assert not (tmp_path / "full").exists() and not fit_calls


def test_disk_full_mid_training_fails_cleanly_and_resumes(data, tmp_path, capsys, monkeypatch):
    """The second epoch's checkpoint hits a full disk: one line, state failed with the error,
    the first epoch's checkpoint intact; --resume then finishes the run."""
    saves = []
    real_save = AtomicCheckpointIO.save_checkpoint

    def filling(self, checkpoint, path, storage_options=None):
        saves.append(path)
        if len(saves) == 3:  # epoch 1: best + last; epoch 2: best or last -> full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(self, checkpoint, path, storage_options)

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(AtomicCheckpointIO, "save_checkpoint", filling)
        code, _, err = train([data], run, capsys, monkeypatch, "--epochs", "2")
    assert_user_error(code, err, "No space left on device", "--resume")
    info = json.loads((run / "run.json").read_text())
    assert info["state"] == "failed" and "No space left" in info["error"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["epoch"] == 0
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]

    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys, monkeypatch)
    assert code == 0, err
    assert not not_complete(run)
    assert len((run / "history.csv").read_text().splitlines()) == 3


# -- fuzz -------------------------------------------------------------------------------------


VALID = {"png": None, "jpeg": jpeg_bytes(32)}


def _png32() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 32), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


VALID["png"] = _png32()


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(VALID)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=6))
def test_fuzzed_image_bytes_decode_or_fail_in_one_line(tmp_path, kind, cut, flips):
    """Truncated and corrupted PNG/JPEG files: an image of the asked shape, or CxrlabError."""
    b = bytearray(VALID[kind][: int(len(VALID[kind]) * cut) + 1])
    for where, value in flips:
        b[int(where * (len(b) - 1))] = value
    p = tmp_path / f"fuzz.{kind}"
    p.write_bytes(bytes(b))
    try:
        a = read_image(p, 1, 16)
    except CxrlabError as e:
        msg = str(e)
        assert msg.startswith(f"{p}: ") and "\n" not in msg
    else:
        assert a.shape == (1, 16, 16) and a.dtype == np.uint8


cell = st.lists(st.sampled_from([*"aAbB ,\"\r\n\ufeff/.", "img.png", "x"]),
                max_size=6).map("".join)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(cell, cell), max_size=6), bom=st.booleans(), crlf=st.booleans())
def test_fuzzed_csv_loads_or_fails_in_one_line(tmp_path, rows, bom, crlf):
    """Any CSV text: a Source whose records exist, or one CxrlabError naming the CSV."""
    Image.new("L", (20, 20)).save(tmp_path / "img.png")
    end = "\r\n" if crlf else "\n"
    text = ("\ufeff" if bom else "") + end.join(["path,label", *(f"{a},{b}" for a, b in rows)])
    csv = tmp_path / "m.csv"
    csv.write_text(text + end, encoding="utf-8")
    try:
        s = load_source(csv)
    except CxrlabError as e:
        assert str(e).startswith(str(csv)) and "\n" not in str(e)
        return
    assert s.records and all(r.path.is_file() and r.label == r.label.strip() and r.label
                             for r in s.records)
    try:
        require_trainable(s)  # one image here: never two classes
    except CxrlabError as e:
        assert str(e).startswith(str(csv)) and "\n" not in str(e)
