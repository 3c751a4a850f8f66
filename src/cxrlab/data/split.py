"""Validation splits that do not leak: stratified by class, grouped by patient, seeded."""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedShuffleSplit

from cxrlab.data.sources import Source
from cxrlab.errors import CxrlabError

# person123_bacteria_456.jpeg -> person123; IM-0115-0001.jpeg -> IM-0115;
# NORMAL2-IM-1427-0001.jpeg -> NORMAL2-IM-1427
KERMANY_PATTERN = re.compile(r"^(person\d+)_|^((?:[A-Za-z0-9]+-)?IM-\d+)-\d+")


def patient_key(path: Path | str, regex: str | re.Pattern | None = None) -> str | None:
    name = Path(path).name
    if regex is None:
        m = KERMANY_PATTERN.match(name)
        return next((g for g in m.groups() if g), None) if m else None
    pattern = re.compile(regex) if isinstance(regex, str) else regex
    m = pattern.search(name)
    if not m:
        return None
    return m.group(1) if pattern.groups else m.group(0)


@dataclass
class SplitResult:
    splits: list[str]  # per record: train / val / test
    groups: list[str]  # patient key per record ("" when ungrouped)
    grouped: bool
    message: str


def _compile(regex: str | None):
    if regex is None:
        return None
    try:
        return re.compile(regex)
    except re.error as e:
        raise CxrlabError(f"--group-regex {regex!r}: not a valid regular expression ({e})") \
            from None


def assign_splits(source: Source, val_fraction: float = 0.2, seed: int = 0,
                  group_regex: str | None = None) -> SplitResult:
    pattern = _compile(group_regex)
    records = source.records
    keys = [patient_key(r.path, pattern) for r in records]
    matched = sum(k is not None for k in keys)
    grouped = matched > 0
    groups = [k if k is not None else f"__file__{r.path}" for k, r in zip(keys, records,
                                                                            strict=True)]
    splits = [r.split or "train" for r in records]
    notes = []
    if not grouped:
        notes.append("no patient key matched any file name: the split is not grouped by "
                      "patient (use --group-regex)")
    elif matched < len(records):
        notes.append(f"{len(records) - matched} file(s) without a patient key: each is its "
                     "own group")
    has_val = any(s == "val" for s in splits)
    if not has_val:
        idx = np.array([i for i, s in enumerate(splits) if s == "train"])
        labels = np.array([records[i].label for i in idx])
        if len(idx) < 2:
            raise CxrlabError(f"{source.root}: too few training images to hold out validation")
        if grouped:
            g = np.array([groups[i] for i in idx])
            n_splits = max(2, round(1 / val_fraction))
            n_splits = min(n_splits, len(set(g.tolist())))
            if n_splits < 2:
                raise CxrlabError(f"{source.root}: only one patient: cannot hold out validation")
            sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
            _, val_idx = next(sgkf.split(np.zeros(len(idx)), labels, g))
        else:
            n_val = max(len(set(labels.tolist())), round(val_fraction * len(idx)))
            sss = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
            try:
                _, val_idx = next(sss.split(np.zeros(len(idx)), labels))
            except ValueError as e:
                raise CxrlabError(f"{source.root}: cannot stratify the split ({e})") from None
        for j in val_idx:
            splits[idx[j]] = "val"
    # A patient must live in one split; given splits can leak: say so.
    where = defaultdict(set)
    for g, s in zip(groups, splits, strict=True):
        where[g].add(s)
    leaking = [g for g, ss in where.items() if len(ss) > 1]
    if leaking:
        notes.append(f"{len(leaking)} patient(s) appear in more than one of the given splits, "
                     f"e.g. {leaking[0]}")
    n_groups = len(set(groups)) if grouped else 0
    if grouped:
        notes.insert(0, f"split grouped by patient ({n_groups} patients)")
    return SplitResult(splits, [g if not g.startswith("__file__") else "" for g in groups],
                       grouped, "; ".join(notes))


def write_split_csv(path: Path, source: Source, result: SplitResult) -> None:
    tmp = Path(path).with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "patient"])
        for r, s, g in zip(source.records, result.splits, result.groups, strict=True):
            w.writerow([str(r.path), r.label, s, g])
    tmp.replace(path)


def read_split_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))
