"""Where labelled images come from: class folders, train/val/test folders, or a CSV.

Only the layout is read here (names, no pixels), so every command can call `load_source` first
and fail fast on a wrong path or column before anything slow happens.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cxrlab.data.images import is_dicom
from cxrlab.errors import CxrlabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".dcm", ".dicom")
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    path: Path  # absolute (symlinks kept: the file name carries the patient)
    label: str
    split: str | None = None  # "train" / "val" / "test" when the layout says so


@dataclass
class Source:
    root: Path
    kind: Literal["class_folders", "split_folders", "csv"]
    records: list[Record]
    classes: list[str]  # sorted, from all records


def _absolute(p: Path) -> Path:
    # abspath, not resolve(): a symlinked file keeps its own name, which is its patient key.
    return Path(os.path.abspath(p))


def _hidden(p: Path, below: Path) -> bool:
    return any(part.startswith(".") for part in p.relative_to(below).parts)


def is_image_file(p: Path) -> bool:
    """By extension; a file without one counts when it is DICOM (PACS exports rarely have one)."""
    if p.name.startswith(".") or not p.is_file():
        return False
    if p.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    return p.suffix == "" and is_dicom(p)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_folder_records(folder: Path, split: str | None) -> list[Record]:
    class_dirs = _subdirs(folder)
    if not class_dirs:
        loose = [p for p in folder.iterdir() if is_image_file(p)]
        if loose:
            raise CxrlabError(f"{folder}: images must sit in one sub-folder per class "
                              f"(found {len(loose)} image(s) directly in the folder)")
        raise CxrlabError(f"{folder}: no images found (expected one sub-folder per class)")
    records = []
    for d in class_dirs:
        # Nested folders count (some sets group by date); hidden ones (.ipynb_checkpoints) don't.
        files = sorted(p for p in d.rglob("*") if is_image_file(p) and not _hidden(p, d))
        if not files:
            raise CxrlabError(f"{d}: class folder holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
        records.extend(Record(_absolute(p), d.name, split) for p in files)
    return records


def load_source(path: Path | str, image_col: str | None = None,
                label_col: str | None = None) -> Source:
    """Class folders, train/[val/][test/] folders of class folders, or a CSV (image, label).

    A folder with any of train/val/test among its sub-folders is a split layout (other
    sub-folders are ignored); otherwise each sub-folder is a class.
    """
    path = Path(path)
    if not path.exists():
        raise CxrlabError(f"{path}: no such file or folder")
    if image_col is not None and label_col is None:
        raise CxrlabError(f"--image-col {image_col}: needs --label-col too")
    if label_col is not None and image_col is None:
        raise CxrlabError(f"--label-col {label_col}: needs --image-col too")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise CxrlabError(f"{path}: expected a folder or a .csv file")
        return _csv_source(path, image_col or "path", label_col or "label")
    if image_col is not None:
        raise CxrlabError(f"--image-col {image_col}: {path} is a folder, not a CSV")
    names = {d.name.lower(): d for d in _subdirs(path)}
    if any(s in names for s in SPLIT_NAMES):
        records = []
        for split in SPLIT_NAMES:
            if split in names:
                records += _class_folder_records(names[split], split)
        kind = "split_folders"
    else:
        records = _class_folder_records(path, None)
        kind = "class_folders"
    return Source(_absolute(path), kind, records, sorted({r.label for r in records}))


def _csv_source(path: Path, image_col: str, label_col: str) -> Source:
    try:
        # utf-8-sig drops a BOM (Excel writes one); newline="" lets csv handle quoted newlines.
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError:
        raise CxrlabError(f"{path}: not a UTF-8 text CSV") from None
    except csv.Error as e:
        raise CxrlabError(f"{path}: not a valid CSV ({e})") from None
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise CxrlabError(f"{path}: CSV is empty")
    header = [c.strip() for c in rows[0]]
    for opt, col in (("--image-col", image_col), ("--label-col", label_col)):
        if col not in header:
            shown = ", ".join(repr(c) if c else "<unnamed>" for c in header)
            raise CxrlabError(f"{path}: {opt} {col!r} is not a column (columns: {shown})")
    if len(rows) == 1:
        raise CxrlabError(f"{path}: CSV has a header but no rows")
    ci, cl = header.index(image_col), header.index(label_col)
    base = path.parent
    labels: dict[Path, str] = {}
    missing: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        rel = row[ci].strip() if ci < len(row) else ""
        label = row[cl].strip() if cl < len(row) else ""
        if not rel or not label:
            raise CxrlabError(f"{path}: line {line}: empty {image_col if not rel else label_col}")
        p = _absolute(base / rel)
        if p in labels:
            if labels[p] != label:
                raise CxrlabError(f"{path}: line {line}: {rel} is listed as both "
                                  f"{labels[p]!r} and {label!r}")
            continue  # the same image listed twice would count twice
        labels[p] = label
        if not p.is_file():
            missing.append(rel)
    if missing:
        raise CxrlabError(f"{path}: {len(missing)} listed image(s) not found "
                          f"(relative to {base}), first: {missing[0]}")
    records = sorted((Record(p, lab, None) for p, lab in labels.items()),
                     key=lambda r: (r.label, str(r.path)))
    return Source(_absolute(path), "csv", records, sorted(set(labels.values())))


def require_trainable(source: Source) -> None:
    """Training needs two classes; evaluating a one-class folder does not, so it is separate."""
    counts = Counter(r.label for r in source.records)
    if len(counts) < 2:
        only = next(iter(counts), "none")
        raise CxrlabError(f"{source.root}: needs at least 2 classes to train, "
                          f"found {len(counts)} ({only})")
    folded: dict[str, str] = {}
    for label in sorted(counts):
        other = folded.setdefault(label.casefold(), label)
        if other != label:
            # almost always one class spelled two ways; on macOS/Windows the folders would merge
            raise CxrlabError(f"{source.root}: classes {other!r} and {label!r} differ only in "
                              "case; give them one spelling")
