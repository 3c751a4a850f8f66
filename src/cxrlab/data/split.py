"""Validation splits that do not leak: stratified by class, grouped by patient, seeded.

Kermany has several images per patient; a split by image puts the same patient in train and
val and inflates validation scores. Source-given splits (train/val/test folders) are kept.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, StratifiedShuffleSplit

from cxrlab.data.sources import Source
from cxrlab.errors import CxrlabError

# person123_bacteria_456.jpeg -> person123; IM-0115-0001.jpeg -> IM-0115;
# NORMAL2-IM-1427-0001.jpeg -> NORMAL2-IM-1427 (IM-0467-0001-0002.jpeg -> IM-0467)
KERMANY_PATTERN = re.compile(r"^(person\d+)_|^((?:[A-Za-z0-9]+-)?IM-\d+)-\d+")
NOT_GROUPED = "no patient key matched: split is not grouped by patient"


def patient_key(path: Path | str, regex: str | re.Pattern | None = None) -> str | None:
    """Patient id from the file name: the Kermany forms, or `regex`'s first group (or match)."""
    name = Path(path).name
    if regex is None:
        m = KERMANY_PATTERN.match(name)
        return next((g for g in m.groups() if g), None) if m else None
    pattern = _compile(regex) if isinstance(regex, str) else regex
    m = pattern.search(name)
    if not m:
        return None
    key = m.group(1) if pattern.groups else m.group(0)
    return key or None


@dataclass
class SplitResult:
    splits: list[str]  # per record: train / val / test
    groups: list[str]  # patient key per record ("" for a file without one)
    grouped: bool  # False when no file name gave a patient key
    message: str  # what a user should know about this split ("" when nothing)


def _compile(regex: str) -> re.Pattern:
    try:
        return re.compile(regex)
    except re.error as e:
        raise CxrlabError(f"--group-regex {regex!r}: not a valid regular expression ({e})") \
            from None


def assign_splits(source: Source, val_fraction: float = 0.2, seed: int = 0,
                  group_regex: str | None = None, folds: int | None = None,
                  fold: int | None = None) -> SplitResult:
    """Keep given splits; carve val out of train when none is given, by patient group.

    When 1/val_fraction is a whole number k, StratifiedGroupKFold(n_splits=k) and its first
    fold as val: whole patients move, classes stay balanced as far as patients allow. Other
    fractions (0.3, 0.4) cannot be one of k folds (round(1/0.4) = 2 folds gave 50%): whole
    patients are drawn instead (`_draw_patients`). The message says what share val got.
    Files without a patient
    key are their own group; when no file has one, a plain stratified split (and the message
    says so). Cross-validation (`folds`, `fold`): the fold-th of exactly `folds` folds, from
    the same StratifiedGroupKFold (StratifiedKFold when ungrouped), so the folds of one seed
    cover every training image once.
    """
    if not 0 < val_fraction <= 0.5:
        raise CxrlabError(f"--val-fraction {val_fraction}: must be > 0 and <= 0.5")
    if fold is not None and (folds is None or not 1 <= fold <= folds):
        raise CxrlabError(f"fold {fold}: must be between 1 and --folds ({folds})")
    pattern = _compile(group_regex) if group_regex is not None else None
    records = source.records
    keys = [patient_key(r.path, pattern) for r in records]
    matched = sum(k is not None for k in keys)
    grouped = matched > 0
    # a file without a key is its own group (its path is unique)
    groups = [k if k is not None else f"\0{r.path}" for k, r in zip(keys, records, strict=True)]
    splits = [r.split or "train" for r in records]
    notes = []
    if not grouped:
        hint = "" if group_regex else " (--group-regex sets how to read it from file names)"
        notes.append(NOT_GROUPED + hint)
    elif matched < len(records):
        notes.append(f"{len(records) - matched} file(s) without a patient key are each their "
                     "own group")
    if fold is not None and "val" in splits:
        raise CxrlabError(f"--folds: {source.root} has its own val split; cross-validation "
                          "draws its folds from one pool of training images")
    if "val" not in splits:
        idx = np.array([i for i, s in enumerate(splits) if s == "train"])
        if len(idx) < 2:
            raise CxrlabError(f"{source.root}: too few training images to hold out validation")
        labels = np.array([records[i].label for i in idx])
        if fold is not None:
            val_idx = _fold(source, labels, [groups[i] for i in idx] if grouped else None,
                            folds, fold, seed)
        elif grouped:
            g = np.array([groups[i] for i in idx])
            # sklearn needs n_splits <= groups and <= the largest class: tiny sets get a
            # bigger validation share rather than an error
            n_splits = min(max(2, round(1 / val_fraction)), len(set(g.tolist())),
                           max(Counter(labels.tolist()).values()))
            if len(set(g.tolist())) < 2:
                raise CxrlabError(f"{source.root}: all training images belong to one patient: "
                                  "cannot hold out validation")
            if n_splits < 2:
                raise CxrlabError(f"{source.root}: too few training images per class to hold "
                                  "out a stratified validation split")
            if not math.isclose(round(1 / val_fraction) * val_fraction, 1.0, rel_tol=1e-9):
                val_idx = _draw_patients(labels, g, val_fraction, seed)
            else:
                sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                with warnings.catch_warnings():  # a rare class is fine: it lands where it can
                    warnings.filterwarnings("ignore", "The least populated class", UserWarning)
                    _, val_idx = next(sgkf.split(np.zeros(len(idx)), labels, g))
        else:
            n_val = max(len(set(labels.tolist())), round(val_fraction * len(idx)))
            try:
                sss = StratifiedShuffleSplit(n_splits=1, test_size=n_val, random_state=seed)
                _, val_idx = next(sss.split(np.zeros(len(idx)), labels))
            except ValueError as e:
                raise CxrlabError(f"{source.root}: cannot stratify the validation split "
                                  f"({e})") from None
        for j in val_idx:
            splits[idx[j]] = "val"
        notes.append(f"validation: {len(val_idx)} of {len(idx)} training images "
                     f"({len(val_idx) / len(idx):.1%}"
                     + (f"; fold {fold} of {folds})" if fold is not None
                        else f"; --val-fraction {val_fraction:g})"))
    # A patient must live in one split; carving never splits one, given layouts can.
    where: dict[str, set[str]] = defaultdict(set)
    for g, s in zip(groups, splits, strict=True):
        where[g].add(s)
    leaking = sorted(g for g, ss in where.items() if len(ss) > 1)
    if grouped:
        n_groups = len({g for g in groups if not g.startswith("\0")})
        notes.insert(0, f"split grouped by patient ({n_groups} patients)")
    if fold is not None:
        notes.append(f"cross-validation: validating on fold {fold} of {folds}")
    if leaking:
        notes.append(f"warning: {len(leaking)} patient(s) appear in more than one of the given "
                     f"splits (leakage), e.g. {leaking[0]} in "
                     f"{'/'.join(sorted(where[leaking[0]]))}")
    return SplitResult(splits, ["" if g.startswith("\0") else g for g in groups], grouped,
                       "; ".join(notes))


