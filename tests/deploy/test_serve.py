"""The web service, in-process with FastAPI's TestClient: every endpoint and every limit."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from PIL import Image

from cxrlab.config import RunConfig
from cxrlab.deploy.predict import predict_paths
from cxrlab.deploy.serve import BodyLimit, MicroBatcher, create_app
from cxrlab.training.lifecycle import train_run
from tests.conftest import make_kermany_folder
from tests.data.test_dicom import write_dicom


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    data = make_kermany_folder(root / "data", 8, 8, size=48)
    cfg = RunConfig(data=str(data), model="cnn", image_size=32, epochs=1, batch_size=8,
                    precision="fp32")
    train_run(cfg, root / "run", progress=False)
    with TestClient(create_app(root / "run")) as client:
        yield client, root / "run", data


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def upload(client, name: str, data: bytes, cam: bool = False, mime: str = "image/png"):
    return client.post("/predict" + ("?cam=1" if cam else ""),
                       files={"file": (name, data, mime)})


def test_health_docs_and_page(served):
    client, run, _ = served
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["classes"] == ["NORMAL", "PNEUMONIA"]
    assert h["model"] == "cnn" and h["image_size"] == 32
    spec = client.get("/openapi.json").json()
    assert "/predict" in spec["paths"] and "/health" in spec["paths"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    assert "<script>" in html and 'id="drop"' in html
    assert "Research use only — not for clinical use." in html
    assert "res.rule" in html  # the decision is shown with its rule
    assert "http://" not in html and "https://" not in html and "src=\"/" not in html


def test_predict_matches_the_cli(served):
    client, run, data = served
    f = sorted((data / "PNEUMONIA").glob("*.png"))[0]
    r = upload(client, f.name, f.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) >= {"class", "probabilities", "threshold", "model", "version"}
    assert "cam" not in body
    row = predict_paths(run, [f])[0]
    assert body["class"] == row["class"] and body["threshold"] == row["threshold"]
    # the decision and its rule, as predict gives them
    assert body["positive_class"] == row["positive_class"]
    assert abs(body["positive_score"] - row["positive_score"]) < 1e-5
    assert body["rule"].startswith(f"p({body['positive_class']}) ")
    assert body["rule"].split()[2] == ("≥" if body["class"] == body["positive_class"] else "<")
    assert body["threshold"] is not None
    for c, p in row["probabilities"].items():
        assert abs(body["probabilities"][c] - p) < 1e-5
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4


def test_cam_is_a_png_data_url(served):
    client, _, data = served
    f = sorted((data / "NORMAL").glob("*.png"))[0]
    body = upload(client, f.name, f.read_bytes(), cam=True).json()
    prefix = "data:image/png;base64,"
    assert body["cam"].startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(body["cam"][len(prefix):]))) as im:
        assert im.format == "PNG" and im.size == (32, 32) and im.mode == "RGB"


def test_jpeg_and_dicom_uploads(served, tmp_path):
    client, _, _ = served
    a = np.random.default_rng(0).integers(0, 256, (48, 48), dtype=np.uint8)
    dcm = write_dicom(tmp_path / "x.dcm", a).read_bytes()
    r_png = upload(client, "x.png", png_bytes(a))
    r_dcm = upload(client, "x.dcm", dcm, mime="application/dicom")
    assert r_dcm.status_code == 200, r_dcm.text
    assert r_dcm.json()["probabilities"] == r_png.json()["probabilities"]
    r_noext = upload(client, "IM0001", dcm, mime="application/octet-stream")  # magic bytes
    assert r_noext.status_code == 200, r_noext.text
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    assert upload(client, "x.jpg", buf.getvalue(), mime="image/jpeg").status_code == 200


def bomb_png(side: int = 40_000) -> bytes:
    """A 40000 x 40000 grey PNG header with a few bytes of data: ~1.6 G pixels if decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1) * 4)) + chunk(b"IEND", b""))


