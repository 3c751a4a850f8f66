"""Decode and resize once: uint8 arrays, cached in memory and on disk.

Decoding 5000 JPEGs takes tens of seconds on two cores; doing it every epoch is what made the
notebooks slow. The disk key is the files' contents (not their names or times), the size and
the channels, so a renamed copy hits and an edited file misses.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrlab.data.images import read_image
from cxrlab.errors import CxrlabError

log = logging.getLogger("cxrlab")
FORMAT_VERSION = 1
_memory: dict[str, tuple[np.ndarray, list[tuple[Path, str]]]] = {}


@dataclass
class CacheInfo:
    """How the last `load_images` call was served: 'memory', 'disk' or 'decoded'."""

    event: str = ""
    key: str = ""
    seconds: float = 0.0


last = CacheInfo()


def default_cache_dir() -> Path:
    return Path(os.environ.get("CXRLAB_CACHE") or Path.home() / ".cache" / "cxrlab")


def _digest(path: Path) -> bytes:
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
    except OSError as e:
        return f"unreadable:{path}:{e.errno}".encode()


def dataset_key(paths: Sequence[Path], size: int, channels: int) -> str:
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        digests = list(pool.map(_digest, paths))
    h = hashlib.blake2b(digest_size=20)
    h.update(f"v{FORMAT_VERSION}|{size}|{channels}|{len(paths)}|".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def _decode_one(args):
    path, size, channels = args
    try:
        return read_image(path, channels, size), None
    except CxrlabError as e:
        return None, str(e).split(": ", 1)[-1] if str(e).startswith(str(path)) else str(e)


def _decode_all(paths: Sequence[Path], size: int, channels: int):
    out = np.zeros((len(paths), channels, size, size), dtype=np.uint8)
    ok = np.ones(len(paths), dtype=bool)
    reasons: dict[int, str] = {}
    progress = None
    if len(paths) > 200 and sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(f"decoding {len(paths)} images", total=len(paths))
    try:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            for i, (arr, why) in enumerate(
                pool.map(_decode_one, [(p, size, channels) for p in paths], chunksize=16)
            ):
                if arr is None:
                    ok[i] = False
                    reasons[i] = why
                else:
                    out[i] = arr
                if progress is not None:
                    progress.advance(task)
    finally:
        if progress is not None:
            progress.stop()
    return out, ok, reasons


def load_images(
    paths: Sequence[Path | str],
    size: int,
    channels: int,
    cache_dir: Path | None | str = "default",
    skip_bad: bool = False,
) -> tuple[np.ndarray, list[tuple[Path, str]]]:
    """uint8 (N, C, size, size) for the readable images, and the bad ones as (path, reason).

    Without skip_bad the first bad image raises; with it, bad images are left out (the array
    keeps the order of the good ones). cache_dir=None: no disk cache.
    """
    import time

    t0 = time.perf_counter()
    paths = [Path(p) for p in paths]
    if cache_dir == "default":
        cache_dir = default_cache_dir()
    key = dataset_key(paths, size, channels)
    hit = _memory.get(key)
    event = "memory"
    if hit is None and cache_dir is not None:
        hit = _load_disk(Path(cache_dir), key, paths)
        event = "disk"
    if hit is None:
        event = "decoded"
        arr, ok, reasons = _decode_all(paths, size, channels)
        bad = [(paths[i], reasons[i]) for i in sorted(reasons)]
        if not ok.all():
            arr = arr[ok]
        hit = (arr, bad)
        if cache_dir is not None:
            _save_disk(Path(cache_dir), key, arr, ok)
    _memory[key] = hit
    last.event, last.key, last.seconds = event, key, time.perf_counter() - t0
    arr, bad = hit
    if bad and not skip_bad:
        p, why = bad[0]
        more = f" (and {len(bad) - 1} more; --skip-bad skips them)" if len(bad) > 1 else ""
        raise CxrlabError(f"{p}: {why}{more}")
    return arr, list(bad)


def _load_disk(cache_dir: Path, key: str, paths: list[Path]):
    f = cache_dir / f"{key}.npz"
    if not f.is_file():
        return None
    try:
        with np.load(f) as z:
            arr, ok = z["images"], z["ok"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache file is rebuilt, never trusted
    if len(ok) != len(paths):
        return None
    bad = [(paths[i], "unreadable image (cached result)") for i in np.flatnonzero(~ok)]
    if bad:
        # Re-read bad files for their exact reason: there are few of them.
        bad = [(p, _decode_one((p, arr.shape[-1], arr.shape[1]))[1] or why) for p, why in bad]
    return arr, bad


def _save_disk(cache_dir: Path, key: str, arr: np.ndarray, ok: np.ndarray) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".npz")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, images=arr, ok=ok)
        os.replace(tmp, cache_dir / f"{key}.npz")
    except OSError as e:  # a cache is an optimisation: never fail a run for it
        log.warning("could not write image cache in %s (%s)", cache_dir, e.strerror)
