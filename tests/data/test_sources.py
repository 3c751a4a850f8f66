"""cxrlab.data.sources: the three layouts, what is ignored, and every user error."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cxrlab.data.sources import IMAGE_EXTENSIONS, load_source, require_trainable
from cxrlab.errors import CxrlabError
from tests.conftest import make_kermany_folder


def _png(path, value=100, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def _csv_rows(root):
    return [f"{p.relative_to(root).as_posix()},{p.parent.name}"
            for p in sorted(root.rglob("*.png"))]


# -- folders ----------------------------------------------------------------------------


def test_class_folders(kermany_folder):
    s = load_source(kermany_folder)
    assert s.kind == "class_folders" and s.classes == ["NORMAL", "PNEUMONIA"]
    assert s.root == kermany_folder
    assert len(s.records) == 24 and all(r.split is None for r in s.records)
    assert all(r.path.is_absolute() and r.path.is_file() for r in s.records)
    assert [r.label for r in s.records] == ["NORMAL"] * 12 + ["PNEUMONIA"] * 12
    assert s.records == sorted(s.records, key=lambda r: (r.label, str(r.path)))
    assert load_source(str(kermany_folder)).records == s.records  # deterministic, str ok


def test_hidden_and_non_image_files_are_ignored(kermany_folder):
    normal = kermany_folder / "NORMAL"
    (normal / "notes.txt").write_text("not an image")
    (normal / "scan.doc").write_bytes(b"DICM")  # DICOM is an image: tests/data/test_dicom.py
    _png(normal / ".hidden.png")
    _png(normal / ".ipynb_checkpoints" / "IM-0001-0001-checkpoint.png")
    _png(kermany_folder / ".trash" / "x.png")  # a hidden class folder
    _png(normal / "nested" / "IM-0500-0001.PNG")  # upper-case suffix, nested: counted
    s = load_source(kermany_folder)
    assert s.classes == ["NORMAL", "PNEUMONIA"]
    names = [r.path.name for r in s.records]
    assert len(names) == 25 and "IM-0500-0001.PNG" in names
    assert not any(n.startswith(".") or "checkpoint" in n for n in names)


def test_symlinked_file_keeps_its_own_name(tmp_path):
    root = make_kermany_folder(tmp_path / "d", 2, 2)
    target = _png(tmp_path / "store" / "0a1b2c.png")
    link = root / "NORMAL" / "IM-0777-0001.png"
    try:
        os.symlink(target, link)
    except OSError:
        pytest.skip("no symlinks here")
    names = {r.path.name for r in load_source(root).records}
    assert "IM-0777-0001.png" in names and "0a1b2c.png" not in names


def test_split_folders(tmp_path):
    make_kermany_folder(tmp_path / "d" / "train", 6, 6)
    make_kermany_folder(tmp_path / "d" / "val", 2, 2, seed=1)
    make_kermany_folder(tmp_path / "d" / "test", 2, 3, seed=2)
    (tmp_path / "d" / "README.txt").write_text("ignored")
    s = load_source(tmp_path / "d")
    assert s.kind == "split_folders" and s.classes == ["NORMAL", "PNEUMONIA"]
    by_split = {sp: sum(r.split == sp for r in s.records) for sp in ("train", "val", "test")}
    assert by_split == {"train": 12, "val": 4, "test": 5}
    assert [r.split for r in s.records] == ["train"] * 12 + ["val"] * 4 + ["test"] * 5
    assert all(r.path.parts[-3] == r.split for r in s.records)


def test_split_folders_without_train_and_with_one_class(tmp_path):
    _png(tmp_path / "d" / "Test" / "NORMAL" / "IM-0001-0001.png")
    s = load_source(tmp_path / "d")  # evaluate may read a test folder of one class
    assert s.kind == "split_folders" and s.classes == ["NORMAL"]
    assert s.records[0].split == "test"
    with pytest.raises(CxrlabError, match="at least 2 classes"):
        require_trainable(s)


# -- CSV --------------------------------------------------------------------------------


def test_csv_with_bom_crlf_index_column_and_duplicate_rows(kermany_folder):
    rows = _csv_rows(kermany_folder)
    lines = [f"{i},{row}" for i, row in enumerate(rows + rows[:2])]
    csv = kermany_folder / "meta.csv"
    csv.write_bytes(("\ufeff,image,label\r\n" + "\r\n".join(lines) + "\r\n").encode())
    s = load_source(csv, "image", "label")
    assert s.kind == "csv" and s.root == csv
    assert len(s.records) == 24 and s.classes == ["NORMAL", "PNEUMONIA"]
    assert {r.path for r in s.records} == {r.path for r in load_source(kermany_folder).records}
    assert s.records == sorted(s.records, key=lambda r: (r.label, str(r.path)))


def test_csv_quoted_fields_and_default_columns(tmp_path):
    _png(tmp_path / "img" / "a, b.png")
    _png(tmp_path / "img" / "c.png", 30)
    (tmp_path / "m.csv").write_text('path,label\n"img/a, b.png",x\nimg/c.png,"y"\n')
    s = load_source(tmp_path / "m.csv")  # columns default to path,label
    assert [(r.path.name, r.label) for r in s.records] == [("a, b.png", "x"), ("c.png", "y")]


def test_real_coronahack_csv(shared_data):
    csv = shared_data / "chest_xray" / "metadata.csv"
    s = load_source(csv, "X_ray_image_name", "Label")
    assert s.kind == "csv" and s.classes == ["Normal", "Pnemonia"]
    assert len(s.records) == 5216
    assert sum(r.label == "Normal" for r in s.records) == 1341
    assert all(r.path.parent.parent == shared_data / "chest_xray" / "train"
               for r in s.records[:: 500])
    with pytest.raises(CxrlabError, match="'X_ray_image_name'") as e:
        load_source(csv, "image", "Label")
    assert "metadata.csv" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, cols, needle", [
    ("path,label\n", ("path", "label"), "no rows"),
    ("", ("path", "label"), "empty"),
    ("file,y\nimg/a.png,x\n", ("path", "label"), r"--image-col 'path' is not a column "
                                                  r"\(columns: 'file', 'y'\)"),
    ("path,y\nimg/a.png,x\n", ("path", "label"), "--label-col 'label'"),
    ("path,label\nimg/a.png,\n", ("path", "label"), "line 2: empty label"),
    ("path,label\nimg/a.png,x\nimg/a.png,y\n", ("path", "label"), "both 'x' and 'y'"),
    ("path,label\nimg/a.png,x\nimg/gone.png,x\nimg/gone2.png,y\n", ("path", "label"),
     r"2 listed image\(s\) not found.*first: img/gone.png"),
])
def test_csv_errors(tmp_path, text, cols, needle):
    _png(tmp_path / "img" / "a.png")
    csv = tmp_path / "m.csv"
    csv.write_text(text)
    with pytest.raises(CxrlabError, match=needle) as e:
        load_source(csv, *cols)
    assert str(e.value).startswith(str(csv)) and "\n" not in str(e.value)


def test_column_options_go_together(tmp_path, kermany_folder):
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n")
    with pytest.raises(CxrlabError, match="--image-col path: needs --label-col"):
        load_source(csv, image_col="path")
    with pytest.raises(CxrlabError, match="--label-col label: needs --image-col"):
        load_source(csv, label_col="label")
    with pytest.raises(CxrlabError, match="is a folder, not a CSV"):
        load_source(kermany_folder, "path", "label")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CxrlabError, match="x.txt: expected a folder or a .csv"):
        load_source(tmp_path / "x.txt")


# -- folder errors ----------------------------------------------------------------------


def test_folder_errors(tmp_path, kermany_folder):
    with pytest.raises(CxrlabError, match="missing: no such file or folder"):
        load_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CxrlabError, match="empty: no images found"):
        load_source(tmp_path / "empty")
    _png(tmp_path / "loose" / "a.png")
    with pytest.raises(CxrlabError, match="one sub-folder per class"):
        load_source(tmp_path / "loose")
    (kermany_folder / "EMPTY").mkdir()
    (kermany_folder / "EMPTY" / "readme.txt").write_text("no images here")
    with pytest.raises(CxrlabError, match="EMPTY: class folder holds no images") as e:
        load_source(kermany_folder)
    assert all(ext in str(e.value) for ext in IMAGE_EXTENSIONS)


def test_require_trainable(tmp_path, kermany_folder):
    require_trainable(load_source(kermany_folder))
    one = make_kermany_folder(tmp_path / "one", 3, 0)
    with pytest.raises(CxrlabError, match="needs at least 2 classes to train, found 1"):
        require_trainable(load_source(one))
