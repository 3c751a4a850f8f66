"""Shared fixtures: tiny real image folders written per test, and the shared data when present."""

from __future__ import annotations

import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per worker (pyproject runs a worker per core): two workers spinning on
    # two threads each on 2 cores took twice the CPU time. Set before torch is imported, so the
    # CLI subprocesses a test starts inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tests never read or fill the user's image cache."""
    monkeypatch.setenv("CXRLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cxrlab-cache"))


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data` beside the checkout; tests that need it skip cleanly without it."""
    if not (SHARED_DATA / "chest_xray" / "train").is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


def write_xray_like(path: Path, label: int, rng: np.random.Generator, size: int = 48) -> None:
    """A grey image whose class is visible: positives carry a bright blob (learnable)."""
    img = rng.normal(90, 20, (size, size)).clip(0, 255)
    if label:
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        yy, xx = np.mgrid[:size, :size]
        img += 120 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.clip(0, 255).astype(np.uint8), mode="L").save(path)


def make_kermany_folder(
    root: Path, n_normal: int = 12, n_pneumonia: int = 12, size: int = 48, seed: int = 0,
    images_per_patient: int = 2,
) -> Path:
    """A class-folder set with Kermany-style file names (several images per patient)."""
    rng = np.random.default_rng(seed)
    for i in range(n_normal):
        p = i // images_per_patient
        write_xray_like(root / "NORMAL" / f"IM-{p:04d}-{i % images_per_patient + 1:04d}.png",
                        0, rng, size)
    for i in range(n_pneumonia):
        p = 1000 + i // images_per_patient
        kind = "bacteria" if i % 2 else "virus"
        write_xray_like(root / "PNEUMONIA" / f"person{p}_{kind}_{i}.png", 1, rng, size)
    return root


@pytest.fixture
def kermany_folder(tmp_path: Path) -> Path:
    return make_kermany_folder(tmp_path / "xray")


# One tiny real ablation sweep for the ablate, report and browser tests (session scope: it is
# defined here once, so every module shares the same sweep).
from tests._sweep import tiny_sweep  # noqa: E402, F401
