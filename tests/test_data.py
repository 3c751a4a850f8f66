"""cxrlab.data: sources, decoding, cache, grouped split, audit, on tiny real files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxrlab.data import cache as cache_mod
from cxrlab.data.audit import summarize, write_grid
from cxrlab.data.images import guess_channels, read_image
from cxrlab.data.sources import load_source, require_trainable
from cxrlab.data.split import assign_splits, patient_key, read_split_csv, write_split_csv
from cxrlab.errors import CxrlabError
from tests.conftest import make_kermany_folder

# -- sources ----------------------------------------------------------------------------


def test_class_folders(kermany_folder):
    s = load_source(kermany_folder)
    assert s.kind == "class_folders" and s.classes == ["NORMAL", "PNEUMONIA"]
    assert len(s.records) == 24 and all(r.split is None for r in s.records)
    assert all(r.path.is_absolute() for r in s.records)


def test_split_folders(tmp_path):
    make_kermany_folder(tmp_path / "d" / "train", 6, 6)
    make_kermany_folder(tmp_path / "d" / "test", 2, 2, seed=1)
    (tmp_path / "d" / "train" / "NORMAL" / "notes.txt").write_text("ignored")
    s = load_source(tmp_path / "d")
    assert s.kind == "split_folders"
    assert sorted({r.split for r in s.records}) == ["test", "train"]
    assert sum(r.split == "test" for r in s.records) == 4 and len(s.records) == 16


def test_csv_source_with_bom_and_duplicate_rows(kermany_folder):
    rows = [f"{p.relative_to(kermany_folder)},{p.parent.name}"
            for p in sorted(kermany_folder.rglob("*.png"))]
    csv = kermany_folder / "meta.csv"
    csv.write_text("\ufeffimage,label\r\n" + "\r\n".join(rows + rows[:2]) + "\r\n")
    s = load_source(csv, "image", "label")
    assert s.kind == "csv" and len(s.records) == 24 and s.classes == ["NORMAL", "PNEUMONIA"]


def test_real_coronahack_csv(shared_data):
    s = load_source(shared_data / "chest_xray" / "metadata.csv", "X_ray_image_name", "Label")
    assert s.classes == ["Normal", "Pnemonia"]
    assert len(s.records) == 5216
    assert sum(r.label == "Normal" for r in s.records) == 1341


def test_source_errors(tmp_path, kermany_folder):
    with pytest.raises(CxrlabError, match="no such"):
        load_source(tmp_path / "missing")
    (kermany_folder / "EMPTY").mkdir()
    with pytest.raises(CxrlabError, match="EMPTY"):
        load_source(kermany_folder)
    one = make_kermany_folder(tmp_path / "one", 3, 0)
    (one / "PNEUMONIA").rmdir() if (one / "PNEUMONIA").exists() else None
    with pytest.raises(CxrlabError, match="2 classes"):
        require_trainable(load_source(one))


# -- images -----------------------------------------------------------------------------


def _save(tmp_path, name, arr, mode=None, **kw):
    p = tmp_path / name
    Image.fromarray(arr, mode=mode).save(p, **kw) if mode else Image.fromarray(arr).save(p, **kw)
    return p


def test_modes_decode_to_expected_channels(tmp_path):
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    rgb = np.stack([grey] * 3, -1)
    rgba = np.concatenate([rgb, np.full((64, 64, 1), 255, np.uint8)], -1)
    p16 = tmp_path / "x16.png"
    Image.fromarray(grey.astype(np.uint16) * 16).save(p16)  # 12-bit values in a 16-bit PNG
    cmyk = tmp_path / "c.jpg"
    Image.fromarray(rgb).convert("CMYK").save(cmyk)
    for p in [_save(tmp_path, "g.png", grey), _save(tmp_path, "rgb.jpg", rgb, quality=95),
              _save(tmp_path, "rgba.png", rgba), p16, cmyk]:
        a = read_image(p, 1, 32)
        assert a.shape == (1, 32, 32) and a.dtype == np.uint8
        assert a[0, :, -1].mean() > a[0, :, 0].mean() + 150, p  # the gradient survives
        assert read_image(p, 3, 32).shape == (3, 32, 32)
    assert guess_channels([p16, cmyk]) == 1
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 0] = 255
    assert guess_channels([_save(tmp_path, "red.png", colour)]) == 3


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_text("hello, not a png"), "not an image"),
    (lambda p: Image.fromarray(np.zeros((8, 40), np.uint8)).save(p, format="PNG"), "smaller"),
])
def test_bad_images(tmp_path, make, needle):
    p = tmp_path / "bad.png"
    make(p)
    with pytest.raises(CxrlabError, match=needle) as e:
        read_image(p, 1, 32)
    assert str(p) in str(e.value)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(buf, "JPEG")
    p = tmp_path / "t.jpeg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(CxrlabError, match="t.jpeg"):
        read_image(p, 1, 32)


def test_png_named_jpg_is_read_by_content(tmp_path):
    p = tmp_path / "really_png.jpg"
    Image.fromarray(np.full((20, 20), 200, np.uint8)).save(p, format="PNG")
    assert read_image(p, 1, 16).mean() == pytest.approx(200, abs=1)


# -- cache ------------------------------------------------------------------------------


def test_cache_hits_and_invalidates_on_content(kermany_folder, tmp_path):
    paths = [r.path for r in load_source(kermany_folder).records]
    cache_mod._memory.clear()
    a, bad = cache_mod.load_images(paths, 32, 1, cache_dir=tmp_path / "c")
    assert cache_mod.last.event == "decoded" and a.shape == (24, 1, 32, 32) and not bad
    cache_mod._memory.clear()
    b, _ = cache_mod.load_images(paths, 32, 1, cache_dir=tmp_path / "c")
    assert cache_mod.last.event == "disk" and np.array_equal(a, b)
    c, _ = cache_mod.load_images(paths, 32, 1, cache_dir=tmp_path / "c")
    assert cache_mod.last.event == "memory" and np.array_equal(a, c)
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(paths[0])
    d, _ = cache_mod.load_images(paths, 32, 1, cache_dir=tmp_path / "c")
    assert cache_mod.last.event == "decoded" and d[0].max() == 0 and np.array_equal(a[1:], d[1:])
    e, _ = cache_mod.load_images(paths, 24, 1, cache_dir=tmp_path / "c")
    assert cache_mod.last.event == "decoded" and e.shape[-1] == 24


def test_cache_skip_bad(kermany_folder, tmp_path):
    paths = [r.path for r in load_source(kermany_folder).records]
    paths[3].write_text("broken")
    with pytest.raises(CxrlabError, match=paths[3].name):
        cache_mod.load_images(paths, 32, 1, cache_dir=tmp_path / "c")
    arr, bad = cache_mod.load_images(paths, 32, 1, cache_dir=tmp_path / "c", skip_bad=True)
    assert len(arr) == 23 and [p for p, _ in bad] == [paths[3]]


# -- split ------------------------------------------------------------------------------


@pytest.mark.parametrize("name, key", [
    ("person123_bacteria_456.jpeg", "person123"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("scan_77.png", None),
])
def test_kermany_patient_keys(name, key):
    assert patient_key(name) == key


def test_custom_group_regex():
    assert patient_key("pat-17_view2.png", r"pat-(\d+)_") == "17"
    assert patient_key("other.png", r"pat-(\d+)_") is None


def _many_patients(tmp_path):
    return load_source(make_kermany_folder(tmp_path / "m", 60, 90, size=20, images_per_patient=3))


def test_grouped_split_no_patient_in_two_splits(tmp_path):
    s = _many_patients(tmp_path)
    r = assign_splits(s, 0.2, seed=0)
    assert r.grouped
    where = {}
    for g, sp in zip(r.groups, r.splits, strict=True):
        where.setdefault(g, set()).add(sp)
    assert all(len(v) == 1 for v in where.values())
    val = [rec.label for rec, sp in zip(s.records, r.splits, strict=True) if sp == "val"]
    assert 0.15 <= len(val) / len(s.records) <= 0.25
    assert 0.3 <= val.count("NORMAL") / len(val) <= 0.5  # stratified (40% normal overall)
    assert assign_splits(s, 0.2, seed=0).splits == r.splits
    assert assign_splits(s, 0.2, seed=1).splits != r.splits
    p = tmp_path / "split.csv"
    write_split_csv(p, s, r)
    rows = read_split_csv(p)
    assert [row["split"] for row in rows] == r.splits and rows[0]["patient"]


def test_ungrouped_fallback_says_so(tmp_path):
    rng = np.random.default_rng(0)
    for c in ["a", "b"]:
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8)).save(
                tmp_path / "d" / c / f"{i}.png")
    r = assign_splits(load_source(tmp_path / "d"), 0.2, seed=0)
    assert not r.grouped and "not grouped" in r.message
    assert r.splits.count("val") == 4


# -- audit ------------------------------------------------------------------------------


def test_audit_finds_duplicates_leakage_and_bad_files(tmp_path):
    root = make_kermany_folder(tmp_path / "d", 30, 30, size=24, images_per_patient=1)
    src = root / "NORMAL" / "IM-0003-0001.png"
    # same pixels under another name and format (another patient): a duplicate
    Image.open(src).save(root / "NORMAL" / "IM-0950-0001.png")
    Image.open(src).save(root / "PNEUMONIA" / "person9000_virus_1.png")
    (root / "PNEUMONIA" / "person9001_virus_2.png").write_text("junk")
    s = summarize(load_source(root))
    dup = [d for d in s.duplicate_sets if any("IM-0003-0001" in p for p in d)]
    assert len(dup) == 1 and len(dup[0]) == 3
    assert len(s.duplicate_sets) == 1
    assert len(s.unreadable) == 1 and "person9001" in s.unreadable[0][0]
    assert sum(sum(c.values()) for c in s.counts.values()) == 62
    # leakage is reported when the copies land in different splits
    for seed in range(20):
        s = summarize(load_source(root), seed=seed)
        if s.cross_split_duplicates:
            break
    assert s.cross_split_duplicates and "val:" in " ".join(s.cross_split_duplicates[0])


def test_audit_finds_real_kermany_duplicates(shared_data):
    """A known exact-duplicate pair in the Kermany training set (found by the full audit)."""
    from cxrlab.data.sources import Record, Source

    folder = shared_data / "chest_xray" / "train" / "PNEUMONIA"
    names = ["person1261_virus_2147.jpeg", "person1261_virus_2148.jpeg",
             "person1000_virus_1681.jpeg"]
    names = [n for n in names if (folder / n).exists()]
    if len(names) < 3:
        pytest.skip("reference pair not present")
    recs = [Record(folder / n, "PNEUMONIA") for n in names]
    s = summarize(Source(folder, "class_folders", recs, ["PNEUMONIA"]))
    assert [sorted(p.rsplit("/", 1)[1] for p in d) for d in s.duplicate_sets] == [names[:2]]


def test_grid_shows_originals_and_augmented(kermany_folder, tmp_path):
    out = write_grid(load_source(kermany_folder), tmp_path / "g.png", "notebook", size=48)
    im = Image.open(out)
    assert im.size[0] >= 400 and im.size[1] >= 400
