"""cxrlab.data.split: patient keys, grouped stratified seeded splits, the split CSV."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cxrlab.data.sources import Record, Source, load_source
from cxrlab.data.split import (
    NOT_GROUPED,
    assign_splits,
    patient_key,
)
from cxrlab.errors import CxrlabError
from cxrlab.run import read_split_csv, write_split_csv
from tests.conftest import make_kermany_folder


@pytest.mark.parametrize("name, key", [
    ("person123_bacteria_456.jpeg", "person123"),
    ("person1000_virus_1681.jpeg", "person1000"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("IM-0467-0001-0002.jpeg", "IM-0467"),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427"),
    ("/data/train/NORMAL/NORMAL2-IM-0587-0001-0001.jpeg", "NORMAL2-IM-0587"),
    ("scan_77.png", None),
    ("IM-0115.png", None),
    ("xperson1_virus_2.jpeg", None),
])
def test_kermany_patient_keys(name, key):
    assert patient_key(name) == key
    assert patient_key(Path(name)) == key


def test_custom_group_regex():
    assert patient_key("pat-17_view2.png", r"pat-(\d+)_") == "17"  # first group
    assert patient_key("a/pat-17_view2.png", r"pat-\d+") == "pat-17"  # whole match
    assert patient_key("case_pat-3_x.png", r"pat-(\d+)") == "3"  # search, not match
    assert patient_key("other.png", r"pat-(\d+)_") is None
    assert patient_key("person1_virus_2.jpeg", r"pat-(\d+)") is None  # replaces Kermany rule
    with pytest.raises(CxrlabError, match=r"--group-regex 'pat-\(': not a valid"):
        patient_key("x.png", "pat-(")


def _fake_source(items, given=None):
    """(file name, label) pairs; assign_splits reads names only, so no files are needed."""
    given = given or [None] * len(items)
    recs = [Record(Path("/d") / lab / name, lab, sp)
            for (name, lab), sp in zip(items, given, strict=True)]
    return Source(Path("/d"), "class_folders", recs, sorted({r.label for r in recs}))


def _kermany_like(n_normal=60, n_pneu=90, per_patient=3):
    items = [(f"IM-{i // per_patient:04d}-{i % per_patient + 1:04d}.jpeg", "NORMAL")
             for i in range(n_normal)]
    items += [(f"person{1000 + i // per_patient}_virus_{i}.jpeg", "PNEUMONIA")
              for i in range(n_pneu)]
    return _fake_source(items)


def _no_group_in_two_splits(result):
    where = defaultdict(set)
    for g, s in zip(result.groups, result.splits, strict=True):
        if g:
            where[g].add(s)
    return all(len(v) == 1 for v in where.values())


def test_grouped_split_is_stratified_seeded_and_never_splits_a_patient():
    s = _kermany_like()
    r = assign_splits(s, 0.2, seed=0)
    assert r.grouped and "split grouped by patient (50 patients)" in r.message
    assert r.groups[0] == "IM-0000" and r.groups[-1] == "person1029"
    assert _no_group_in_two_splits(r) and set(r.splits) == {"train", "val"}
    val = [rec.label for rec, sp in zip(s.records, r.splits, strict=True) if sp == "val"]
    assert len(val) == 30  # 1/5 of the patients, 3 images each
    assert Counter(val) == {"NORMAL": 12, "PNEUMONIA": 18}  # 40% normal, as overall
    assert assign_splits(s, 0.2, seed=0) == r
    others = [assign_splits(s, 0.2, seed=k).splits for k in (1, 2, 3)]
    assert all(o != r.splits for o in others)
    assert assign_splits(s, 0.25, seed=0).splits.count("val") != r.splits.count("val")


def _uneven_patients(seed: int = 0):
    """Kermany-like names, 1 to 6 images per patient, 2 classes of unequal size."""
    rng = np.random.default_rng(seed)
    items = []
    for k, (label, n_patients) in enumerate((("NORMAL", 40), ("PNEUMONIA", 70))):
        for p in range(n_patients):
            for i in range(int(rng.integers(1, 7))):
                name = (f"IM-{p:04d}-{i + 1:04d}.jpeg" if k == 0
                        else f"person{p}_virus_{i}.jpeg")
                items.append((name, label))
    return _fake_source(items)


@pytest.mark.parametrize("fraction", [0.3, 0.4, 0.15, 0.35])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_honours_the_fraction_within_a_patient(fraction, seed):
    # round(1 / fraction) folds turned 0.4 into 50% and 0.3 into 33%.
    s = _uneven_patients(seed)
    r = assign_splits(s, fraction, seed=seed)
    assert _no_group_in_two_splits(r)
    sizes = Counter(r.groups)
    labels = [rec.label for rec in s.records]
    val = [lab for lab, sp in zip(labels, r.splits, strict=True) if sp == "val"]
    assert abs(len(val) - fraction * len(labels)) <= max(sizes.values())
    for c in ("NORMAL", "PNEUMONIA"):  # stratified: each class within half a patient
        largest = max(n for g, n in sizes.items() if labels[r.groups.index(g)] == c)
        assert abs(val.count(c) - fraction * labels.count(c)) <= largest / 2
    assert f"validation: {len(val)} of {len(labels)} training images" in r.message
    assert f"--val-fraction {fraction:g}" in r.message
    assert assign_splits(s, fraction, seed=seed) == r
    assert assign_splits(s, fraction, seed=seed + 10).splits != r.splits


def test_whole_fold_fractions_stay_stratified_group_k_fold():
    # 0.2 (the default), 0.25, 0.5: fold 1 of 1/fraction folds, as every earlier run was split
    s = _uneven_patients()
    for fraction, folds in ((0.2, 5), (0.25, 4), (0.5, 2)):
        assert (assign_splits(s, fraction, seed=3).splits
                == assign_splits(s, folds=folds, fold=1, seed=3).splits)


def test_grouped_split_on_written_folder(tmp_path):
    s = load_source(make_kermany_folder(tmp_path / "m", 30, 30, size=20, images_per_patient=3))
    r = assign_splits(s, 0.2, seed=0)
    assert r.grouped and _no_group_in_two_splits(r)
    assert {rec.label for rec, sp in zip(s.records, r.splits, strict=True) if sp == "val"} == \
        {"NORMAL", "PNEUMONIA"}


def test_ungrouped_fallback_says_so(tmp_path):
    rng = np.random.default_rng(0)
    for c, n in (("a", 10), ("b", 30)):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 20), np.uint8)).save(
                tmp_path / "d" / c / f"{i}.png")
    s = load_source(tmp_path / "d")
    r = assign_splits(s, 0.2, seed=0)
    assert not r.grouped and NOT_GROUPED in r.message and "--group-regex" in r.message
    assert r.groups == [""] * 40
    val = [rec.label for rec, sp in zip(s.records, r.splits, strict=True) if sp == "val"]
    assert Counter(val) == {"a": 2, "b": 6}  # stratified
    assert assign_splits(s, 0.2, seed=0).splits == r.splits
    assert assign_splits(s, 0.2, seed=1).splits != r.splits
    # a regex that matches the names groups them after all
    assert assign_splits(s, 0.2, seed=0, group_regex=r"^(\d)").grouped


def _val_sets(source, folds, **kw):
    return [{i for i, sp in enumerate(assign_splits(source, folds=folds, fold=k, **kw).splits)
             if sp == "val"} for k in range(1, folds + 1)]


def test_folds_validate_every_image_once_by_patient_and_class():
    s = _kermany_like()
    vals = _val_sets(s, 5, seed=3)
    assert sum(map(len, vals)) == len(s.records)
    assert set().union(*vals) == set(range(len(s.records)))  # so: disjoint and complete
    for k, val in enumerate(vals, 1):
        r = assign_splits(s, folds=5, fold=k, seed=3)
        assert _no_group_in_two_splits(r) and f"fold {k} of 5" in r.message
        assert Counter(s.records[i].label for i in val) == {"NORMAL": 12, "PNEUMONIA": 18}
    # fold 1 of 5 is the ordinary 1/5 validation split: a fold is not a new kind of split
    assert assign_splits(s, 0.2, seed=3).splits == assign_splits(s, folds=5, fold=1, seed=3).splits
    assert _val_sets(s, 5, seed=4) != vals


def test_ungrouped_folds_are_stratified():
    s = _fake_source([(f"{i}.png", "a" if i < 12 else "b") for i in range(36)])
    vals = _val_sets(s, 4, seed=0)
    assert sorted(i for v in vals for i in v) == list(range(36))
    assert all(Counter(s.records[i].label for i in v) == {"a": 3, "b": 6} for v in vals)


@pytest.mark.parametrize("items, folds, fold, needle", [
    ([(f"person{i // 10}_virus_{i}.jpeg", "P") for i in range(30)]
     + [(f"IM-{i // 10:04d}-0001.jpeg", "N") for i in range(30)], 8, 1, "only 6 patients"),
    ([(f"{i}.png", "a") for i in range(3)] + [(f"b{i}.png", "b") for i in range(30)], 5, 2,
     "a class of /d has only 3"),
    ([(f"{i}.png", "a") for i in range(10)], 5, 6, "fold 6: must be between 1 and --folds (5)"),
])
def test_impossible_folds_are_errors(items, folds, fold, needle):
    with pytest.raises(CxrlabError, match=None) as e:
        assign_splits(_fake_source(items), folds=folds, fold=fold)
    assert needle in str(e.value)


def test_folds_refuse_a_given_val_split():
    s = _fake_source([(f"{i}.png", "ab"[i % 2]) for i in range(20)], ["train"] * 16 + ["val"] * 4)
    with pytest.raises(CxrlabError, match="has its own val split"):
        assign_splits(s, folds=5, fold=1)


def test_files_without_key_are_their_own_group():
    s = _fake_source([(f"person{i // 2}_virus_{i}.jpeg", "P") for i in range(20)]
                     + [(f"scan{i}.png", "N") for i in range(20)])
    r = assign_splits(s, 0.2, seed=0)
    assert r.grouped and "20 file(s) without a patient key" in r.message
    assert r.groups[20:] == [""] * 20 and _no_group_in_two_splits(r)
    assert 0 < r.splits[20:].count("val") < 20


def test_given_splits_are_kept_and_leaks_reported():
    items = [(f"person{i}_virus_{i}.jpeg", "P") for i in range(10)]
    items += [(f"IM-{i:04d}-0001.jpeg", "N") for i in range(10)]
    items += [("person0_virus_99.jpeg", "P"), ("IM-0500-0001.jpeg", "N")]
    given = ["train"] * 20 + ["test", "test"]
    r = assign_splits(_fake_source(items, given), 0.2, seed=0)
    assert r.splits[20:] == ["test", "test"]  # kept
    assert r.splits[:20].count("val") == 4 and "test" not in r.splits[:20]  # carved from train
    assert "1 patient(s) appear in more than one of the given splits" in r.message
    assert "person0" in r.message
    with_val = ["train"] * 16 + ["val"] * 4 + ["test", "test"]
    r = assign_splits(_fake_source(items, with_val), 0.2, seed=0)
    assert r.splits == with_val  # nothing carved when val is given


@pytest.mark.parametrize("fraction", [0, -0.1, 0.6, 1.0])
def test_bad_val_fraction(fraction):
    with pytest.raises(CxrlabError, match=f"--val-fraction {fraction}"):
        assign_splits(_kermany_like(), fraction, 0)


def test_too_few_to_split():
    with pytest.raises(CxrlabError, match="one patient"):
        assign_splits(_fake_source([(f"person1_virus_{i}.jpeg", "P") for i in range(4)]), 0.2, 0)
    with pytest.raises(CxrlabError, match="too few training images"):
        assign_splits(_fake_source([("person1_virus_1.jpeg", "P")]), 0.2, 0)
    with pytest.raises(CxrlabError, match="too few training images per class"):
        assign_splits(_fake_source([("person1_virus_1.jpeg", "P"), ("IM-0001-0001.png", "N")]),
                      0.2, 0)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 4), st.sampled_from("ab")), min_size=6,
                      max_size=40),
       fraction=st.sampled_from([0.1, 0.2, 0.25, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_split_invariants(sizes, fraction, seed):
    """Any patient structure: no patient in two splits, a non-empty val, deterministic."""
    items = [(f"person{p}_virus_{k}.jpeg", lab)
             for p, (n, lab) in enumerate(sizes) for k in range(n)]
    s = _fake_source(items)
    r = assign_splits(s, fraction, seed)
    assert _no_group_in_two_splits(r)
    assert "val" in r.splits and "train" in r.splits
    assert assign_splits(s, fraction, seed) == r


def test_split_csv_round_trip(tmp_path):
    s = _kermany_like(9, 9)
    r = assign_splits(s, 0.2, seed=0)
    p = tmp_path / "split.csv"
    write_split_csv(p, s, r)
    assert p.read_text().splitlines()[0] == "path,label,split,patient"
    rows = read_split_csv(p)
    assert [row["split"] for row in rows] == r.splits
    assert [row["patient"] for row in rows] == r.groups
    assert [Path(row["path"]) for row in rows] == [rec.path for rec in s.records]
    assert [p.name for p in tmp_path.iterdir()] == ["split.csv"]
    (tmp_path / "other.csv").write_text("path,label\nx,y\n")
    with pytest.raises(CxrlabError, match="other.csv: not a split CSV .*'split'"):
        read_split_csv(tmp_path / "other.csv")


def test_real_kermany_split(shared_data):
    s = load_source(shared_data / "chest_xray" / "train")
    r = assign_splits(s, 0.2, seed=0)
    assert r.grouped and _no_group_in_two_splits(r) and all(r.groups)
    val = Counter(rec.label for rec, sp in zip(s.records, r.splits, strict=True) if sp == "val")
    assert 0.18 < sum(val.values()) / len(s.records) < 0.22
    assert 0.23 < val["NORMAL"] / sum(val.values()) < 0.29  # 1341 / 5216 = 0.257 overall
