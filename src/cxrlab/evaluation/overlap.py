"""Which of DATA's images has the run already seen? Matched by path and by content.

Metrics on a run's training images are not held-out evidence, so evaluate refuses them (or
leaves them out, with --allow-overlap); its validation images chose its epoch and threshold,
and a site calibration's sample chose its threshold, so figures on them are selection-biased
and labelled so. An image is the run's when its path (as given, or with symlinks resolved),
its file bytes, or its pixels as the model sees them (decoded at the run's size and channels,
hashed by `cxrlab.data.audit.pixel_digest`) equal one of the run's images'.

Why pixels at the model's size and not at full size, as `cxrlab data summary` compares them:
training and evaluate hold those arrays already, so the check decodes nothing; a second,
full-size decode would double evaluate's time. Whatever data summary calls a duplicate has
the same pixels at the model's size too, except a large JPEG beside a lossless copy in another
format (JPEGs are decoded at reduced scale for speed).

    RUN/digests.csv   path, split (train / val / calibration / adaptation), file, pixels
                      written by training, `cxrlab calibrate` and `cxrlab adapt` for their images

A run trained before digests.csv: the train and val images of its split.csv are matched by
path, and by their bytes where the files are still readable (no pixel match). A run calibrated
before: every image of the data its run.json's site_calibration names counts as the sample.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrlab.data.audit import pixel_digest
from cxrlab.data.cache import n_workers
from cxrlab.data.sources import load_source
from cxrlab.errors import CxrlabError
from cxrlab.run import atomic_write_text, read_csv_rows, read_split_csv

log = logging.getLogger("cxrlab")

DIGESTS = "digests.csv"
COLUMNS = ("path", "split", "file", "pixels")
# most serious first: an image counts as the first
KINDS = ("train", "val", "calibration", "adaptation")
BIASED = KINDS[1:]  # scored, but not held-out evidence
WHY = {"val": "its epoch and threshold were chosen on them",
       "calibration": "its threshold was refitted on them (cxrlab calibrate)",
       "adaptation": "it was adapted to them without labels (cxrlab adapt)"}
KEYS = {"val": "validation", "calibration": "calibration_sample",  # in metrics["overlap"]
        "adaptation": "adaptation_sample"}
NAMES = {"val": "validation", "calibration": "site-calibration sample",
         "adaptation": "adaptation intake"}


def file_digest(path: Path | str) -> str | None:
    """blake2b of the file's bytes; None when it cannot be read."""
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:
        return None


def file_digests(paths: Sequence[Path | str]) -> list[str | None]:
    """`file_digest` of each path, on threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=n_workers()) as pool:
        return list(pool.map(file_digest, paths))


def pixel_digests(images: np.ndarray) -> list[str]:
    """`audit.pixel_digest` of each uint8 (C, S, S) image."""
    return [pixel_digest(a) for a in images]


def record(run_dir: Path, paths: Sequence[Path | str], splits: Sequence[str],
           files: Sequence[str | None], pixels: Sequence[str], append: bool = False) -> None:
    """Write (or extend) RUN/digests.csv: `file_digests` and `pixel_digests` of the images
    the run was shown, decoded as the model sees them."""
    path = Path(run_dir) / DIGESTS
    rows = _read(path) if append and path.is_file() else []
    rows += [{"path": os.path.abspath(p), "split": s, "file": f or "", "pixels": px}
             for p, s, f, px in zip(paths, splits, files, pixels, strict=True)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def record_sample(run_dir: Path, paths: Sequence[Path | str], images: np.ndarray) -> None:
    """Add a site calibration's sample to RUN/digests.csv (split "calibration")."""
    record(run_dir, paths, ["calibration"] * len(paths), file_digests(paths),
           pixel_digests(images), append=True)


def _read(path: Path) -> list[dict[str, str]]:
    return read_csv_rows(path, COLUMNS, "cxrlab digests file")


