"""`cxrlab serve`: a trained run behind FastAPI, with a page to drop an X-ray on.

    POST /predict        multipart field `file` (JPEG, PNG or DICOM) -> {class, probabilities,
                         threshold, rule, model, version} (2 classes: also positive_class,
                         positive_score); ?cam=1 adds `cam`, a PNG data URL
    GET  /               the page (no external scripts, fonts or CDNs)
    GET  /health         {status, model, classes, backend, ...}
    GET  /docs, /openapi.json   as FastAPI writes them

Limits: the body is counted while it streams (BodyLimit) and cut off with 413 at
`max_upload_mb`; an image that is not one, or in a format we cannot read, is 415 with the
reason; an image over `max_pixels` (decompression bombs) is 413 before its pixels are
decoded; under 16 px is 422. Uploads are decoded from memory (Starlette spools parts over
1 MB to an anonymous temporary file, deleted when the request ends): nothing is written
anywhere else. The model is loaded once by `create_app`; inference is serialised by a lock
(parallel forwards only fight over the same cores) or, with `batch_wait_ms` > 0, requests
arriving together are stacked into one forward pass by `MicroBatcher`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse

from cxrlab._version import __version__
from cxrlab.data.images import decode_image
from cxrlab.deploy.cam import GradCam, overlay_png_bytes, png_data_url
from cxrlab.deploy.export import make_predictor
from cxrlab.deploy.inference import decide, decision_rule
from cxrlab.errors import CxrlabError
from cxrlab.run import load_run

# Imported inside the functions that need them: starlette, torch, uvicorn (heavy or
# optional; importing them here would slow every command that imports this module).

log = logging.getLogger("cxrlab")
DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_PIXELS = 50_000_000  # a 7000 x 7000 X-ray; PIL's own limit is 89 M
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class MicroBatcher:
    """Stack requests that arrive within `max_wait_s` of each other (up to `max_batch`) into
    one forward pass on a worker thread; each caller blocks on its own Future."""

    def __init__(self, fn, max_batch: int = 16, max_wait_s: float = 0.005):
        self.fn = fn
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches: list[int] = []  # sizes of the batches run (for the benchmark)
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="cxrlab-batcher", daemon=True)
        self._thread.start()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        fut: Future = Future()
        self._q.put((image, fut))
        return fut.result()

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    nxt = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
            self.batches.append(len(batch))
            try:
                probs = self.fn(np.stack([b[0] for b in batch]))
                for (_, fut), p in zip(batch, probs, strict=True):
                    fut.set_result(p)
            except Exception as e:  # every waiting request gets the error, none hangs
                for _, fut in batch:
                    fut.set_exception(e)


class Inference:
    """The run, loaded once: decode bytes -> probabilities (and a Grad-CAM on request)."""

    def __init__(self, run_dir: Path, batch_wait_ms: float = 0.0, max_batch: int = 16,
                 max_pixels: int = DEFAULT_MAX_PIXELS, onnx: Path | None = None,
                 tta: str | None = None):
        import torch

        self.run = load_run(run_dir, tta)
        self.version = __version__
        self.max_pixels = max_pixels
        self._torch = torch
        # torch fp32 (as the threshold was chosen) unless an exported file is given; Grad-CAM
        # always comes from the run's own model
        self._forward = make_predictor(self.run, "torch" if onnx is None else "onnx", onnx)
        self.backend = ("torch fp32" if onnx is None
                        else f"onnx {getattr(self._forward, 'precision', 'fp32')}")
        self._lock = threading.Lock()
        self._cam = None
        self._cam_lock = threading.Lock()
        self.batcher = (MicroBatcher(self._forward, max_batch, batch_wait_ms / 1000)
                        if batch_wait_ms > 0 else None)

    @property
    def classes(self) -> list[str]:
        return self.run.classes

    def decode(self, data: bytes, name: str) -> np.ndarray:
        return decode_image(data, self.run.info.in_chans, self.run.config.image_size,
                            name=name, max_pixels=self.max_pixels,
                            bit_depth=self.run.bit_depth)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        if self.batcher is not None:
            return self.batcher(image)
        with self._lock:
            return self._forward(image[None])[0]

    def predict(self, image: np.ndarray) -> dict:
        p = self.probabilities(image)
        k = int(decide(p[None], self.run.info.positive, self.run.threshold)[0])
        return {
            "class": self.classes[k],
            "probabilities": {c: round(float(v), 6) for c, v in zip(self.classes, p,
                                                                      strict=True)},
            "threshold": self.run.threshold,
            **decision_rule(p, self.classes, self.run.info.positive, self.run.threshold),
            "model": self.run.config.model,
            "run": Path(self.run.run_dir).resolve().name,
            "version": self.version,
        }

    def cam_data_url(self, image: np.ndarray) -> str:
        with self._cam_lock:  # built on first use: a copy of the model, kept
            if self._cam is None:
                self._cam = GradCam(self.run.model, positive=self.run.info.positive)
        heat = self._cam(image[None])[0]
        return png_data_url(overlay_png_bytes(image, heat))

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


class BodyLimit:
    """ASGI middleware: 413 as soon as the body passes `max_bytes` (Content-Length first, then
    counting the chunks as they stream), so an oversized upload is never read in full."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = f"upload larger than {self.max_bytes / 1e6:g} MB"
        for k, v in scope.get("headers", []):
            if k == b"content-length" and v.isdigit() and int(v) > self.max_bytes:
                return await JSONResponse({"detail": too_big}, 413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, too_big)  # FastAPI re-raises it as the response
            return msg

        await self.app(scope, counted, send)


