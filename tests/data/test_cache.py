"""cxrlab.data.cache: decode once, hit in memory and on disk, key on contents, skip bad files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from cxrlab.data import cache as cache_mod
from cxrlab.data.cache import default_cache_dir, load_images
from cxrlab.data.images import read_image
from cxrlab.data.sources import load_source
from cxrlab.errors import CxrlabError


@pytest.fixture(autouse=True)
def _empty_memory_cache():
    cache_mod._memory.clear()
    yield
    cache_mod._memory.clear()


@pytest.fixture
def paths(kermany_folder):
    return [r.path for r in load_source(kermany_folder).records]


def _cache_files(d):
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_decoded_then_disk_then_memory(paths, tmp_path):
    d = tmp_path / "c"
    a, bad = load_images(paths, 32, 1, cache_dir=d)
    assert cache_mod.last.event == "decoded" and not bad
    assert a.shape == (24, 1, 32, 32) and a.dtype == np.uint8
    assert np.array_equal(a[5], read_image(paths[5], 1, 32))  # same as decoding one by one
    key = cache_mod.last.key
    assert _cache_files(d) == [f"{key}.json", f"{key}.npy"]  # no temp files left behind
    cache_mod._memory.clear()  # as a new process would start
    b, _ = load_images(paths, 32, 1, cache_dir=d)
    assert cache_mod.last.event == "disk" and np.array_equal(a, b) and b.flags.writeable
    c, _ = load_images([str(p) for p in paths], 32, 1, cache_dir=d)
    assert cache_mod.last.event == "memory" and np.array_equal(a, c)
    assert type(b) is np.ndarray  # a plain array, even when memory-mapped


def test_key_is_contents_size_and_channels(paths, tmp_path):
    d = tmp_path / "c"
    a, _ = load_images(paths, 32, 1, cache_dir=d)
    copies = []
    for p in paths:  # renamed copies of the same bytes hit
        copies.append(tmp_path / "copy" / f"renamed_{p.name}")
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(p, copies[-1])
    cache_mod._memory.clear()
    assert np.array_equal(load_images(copies, 32, 1, cache_dir=d)[0], a)
    assert cache_mod.last.event == "disk"
    rgb, _ = load_images(paths, 32, 3, cache_dir=d)
    assert cache_mod.last.event == "decoded" and rgb.shape == (24, 3, 32, 32)
    small, _ = load_images(paths, 24, 1, cache_dir=d)
    assert cache_mod.last.event == "decoded" and small.shape == (24, 1, 24, 24)
    reordered, _ = load_images(paths[::-1], 32, 1, cache_dir=d)
    assert cache_mod.last.event == "decoded" and np.array_equal(reordered, a[::-1])


def test_changed_file_content_invalidates(paths, tmp_path):
    d = tmp_path / "c"
    a, _ = load_images(paths, 32, 1, cache_dir=d)
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(paths[0])  # same name, new pixels
    cache_mod._memory.clear()
    b, _ = load_images(paths, 32, 1, cache_dir=d)
    assert cache_mod.last.event == "decoded"
    assert b[0].max() == 0 and a[0].max() > 0 and np.array_equal(a[1:], b[1:])
    c, _ = load_images(paths, 32, 1, cache_dir=d)  # and the in-memory entry is keyed the same
    assert cache_mod.last.event == "memory" and c[0].max() == 0


def test_no_disk_cache_and_default_dir(paths, tmp_path, monkeypatch):
    load_images(paths, 32, 1, cache_dir=None)
    assert cache_mod.last.event == "decoded" and cache_mod.last.file is None
    load_images(paths, 32, 1, cache_dir=None)
    assert cache_mod.last.event == "memory"
    monkeypatch.setenv("CXRLAB_CACHE", str(tmp_path / "env-cache"))
    assert default_cache_dir() == tmp_path / "env-cache"
    load_images(paths, 20, 1)
    assert cache_mod.last.file.parent == tmp_path / "env-cache" and cache_mod.last.file.is_file()


def test_bad_files_raise_or_are_skipped(paths, tmp_path):
    d = tmp_path / "c"
    paths[3].write_text("broken")
    paths[7].write_bytes(b"")
    with pytest.raises(CxrlabError, match=rf"{paths[3].name}: not an image .*and 1 more"):
        load_images(paths, 32, 1, cache_dir=d)
    arr, bad = load_images(paths, 32, 1, cache_dir=d, skip_bad=True)
    assert cache_mod.last.event == "memory"  # the failed call already decoded and cached
    assert [p for p, _ in bad] == [paths[3], paths[7]]
    assert "not an image" in bad[0][1] and "empty" in bad[1][1] and str(paths[3]) not in bad[0][1]
    good = [p for i, p in enumerate(paths) if i not in (3, 7)]
    assert len(arr) == 22
    assert all(np.array_equal(arr[i], read_image(p, 1, 32)) for i, p in enumerate(good))
    cache_mod._memory.clear()
    arr2, bad2 = load_images(paths, 32, 1, cache_dir=d, skip_bad=True)
    assert cache_mod.last.event == "disk" and bad2 == bad and np.array_equal(arr, arr2)
    with pytest.raises(CxrlabError, match="and 1 more"):  # still raises without skip_bad
        load_images(paths, 32, 1, cache_dir=d)


def test_damaged_cache_is_rebuilt(paths, tmp_path, caplog):
    d = tmp_path / "c"
    a, _ = load_images(paths, 32, 1, cache_dir=d)
    npy = cache_mod.last.file
    npy.write_bytes(npy.read_bytes()[:200])
    cache_mod._memory.clear()
    b, _ = load_images(paths, 32, 1, cache_dir=d)
    assert cache_mod.last.event == "decoded" and np.array_equal(a, b)
    assert "damaged image cache" in caplog.text
    cache_mod._memory.clear()
    load_images(paths, 32, 1, cache_dir=d)
    assert cache_mod.last.event == "disk"  # rewritten whole


def test_unwritable_cache_dir_only_warns(paths, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    a, _ = load_images(paths, 32, 1, cache_dir=blocker / "c")
    assert len(a) == 24 and "could not write image cache" in caplog.text


def test_bad_arguments(paths):
    with pytest.raises(CxrlabError, match="--channels 2"):
        load_images(paths, 32, 2, cache_dir=None)
    with pytest.raises(CxrlabError, match="--image-size 8"):
        load_images(paths, 8, 1, cache_dir=None)


def test_empty_list(tmp_path):
    a, bad = load_images([], 32, 1, cache_dir=tmp_path / "c")
    assert a.shape == (0, 1, 32, 32) and bad == []


def test_real_kermany_subset(shared_data, tmp_path):
    folder = shared_data / "chest_xray" / "train" / "PNEUMONIA"
    paths = sorted(folder.glob("*.jpeg"))[:40]
    a, _ = load_images(paths, 64, 1, cache_dir=tmp_path / "c")
    assert a.shape == (40, 1, 64, 64) and a.std() > 10
    cache_mod._memory.clear()
    b, _ = load_images(paths, 64, 1, cache_dir=tmp_path / "c")
    assert cache_mod.last.event == "disk" and np.array_equal(a, b)