def _draw_patients(labels: np.ndarray, groups: np.ndarray, fraction: float,
                   seed: int) -> np.ndarray:
    """Validation indices: whole patients in a seeded random order, each taken when it brings
    the validation images of every class closer to `fraction` of that class (summed over
    classes).

    A patient is taken only while that helps, so each class ends within half its largest
    patient of its share: the total within one patient's images (two classes), stratified.
    """
    classes, y = np.unique(labels, return_inverse=True)
    names, g = np.unique(groups, return_inverse=True)
    per_patient = np.zeros((len(names), len(classes)))
    np.add.at(per_patient, (g, y), 1)
    target = fraction * per_patient.sum(0)
    have = np.zeros(len(classes))
    taken = np.zeros(len(names), dtype=bool)
    order = np.random.default_rng(seed).permutation(len(names))
    for j in order:
        if np.abs(have + per_patient[j] - target).sum() < np.abs(have - target).sum():
            have += per_patient[j]
            taken[j] = True
    if not taken.any():  # every patient outweighs the share: the first one still validates
        taken[order[0]] = True
    return np.flatnonzero(taken[g])


def _fold(source: Source, labels: np.ndarray, groups: list[str] | None, folds: int,
          fold: int, seed: int) -> np.ndarray:
    """Validation indices of fold `fold` (1-based) of `folds`; an error when the data cannot
    give that many folds (no silent shrinking: k runs must mean k folds)."""
    n_groups = len(set(groups)) if groups is not None else len(labels)
    if n_groups < folds:
        what = "patients" if groups is not None else "training images"
        raise CxrlabError(f"--folds {folds}: {source.root} has only {n_groups} {what}")
    smallest = min(Counter(labels.tolist()).values())
    if smallest < folds:
        raise CxrlabError(f"--folds {folds}: a class of {source.root} has only {smallest} "
                          "training image(s); every fold needs one of each")
    if groups is not None:
        kf = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    else:
        kf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        all_folds = list(kf.split(np.zeros(len(labels)), labels, groups))
    return all_folds[fold - 1][1]
