"""Where labelled images come from: class folders, train/val/test folders, or a CSV."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cxrlab.errors import CxrlabError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    path: Path  # absolute
    label: str
    split: str | None = None  # set when the layout says so


@dataclass
class Source:
    root: Path
    kind: Literal["class_folders", "split_folders", "csv"]
    records: list[Record]
    classes: list[str]


def is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _class_folder_records(folder: Path, split: str | None) -> list[Record]:
    records = []
    class_dirs = _subdirs(folder)
    if not class_dirs:
        raise CxrlabError(f"{folder}: no class folders (expected one sub-folder per class)")
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if is_image_file(p))
        if not files:
            raise CxrlabError(f"{d}: class folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        records.extend(Record(p.resolve(), d.name, split) for p in files)
    return records


def load_source(path: Path | str, image_col: str | None = None,
                label_col: str | None = None) -> Source:
    """Read the layout only (no decoding): cheap, so every command can call it first."""
    path = Path(path)
    if not path.exists():
        raise CxrlabError(f"{path}: no such file or folder")
    if (image_col is None) != (label_col is None):
        raise CxrlabError("--image-col and --label-col go together")
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise CxrlabError(f"{path}: expected a folder or a .csv file")
        return _csv_source(path, image_col or "path", label_col or "label")
    if image_col is not None:
        raise CxrlabError(f"--image-col: {path} is a folder, not a CSV")
    names = {d.name.lower(): d for d in _subdirs(path)}
    if "train" in names:
        records = []
        for split in SPLIT_NAMES:
            if split in names:
                records += _class_folder_records(names[split], split)
        kind = "split_folders"
    else:
        records = _class_folder_records(path, None)
        kind = "class_folders"
    return Source(path.resolve(), kind, records, sorted({r.label for r in records}))


def _csv_source(path: Path, image_col: str, label_col: str) -> Source:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CxrlabError(f"{path}: not a UTF-8 text CSV") from None
    rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise CxrlabError(f"{path}: CSV has no rows")
    columns = [c for c in rows[0] if c is not None]
    for opt, col in (("--image-col", image_col), ("--label-col", label_col)):
        if col not in columns:
            raise CxrlabError(f"{path}: {opt} '{col}' is not a column "
                              f"(columns: {', '.join(c or '<unnamed>' for c in columns)})")
    base = path.parent
    records, missing, seen = [], [], set()
    for i, row in enumerate(rows, start=2):
        rel, label = (row.get(image_col) or "").strip(), (row.get(label_col) or "").strip()
        if not rel or not label:
            raise CxrlabError(f"{path}: line {i}: empty {image_col if not rel else label_col}")
        p = (base / rel).resolve()
        if p in seen:
            continue  # the same image listed twice would count twice
        seen.add(p)
        if not p.is_file():
            missing.append(rel)
            continue
        records.append(Record(p, label, None))
    if missing:
        raise CxrlabError(f"{path}: {len(missing)} listed image(s) not found, first: {missing[0]}")
    records.sort(key=lambda r: (r.label, str(r.path)))
    return Source(path.resolve(), "csv", records, sorted({r.label for r in records}))


def require_trainable(source: Source) -> None:
    counts = Counter(r.label for r in source.records)
    if len(counts) < 2:
        only = next(iter(counts), "none")
        raise CxrlabError(f"{source.root}: needs at least 2 classes to train, found 1 ({only})")