def test_bad_uploads(served, tmp_path):
    client, _, _ = served
    r = upload(client, "notes.txt", b"hello, not an image" * 10, mime="text/plain")
    assert r.status_code == 415 and "not an image" in r.json()["detail"]
    r = upload(client, "empty.png", b"")
    assert r.status_code == 415 and "empty" in r.json()["detail"]
    cine = write_dicom(tmp_path / "cine.dcm", np.zeros((2, 32, 32), np.uint8)).read_bytes()
    r = upload(client, "cine.dcm", cine, mime="application/dicom")
    assert r.status_code == 415 and "multi-frame" in r.json()["detail"]
    r = upload(client, "bomb.png", bomb_png())
    assert r.status_code == 413 and "decompression-bomb" in r.json()["detail"]
    r = upload(client, "tiny.png", png_bytes(np.zeros((8, 8), np.uint8)))
    assert r.status_code == 422 and "smaller than 16" in r.json()["detail"]
    assert client.post("/predict").status_code == 422  # no file field
    assert client.post("/predict", data={"file": "text"}).status_code == 422


def test_upload_size_limit(served):
    _, run, _ = served
    with TestClient(create_app(run, max_upload_mb=0.05)) as small:
        ok = png_bytes(np.zeros((64, 64), np.uint8))
        assert upload(small, "ok.png", ok).status_code == 200
        noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
        r = upload(small, "big.png", png_bytes(noise))  # ~65 kB > 52 kB
        assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_body_limit_stops_reading_a_streamed_body():
    """Chunked (no Content-Length): the middleware answers 413 after the chunk that crosses
    the limit and never asks for the rest."""
    asked = []
    sent = []

    async def receive():
        asked.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=5000)

    @app.post("/")
    async def read_all(request: Request):  # reads the whole body, as a form parser would
        await request.body()
        return {}

    asyncio.run(app(scope, receive, send))
    assert len(asked) == 6  # 6 x 1000 bytes > 5000: stopped there, not at the end
    assert sent[0]["status"] == 413


def test_concurrent_requests_are_safe_and_batching_agrees(served):
    client, run, data = served
    files = sorted(data.rglob("*.png"))[:8]
    blobs = [f.read_bytes() for f in files]
    alone = [upload(client, f.name, b).json()["probabilities"]
             for f, b in zip(files, blobs, strict=True)]

    def hammer(c):
        with ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: upload(c, files[i % 8].name, blobs[i % 8]), range(24)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        for i, r in enumerate(rs):
            for k, v in r.json()["probabilities"].items():
                assert abs(v - alone[i % 8][k]) < 1e-5
    hammer(client)
    app = create_app(run, batch_wait_ms=20)
    with TestClient(app) as batched:
        assert batched.get("/health").json()["batching"] is True
        hammer(batched)
        assert max(app.state.engine.batcher.batches) > 1  # requests really were stacked


def test_micro_batcher_keeps_order_and_passes_errors():
    seen = []

    def fn(x):
        seen.append(len(x))
        if (x < 0).any():
            raise ValueError("negative")
        return x.reshape(len(x), -1).sum(1)

    b = MicroBatcher(fn, max_batch=4, max_wait_s=0.05)
    try:
        with ThreadPoolExecutor(8) as pool:
            out = list(pool.map(lambda i: b(np.full((1, 2, 2), i)), range(8)))
        assert out == [4 * i for i in range(8)] and max(seen) > 1 and max(seen) <= 4
        with pytest.raises(ValueError, match="negative"):
            b(np.full((1, 2, 2), -1))
        assert b(np.ones((1, 2, 2))) == 4  # the worker survived the error
    finally:
        b.close()


def test_serve_binds_loopback_by_default(served, monkeypatch, capsys):
    import uvicorn

    from cxrlab.cli import main

    _, run, _ = served
    calls = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.update(kw, app=app))
    monkeypatch.setattr(sys, "argv", ["cxrlab", "serve", str(run)])
    main()
    assert calls["host"] == "127.0.0.1" and calls["port"] == 8000
    monkeypatch.setattr(sys, "argv", ["cxrlab", "serve", str(run / "missing")])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and "missing" in capsys.readouterr().err


def test_nothing_is_written(served, tmp_path, monkeypatch):
    client, run, data = served
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in Path(run).rglob("*"))
    f = sorted(data.rglob("*.png"))[0]
    assert upload(client, f.name, f.read_bytes(), cam=True).status_code == 200
    assert sorted(p.name for p in Path(run).rglob("*")) == before
    assert not any(tmp_path.iterdir())
    assert threading.active_count() < 50