@dataclass
class Reference:
    """The run's own images, by path, file digest and pixel digest -> split."""

    by_path: dict[str, str] = field(default_factory=dict)
    by_file: dict[str, str] = field(default_factory=dict)
    by_pixels: dict[str, str] = field(default_factory=dict)
    checked: str = ""

    def add(self, path: str, split: str, file: str = "", pixels: str = "") -> None:
        for table, key in ((self.by_path, os.path.abspath(path)),
                           (self.by_path, os.path.realpath(path)),
                           (self.by_file, file), (self.by_pixels, pixels)):
            if key and (key not in table or KINDS.index(split) < KINDS.index(table[key])):
                table[key] = split

    def match(self, paths: Sequence[Path | str], files: Sequence[str | None],
              pixels: Sequence[str] | None = None) -> list[str | None]:
        """Per image: one of KINDS (the most serious it matches) or None."""
        out = []
        for i, p in enumerate(paths):
            found = {self.by_path.get(os.path.abspath(p)), self.by_path.get(os.path.realpath(p)),
                     self.by_file.get(files[i] or ""),
                     self.by_pixels.get(pixels[i]) if pixels is not None else None}
            out.append(next((k for k in KINDS if k in found), None))
        return out


def reference(run_dir: Path) -> Reference:
    """RUN/digests.csv; for a run trained before it, the train and val images of split.csv."""
    run_dir = Path(run_dir)
    rows = _read(run_dir / DIGESTS) if (run_dir / DIGESTS).is_file() else []
    ref = Reference()
    for r in rows:
        if r["split"] in KINDS:
            ref.add(r["path"], r["split"], r["file"], r["pixels"])
    have = {r["split"] for r in rows}
    if "calibration" not in have:
        _calibration_sample(run_dir, ref)
    if "train" in have:
        ref.checked = f"path, file bytes and pixels as the model sees them ({run_dir / DIGESTS})"
        return ref
    old = [r for r in read_split_csv(run_dir / "split.csv") if r["split"] in ("train", "val")]
    files = file_digests([r["path"] for r in old])
    for r, f in zip(old, files, strict=True):
        ref.add(r["path"], r["split"], f or "")
    ref.checked = f"path and file bytes ({run_dir / 'split.csv'}: the run predates {DIGESTS})"
    unread = sum(f is None for f in files)
    if unread:
        ref.checked += f"; {unread} of its {len(old)} images are unreadable here: by path only"
        log.warning("overlap: %d of %s's %d training and validation images cannot be read "
                    "here; DATA is matched against them by path only", unread, run_dir,
                    len(old))
    return ref


def screen(kinds: list[str | None], paths: Sequence[Path | str], data: Path,
           allow_overlap: bool) -> None:
    """Refuse DATA that holds training images, in one line, unless `allow_overlap`."""
    n_train = kinds.count("train")
    if not n_train:
        return
    n = len(kinds)
    if n_train == n:
        raise CxrlabError(f"{data}: all {n} images are the run's own training images (same "
                          "path or content); nothing held out to evaluate")
    if not allow_overlap:
        first = next(p for p, k in zip(paths, kinds, strict=True) if k == "train")
        raise CxrlabError(f"{data}: {n_train} of {n} images are the run's own training images "
                          f"(same path or content, e.g. {first}), so metrics on them are not "
                          f"held-out evidence; evaluate on held-out images, or --allow-overlap "
                          f"to score the other {n - n_train}")


def summary(kinds: list[str | None], paths: Sequence[Path | str], checked: str) -> dict:
    """metrics["overlap"]: what was matched how, and the images of each kind."""
    return {"checked": checked,
            "training_left_out": [str(p) for p, k in zip(paths, kinds, strict=True)
                                  if k == "train"],
            **{KEYS[k]: [str(p) for p, kk in zip(paths, kinds, strict=True) if kk == k]
               for k in BIASED}}


def selection_note(kinds: list[str | None]) -> str | None:
    """metrics["selection_biased"] when scored images include validation or calibration ones."""
    scored = [k for k in kinds if k != "train"]
    parts = [f"{scored.count(k)} of the {len(scored)} images are the run's {NAMES[k]} images "
             f"({WHY[k]})" for k in BIASED if k in scored]
    return "; ".join(parts) or None


def _calibration_sample(run_dir: Path, ref: Reference) -> None:
    """A run calibrated without its sample in digests.csv: every image of the data run.json's
    site_calibration names counts (by path and bytes), a superset when --split chose part."""
    import json

    try:
        cal = json.loads((run_dir / "run.json").read_text()).get("site_calibration")
    except (OSError, ValueError):
        return
    if not cal or not cal.get("data"):
        return
    try:
        records = load_source(Path(cal["data"])).records
    except CxrlabError as e:
        log.warning("overlap: the calibration sample %s cannot be listed (%s); DATA is not "
                    "matched against it", cal["data"], e)
        return
    for r, f in zip(records, file_digests([r.path for r in records]), strict=True):
        ref.add(str(r.path), "calibration", f or "")
