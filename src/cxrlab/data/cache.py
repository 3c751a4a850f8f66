"""Decode and resize once: uint8 arrays, cached in memory and on disk.

Decoding thousands of images every run is what made the notebooks slow. The disk key is the
files' contents (not their names or times), the size, the channels, the bit-depth rule for
16-bit images (images.BitDepth) and FORMAT_VERSION, so a renamed copy hits and an edited file
misses. Per key the cache dir holds `<key>.npy` (the
readable images, opened memory-mapped copy-on-write: a warm load reads nothing up front) and
`<key>.json` (which files were bad and why); both are written to a temp file and renamed.

`last` (a CacheInfo) says how the latest `load_images` call was served: "memory", "disk" or
"decoded". The returned array may be shared with the cache: do not modify it in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrlab.data.images import NO_RUN, BitDepth, read_image
from cxrlab.errors import CxrlabError
from cxrlab.progress import progress_bar

log = logging.getLogger("cxrlab")
FORMAT_VERSION = 3  # bump when decoding changes what a cached array holds
PROGRESS_MIN_IMAGES = 200
MEMORY_ENTRIES = 4  # in-process cache: the few most recent datasets
_DEFAULT = object()

Bad = list[tuple[Path, str]]
_memory: OrderedDict[str, tuple[np.ndarray, list[tuple[int, str]]]] = OrderedDict()


@dataclass
class CacheInfo:
    """How the last `load_images` call was served: 'memory', 'disk' or 'decoded'."""

    event: str = ""
    key: str = ""
    seconds: float = 0.0
    n_images: int = 0
    n_bad: int = 0
    file: Path | None = None  # the .npy, when the disk cache is on


last = CacheInfo()


def default_cache_dir() -> Path:
    return Path(os.environ.get("CXRLAB_CACHE") or Path.home() / ".cache" / "cxrlab")


def n_workers() -> int:
    """CPUs this process may use (a container's share, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 2


def _digest(path: Path) -> bytes:
    try:
        return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()
    except OSError as e:  # decoding will report it; the key must still change if it appears
        return f"unreadable:{path}:{e.errno}".encode()


def dataset_key(paths: Sequence[Path], size: int, channels: int,
                bit_depth: BitDepth = NO_RUN) -> str:
    """Hash of every file's bytes (in order), the size, the channels, the bit-depth rule and
    the format version."""
    with ThreadPoolExecutor(max_workers=n_workers()) as pool:
        digests = list(pool.map(_digest, paths))
    h = hashlib.blake2b(digest_size=20)
    h.update(f"cxrlab-images v{FORMAT_VERSION}|{size}|{channels}|{bit_depth.key()}|"
             f"{len(paths)}|".encode())
    for d in digests:
        h.update(d)
    return h.hexdigest()


def _reason(path: Path, e: CxrlabError) -> str:
    msg, prefix = str(e), f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


def _decode_one(path: Path, size: int, channels: int,
                bit_depth: BitDepth) -> tuple[np.ndarray | None, str | None]:
    try:
        return read_image(path, channels, size, bit_depth), None
    except CxrlabError as e:
        return None, _reason(path, e)


def _decode_all(paths: Sequence[Path], size: int, channels: int, bit_depth: BitDepth):
    """Thread pool: PIL releases the GIL while decoding and resizing."""
    out = np.zeros((len(paths), channels, size, size), dtype=np.uint8)
    bad: list[tuple[int, str]] = []
    with progress_bar(f"decoding {len(paths)} images at {size} px", len(paths),
                      show=len(paths) > PROGRESS_MIN_IMAGES) as advance:
        with ThreadPoolExecutor(max_workers=n_workers()) as pool:
            results = pool.map(lambda p: _decode_one(p, size, channels, bit_depth), paths)
            for i, (arr, why) in enumerate(results):
                if arr is None:
                    bad.append((i, why))
                else:
                    out[i] = arr
                advance()
    if bad:
        keep = np.ones(len(paths), dtype=bool)
        keep[[i for i, _ in bad]] = False
        out = out[keep]
    return out, bad


def load_images(
    paths: Sequence[Path | str],
    size: int,
    channels: int,
    cache_dir: Path | str | None = _DEFAULT,  # type: ignore[assignment]
    skip_bad: bool = False,
    bit_depth: BitDepth | None = None,
) -> tuple[np.ndarray, Bad]:
    """uint8 (N, C, size, size) for the readable images, and the bad ones as (path, reason).

    Without skip_bad the first bad image raises (after the rest are decoded and cached, so a
    rerun with skip_bad is instant); with it, bad images are left out and the array keeps the
    order of the good ones. cache_dir defaults to `default_cache_dir()`; None: no disk cache.
    `bit_depth`: how 16-bit images become 8-bit, the run's rule (None: outside any run).
    """
    t0 = time.perf_counter()
    if channels not in (1, 3):
        raise CxrlabError(f"--channels {channels}: must be 1 or 3")
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise CxrlabError(f"--image-size {size}: must be a whole number of pixels >= 16")
    paths = [Path(p) for p in paths]
    if cache_dir is _DEFAULT:
        cache_dir = default_cache_dir()
    bit_depth = bit_depth or NO_RUN
    key = dataset_key(paths, size, channels, bit_depth)
    file = Path(cache_dir) / f"{key}.npy" if cache_dir is not None else None
    event = "memory"
    hit = _memory.get(key)
    if hit is None and file is not None:
        hit = _load_disk(file, len(paths))
        event = "disk"
    if hit is None:
        event = "decoded"
        hit = _decode_all(paths, size, channels, bit_depth)
        if file is not None:
            _save_disk(file, *hit, n=len(paths))
        log.info("decoded %d images at %d px in %.1f s", len(paths), size,
                 time.perf_counter() - t0)
    _memory[key] = hit
    _memory.move_to_end(key)
    while len(_memory) > MEMORY_ENTRIES:
        _memory.popitem(last=False)
    arr, bad_idx = hit
    bad = [(paths[i], why) for i, why in bad_idx]
    last.event, last.key, last.seconds = event, key, time.perf_counter() - t0
    last.n_images, last.n_bad, last.file = len(arr), len(bad), file
    if bad and not skip_bad:
        p, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        them = "them" if len(bad) > 1 else "it"
        raise CxrlabError(f"{p}: {why}{more}; --skip-bad lists and leaves {them} out")
    return arr, bad


def _load_disk(file: Path, n: int):
    meta_file = file.with_suffix(".json")
    if not (file.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        bad = [(int(i), str(why)) for i, why in meta["bad"]]
        # copy-on-write: writable for the caller, the file itself is never changed
        arr = np.asarray(np.load(file, mmap_mode="c"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring damaged image cache %s (%s)", file, e)
        return None
    if meta.get("n") != n or arr.dtype != np.uint8 or arr.ndim != 4 or len(arr) + len(bad) != n:
        return None  # never trust a cache that does not fit
    return arr, bad


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_disk(file: Path, arr: np.ndarray, bad: list[tuple[int, str]], n: int) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT_VERSION, "n": n, "shape": list(arr.shape), "bad": bad}
        # the .npy last: a reader needs both, and a same-key pair always agrees
        _atomic_write(file.with_suffix(".json"), lambda fh: fh.write(json.dumps(meta).encode()))
        _atomic_write(file, lambda fh: np.save(fh, arr, allow_pickle=False))
    except OSError as e:  # a cache is an optimisation: never fail a run for it
        log.warning("could not write image cache in %s (%s)", file.parent, e.strerror or e)
