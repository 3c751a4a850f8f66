"""cxrlab.data.audit: counts, patients, sizes, exact duplicates, leakage, unreadable files."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from cxrlab.data.audit import render_summary, summarize, write_grid
from cxrlab.data.sources import Record, Source, load_source
from tests.conftest import make_kermany_folder


@pytest.fixture
def planted(tmp_path):
    """Split folders with planted copies (other names, other modes) and bad files."""
    root = tmp_path / "d"
    make_kermany_folder(root / "train", 20, 20, size=24, images_per_patient=1)
    normal, pneu = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    src = np.asarray(Image.open(normal / "IM-0003-0001.png"))
    Image.fromarray(src).save(normal / "IM-0950-0001.png")  # same pixels, new name
    (root / "test" / "NORMAL").mkdir(parents=True)
    Image.fromarray(np.stack([src] * 3, -1)).save(root / "test" / "NORMAL" / "IM-0900-0001.png")
    Image.open(normal / "IM-0005-0001.png").save(pneu / "person9000_virus_1.png")  # label clash
    near = np.asarray(Image.open(normal / "IM-0007-0001.png")).copy()
    near[0, 0] ^= 1  # one pixel off: not an exact duplicate
    Image.fromarray(near).save(normal / "IM-0960-0001.png")
    Image.fromarray(np.full((30, 40), 90, np.uint8)).save(normal / "IM-0970-0001.png")
    (pneu / "person9001_virus_2.png").write_text("junk")
    (pneu / "person9002_virus_3.jpeg").write_bytes(b"")
    (pneu / "person9003_virus_4.png").write_bytes(b"")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(pneu / "person9004_virus_5.png")
    return root


def _names(paths):
    return sorted(p.rsplit("/", 1)[-1] for p in paths)


def test_duplicates_leakage_and_unreadable(planted):
    s = summarize(load_source(planted), seed=0)
    assert s.kind == "split_folders" and s.classes == ["NORMAL", "PNEUMONIA"]
    assert [_names(d) for d in s.duplicate_sets] == [
        ["IM-0003-0001.png", "IM-0900-0001.png", "IM-0950-0001.png"],
        ["IM-0005-0001.png", "person9000_virus_1.png"],
    ]
    assert len(s.cross_split_duplicates) >= 1
    leak = next(d for d in s.cross_split_duplicates if any("IM-0900" in p for p in d))
    assert any(p.startswith("test:") and p.endswith("IM-0900-0001.png") for p in leak)
    [clash] = s.cross_class_duplicates
    assert [(p.split(":", 1)[0], p.rsplit("/", 1)[1]) for p in clash] == [
        ("NORMAL", "IM-0005-0001.png"), ("PNEUMONIA", "person9000_virus_1.png")]
    bad = dict((p.rsplit("/", 1)[-1], why) for p, why in s.unreadable)
    assert sorted(bad) == ["person9001_virus_2.png", "person9002_virus_3.jpeg",
                           "person9003_virus_4.png", "person9004_virus_5.png"]
    assert "not an image" in bad["person9001_virus_2.png"]
    assert "empty" in bad["person9002_virus_3.jpeg"]
    assert "smaller than 16 px" in bad["person9004_virus_5.png"]


def test_counts_patients_sizes(planted):
    s = summarize(load_source(planted), seed=0)
    assert s.n_images == 40 + 4 + 1
    assert sum(sum(c.values()) for c in s.counts.values()) == s.n_images
    assert list(s.counts) == ["train", "val", "test"]
    assert s.counts["test"] == {"NORMAL": 1, "PNEUMONIA": 0}
    assert s.patients["test"] == {"NORMAL": 1, "PNEUMONIA": 0}
    assert s.grouped and "grouped by patient" in s.split_message
    assert 0 < sum(s.counts["val"].values()) < sum(s.counts["train"].values())
    # one image per patient here: patients == images in every cell
    assert s.patients == s.counts
    assert s.sizes["width"] == {"min": 24, "median": 24.0, "max": 40}
    assert s.sizes["height"] == {"min": 24, "median": 24.0, "max": 30}
    assert s.sizes["modes"] == {"L": 44, "RGB": 1} and s.sizes["formats"] == {"PNG": 45}


def test_patients_counted_per_split(tmp_path):
    root = make_kermany_folder(tmp_path / "d", 12, 12, size=20, images_per_patient=3)
    s = summarize(load_source(root), seed=0)
    total_patients = sum(sum(c.values()) for c in s.patients.values())
    assert total_patients == 8  # 4 + 4 patients, none counted twice
    assert all(s.counts[sp][c] == 3 * s.patients[sp][c] for sp in s.counts for c in s.classes)


def test_splits_match_training_and_seed(planted):
    a = summarize(load_source(planted), seed=0)
    b = summarize(load_source(planted), seed=0)
    assert a == b
    others = [summarize(load_source(planted), seed=k).counts for k in (1, 2, 3)]
    assert any(o != a.counts for o in others)
    assert summarize(load_source(planted), val_fraction=0.5).counts["val"] != a.counts["val"]


def test_json_and_render(planted):
    s = summarize(load_source(planted))
    d = json.loads(json.dumps(s.to_dict()))
    assert d["duplicate_sets"] == s.duplicate_sets and len(d["unreadable"]) == 4
    buf = io.StringIO()
    render_summary(s, Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    for needle in ("NORMAL", "val patients", "2 set(s), 3 redundant image(s)",
                   "Duplicates across splits (leakage): 1", "Duplicates with different labels: 1",
                   "Unreadable files: 4", "person9001_virus_2.png", "IM-0950-0001.png"):
        assert needle in out, needle


def test_audit_never_raises(tmp_path):
    one = make_kermany_folder(tmp_path / "one", 1, 0)
    s = summarize(load_source(one))  # too few images to hold out validation
    assert s.n_images == 1 and "no validation split" in s.split_message
    bad = tmp_path / "bad" / "A"
    bad.mkdir(parents=True)
    (bad / "x.png").write_text("junk")
    s = summarize(load_source(tmp_path / "bad"))
    assert s.n_images == 0 and s.counts == {} and len(s.unreadable) == 1 and not s.sizes
    render_summary(s, Console(file=io.StringIO()))


def test_real_kermany_duplicates(shared_data):
    """Known exact duplicates in the Kermany training set (found by the full-set audit)."""
    folder = shared_data / "chest_xray" / "train" / "PNEUMONIA"
    dups = [["person1261_virus_2147.jpeg", "person1261_virus_2148.jpeg"],
            ["person1372_bacteria_3501.jpeg", "person1372_bacteria_3502.jpeg",
             "person1372_bacteria_3503.jpeg"]]
    others = ["person1261_virus_2149.jpeg", "person1000_virus_1681.jpeg",
              "person1372_bacteria_3504.jpeg"]
    names = [n for n in sum(dups, []) + others if (folder / n).exists()]
    if len(names) < 6:
        pytest.skip("reference files not present")
    recs = [Record(folder / n, "PNEUMONIA") for n in names]
    s = summarize(Source(folder, "class_folders", recs, ["PNEUMONIA"]))
    assert [_names(d) for d in s.duplicate_sets] == dups
    assert not s.cross_split_duplicates  # same patient: the grouped split keeps them together
    assert s.sizes["modes"] == {"RGB": len(names)} and not s.unreadable


def test_real_duplicates_survive_renaming(shared_data, tmp_path):
    folder = shared_data / "chest_xray" / "train" / "PNEUMONIA"
    a = folder / "person124_virus_246.jpeg"
    if not a.exists():
        pytest.skip("reference file not present")
    (tmp_path / "d" / "X").mkdir(parents=True)
    (tmp_path / "d" / "Y").mkdir(parents=True)
    shutil.copy(a, tmp_path / "d" / "X" / "one.jpeg")
    Image.open(a).convert("L").save(tmp_path / "d" / "Y" / "two.png")  # other format, grey
    s = summarize(load_source(tmp_path / "d"))
    assert [_names(d) for d in s.duplicate_sets] == [["one.jpeg", "two.png"]]
    assert len(s.cross_class_duplicates) == 1


def test_grid(kermany_folder, tmp_path):
    (kermany_folder / "NORMAL" / "IM-0999-0001.png").write_text("junk")  # skipped, not fatal
    out = write_grid(load_source(kermany_folder), tmp_path / "sub" / "g.png", "notebook",
                     size=48, per_class=3)
    im = Image.open(out)
    assert out == tmp_path / "sub" / "g.png" and im.format == "PNG"
    assert im.size == (600, 840)  # 3 columns x (2 classes x original/augmented) rows
    a = np.asarray(im.convert("L"))
    assert a.std() > 10  # pictures drawn, not a blank canvas