def _status_for(message: str) -> int:
    if "decompression-bomb" in message:
        return 413
    if "smaller than" in message:
        return 422
    return 415


def create_app(run_dir: Path | str, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               batch_wait_ms: float = 0.0, max_batch: int = 16,
               max_pixels: int = DEFAULT_MAX_PIXELS, onnx: Path | str | None = None,
               tta: str | None = None):
    """The FastAPI app for one run; the model is loaded here, once. `onnx`: answer with
    that file from `cxrlab export` (checked against the run) in ONNX Runtime. `tta`:
    test-time augmentation (None: the run's own, cxrlab.models.tta)."""
    engine = Inference(Path(run_dir), batch_wait_ms, max_batch, max_pixels,
                       None if onnx is None else Path(onnx), tta)

    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="cxrlab", version=__version__, lifespan=lifespan,
                  description=f"Run `{engine.run.run_dir}`: {engine.run.config.model} on "
                              f"{', '.join(engine.classes)}.")
    app.state.engine = engine
    app.add_middleware(BodyLimit, max_bytes=int(max_upload_mb * 1_000_000))

    @app.get("/health")
    def health() -> dict:
        r = engine.run
        return {"status": "ok", "model": r.config.model, "run": Path(r.run_dir).resolve().name,
                "classes": r.classes, "image_size": r.config.image_size,
                "threshold": r.threshold, "tta": r.tta, "version": engine.version,
                "batching": engine.batcher is not None, "backend": engine.backend}

    @app.post("/predict")
    async def predict(file: UploadFile = File(..., description="JPEG, PNG or DICOM"),
                      cam: bool = Query(False, description="add a Grad-CAM PNG data URL")
                      ) -> dict:
        data = await file.read()
        name = Path(file.filename or "upload").name

        def work() -> dict:
            try:
                image = engine.decode(data, name)
            except CxrlabError as e:
                raise HTTPException(_status_for(str(e)), str(e)) from None
            out = engine.predict(image)
            if cam:
                out["cam"] = engine.cam_data_url(image)
            return out

        return await run_in_threadpool(work)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("cxrlab.deploy").joinpath("serve_page.html").read_text()

    return app


def serve_run(run_dir: Path, host: str = "127.0.0.1", port: int = 8000,
              max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, batch_wait_ms: float = 0.0,
              onnx: Path | None = None, tta: str | None = None) -> None:
    import uvicorn

    app = create_app(run_dir, max_upload_mb=max_upload_mb, batch_wait_ms=batch_wait_ms,
                     onnx=onnx, tta=tta)
    if host not in LOOPBACK:
        log.warning("serving on %s: reachable from other machines, with no authentication",
                    host)
    log.info("cxrlab: http://%s:%d/ (docs at /docs)", host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
