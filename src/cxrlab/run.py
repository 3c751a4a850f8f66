"""A run is a directory; this module is the only place that knows its layout.

    config.yaml   every knob (RunConfig), enough to reproduce the run
    run.json      classes, positive class, input channels, the training data's bit depth
                  (data_bit_depth: how 16-bit images are read, cxrlab.data.images), state
                  (running/complete/failed)
    split.csv     which image went to which split, with its patient key
    history.csv   one row per epoch
    checkpoints/  Lightning checkpoints (best.ckpt, last.ckpt)
    model.pt      the best weights, for evaluate / predict / export
    threshold     the decision threshold chosen on validation (2 classes)
    metrics.json  validation metrics at that threshold, with intervals
    val_predictions.csv  path, label and class probabilities of each validation image
    intake.json   per-image statistics of the training+validation images (cxrlab.site.intake)
    shift.json, shift.png  the stress test, when `evaluate --shift` was run (cxrlab.site.shift)
    plan.json     a time-budgeted run: its budget, the warm-up timings and the plan (budget.py)
    *.png         curves, confusion matrix, ROC, prediction grid
    tb/ csv-logs/ mlruns/ tracking.json   with --logger (cxrlab.reporting.tracking)
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError

# Imported inside the functions that need them: fcntl, torch (heavy or
# optional; importing them here would slow every command that imports this module).

if TYPE_CHECKING:  # torch is imported where a model is loaded: `cxrlab runs` needs none
    import torch

    from cxrlab.data.images import BitDepth
    from cxrlab.data.sources import Source
    from cxrlab.data.split import SplitResult

log = logging.getLogger("cxrlab")

RUN_FILES = ("config.yaml", "run.json")


def atomic_write_text(path: Path, text: str) -> None:
    """Readers never see half a file: write beside it, then rename over it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # surrogateescape: file names that are not UTF-8 are written back byte for byte
        with os.fdopen(fd, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a run is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def prepare_out_dir(out: Path) -> None:
    """Refuse to train into a directory that holds anything: nothing a user made is lost."""
    if out.exists() and not out.is_dir():
        raise CxrlabError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise CxrlabError(f"--out {out}: directory exists and is not empty (choose a new one)")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # leave nothing behind
        raise CxrlabError(f"--out {out}: cannot write there ({e.strerror})") from None


def check_out_dir(out: Path) -> None:
    """Cheap checks before the slow part: not a non-empty directory, and writable."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        prepare_out_dir(out)  # raises with the reason
    parent = out if out.is_dir() else _existing_parent(out)
    if not os.access(parent, os.W_OK):
        raise CxrlabError(f"--out {out}: cannot write there (permission denied)")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(out: Path, model: torch.nn.Module) -> None:
    """Refuse to start when the disk cannot hold the run's checkpoints and files.

    Two checkpoints (best, last) hold weights plus up to two optimizer moments each, and
    model.pt the weights again: about 7 x the weights, plus room for plots and CSVs.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = 7 * weights + 20 * 2**20
    free = shutil.disk_usage(_existing_parent(out)).free
    if free < need:
        raise CxrlabError(f"--out {out}: not enough free disk space ({free / 2**20:.0f} MiB "
                          f"free, the run needs about {need / 2**20:.0f} MiB)")


@contextmanager
def run_lock(run_dir: Path):
    """Held by the process training a run, so a second `--resume` cannot train it at once.

    An OS lock (flock): released by the kernel when the holder dies, even by SIGKILL.
    """
    import fcntl

    f = (Path(run_dir) / ".lock").open("a")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CxrlabError(f"{run_dir}: another process is training this run") from None
        yield
    finally:
        f.close()


@dataclass
class RunInfo:
    classes: list[str]
    positive: int | None  # index of the positive class (2 classes only)
    in_chans: int
    state: str = "running"
    error: str | None = None
    data_bit_depth: int | None = None  # 16-bit images without sBIT, as training read them
    # an ensemble run (training/ensemble.py): {"kind": "folds" | "seeds", "members": [dirs]}
    ensemble: dict | None = None
    # what a small set's recipe chose, and why (training/small_sets.py)
    small_set: dict | None = None

    def to_dict(self) -> dict:
        extra = {} if self.ensemble is None else {"ensemble": self.ensemble}
        if self.small_set is not None:
            extra["small_set"] = self.small_set
        return {
            "classes": self.classes,
            "positive_class": None if self.positive is None else self.classes[self.positive],
            "in_chans": self.in_chans,
            "data_bit_depth": self.data_bit_depth,
            "state": self.state,
            "error": self.error,
            **extra,
        }


def save_info(run_dir: Path, info: RunInfo) -> None:
    write_json(run_dir / "run.json", info.to_dict())


def load_info(run_dir: Path) -> RunInfo:
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise CxrlabError(f"{run_dir}: not a cxrlab run directory (no run.json)")
    d = json.loads(path.read_text())
    pos = d.get("positive_class")
    return RunInfo(
        classes=d["classes"],
        positive=None if pos is None else d["classes"].index(pos),
        in_chans=d["in_chans"],
        state=d.get("state", "running"),
        error=d.get("error"),
        data_bit_depth=d.get("data_bit_depth"),
        ensemble=d.get("ensemble"),
        small_set=d.get("small_set"),
    )


def run_bit_depth(config: RunConfig, info: RunInfo) -> BitDepth:
    """How a run reads 16-bit images (images.BitDepth): as it read its training images."""
    from cxrlab.data.images import BitDepth  # here: `cxrlab runs` imports no PIL

    return BitDepth(config.bit_depth, info.data_bit_depth)


def write_threshold(run_dir: Path, threshold: float) -> None:
    """RUN_DIR/threshold: the decision threshold, repr'd so it reads back bit for bit."""
    atomic_write_text(Path(run_dir) / "threshold", f"{float(threshold)!r}\n")


def read_threshold(run_dir: Path) -> float | None:
    """The run's threshold (None: not a 2-class run). The one source: metrics.json repeats
    it for readers of that file, but every cxrlab command takes it from here."""
    path = Path(run_dir) / "threshold"
    return float(path.read_text()) if path.is_file() else None


# -- split.csv --------------------------------------------------------------------------

SPLIT_CSV_COLUMNS = ("path", "label", "split", "patient")


def write_split_csv(path: Path | str, source: Source, result: SplitResult) -> None:
    """path,label,split,patient per record: the run's split, readable without cxrlab."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    # surrogateescape: a file name that is not UTF-8 (bytes on Linux) round-trips unchanged
    with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(SPLIT_CSV_COLUMNS)
        for r, s, g in zip(source.records, result.splits, result.groups, strict=True):
            w.writerow([str(r.path), r.label, s, g])
    tmp.replace(path)


def read_csv_rows(path: Path, columns: Sequence[str], what: str) -> list[dict[str, str]]:
    """Rows of one of the run's own CSV files, refused in one line when a column is missing.

    Paths are read back with surrogateescape, as they were written, so undecodable file names
    round-trip."""
    try:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            found = reader.fieldnames or []
    except OSError as e:
        raise CxrlabError(f"{path}: cannot read {what} ({e.strerror})") from None
    missing = [c for c in columns if c not in found]
    if missing:
        raise CxrlabError(f"{path}: not a {what} (missing column {missing[0]!r})")
    return rows


def read_split_csv(path: Path | str) -> list[dict[str, str]]:
    """Rows of a split.csv as dicts (keys path, label, split, patient)."""
    path = Path(path)
    rows = read_csv_rows(path, SPLIT_CSV_COLUMNS, "split CSV")
    bad = next((r for r in rows if r["split"] not in ("train", "val", "test")), None)
    if bad is not None:
        raise CxrlabError(f"{path}: unknown split {bad['split']!r} for {bad['path']}")
    return rows


def patient_keys(run_dir: Path, paths: list[str]) -> list[str] | None:
    """Patient key per image from the run's split.csv, for a patient bootstrap; None when it
    has none (then every image counts as independent)."""
    if not (Path(run_dir) / "split.csv").is_file():
        return None
    return patients_of(read_split_csv(Path(run_dir) / "split.csv"), paths)


def patients_of(split_rows: list[dict[str, str]], paths: list[str]) -> list[str] | None:
    """`patient_keys` from split.csv rows already read."""
    patient = {r["path"]: r["patient"] for r in split_rows}
    keys = [patient.get(p, "") for p in paths]
    return keys if any(keys) else None


# -- history.csv ------------------------------------------------------------------------

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "train_acc", "val_acc", "train_precision",
                   "val_precision", "train_recall", "val_recall", "val_auc", "lr", "seconds"]


def write_history(path: Path, rows: list[dict]) -> None:
    """history.csv, one row per epoch (HISTORY_COLUMNS), replaced whole after each epoch."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()}
                for r in csv.DictReader(f)]


# -- val_predictions.csv ----------------------------------------------------------------

def write_predictions_csv(path: Path, paths: list, labels: list[str], probs: np.ndarray,
                          classes: list[str]) -> None:
    """path,label,p_<class>... per validation image: what the report's calibration and
    gallery, crossval's pooled decisions and calibrate are computed from, without reloading the
    model. Written exactly (shortest round-trip repr): at 6 digits a score within 5e-7 of the
    threshold decided differently from the CSV than in the run's own metrics."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", *[f"p_{c}" for c in classes]])
    for p, lab, row in zip(paths, labels, probs, strict=True):
        w.writerow([str(p), lab, *[repr(float(v)) for v in row]])
    atomic_write_text(path, buf.getvalue())


def read_predictions(path: Path, classes: list[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(paths, label indices, probabilities) of a predictions CSV, as written above."""
    try:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise CxrlabError(f"{path}: cannot read ({e.strerror})") from None
    cols = [f"p_{c}" for c in classes]
    try:
        y = np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)
        probs = np.array([[float(r[c]) for c in cols] for r in rows], dtype=np.float64)
    except (KeyError, ValueError) as e:
        raise CxrlabError(f"{path}: not a cxrlab predictions file ({e})") from None
    return [r["path"] for r in rows], y, probs.reshape(len(rows), len(classes))


@dataclass
class LoadedRun:
    """What evaluate / predict need from a finished run."""

    run_dir: Path
    config: RunConfig
    info: RunInfo
    threshold: float | None
    model: torch.nn.Module

    @property
    def classes(self) -> list[str]:
        return self.info.classes

    @property
    def bit_depth(self) -> BitDepth:
        """images.BitDepth: every image this run reads is scaled as its training images were."""
        return run_bit_depth(self.config, self.info)

    @property
    def tta(self) -> str:
        """The test-time augmentation `model` scores with (cxrlab.models.tta)."""
        from cxrlab.models.tta import tta_of

        return tta_of(self.model)


def apply_tta(run: LoadedRun, tta: str | None = None) -> LoadedRun:
    """`run` scoring with test-time augmentation `tta` (None: the run's own, config `tta`, with
    which its threshold was chosen); another setting is allowed, with a one-line note."""
    from cxrlab.models.tta import check_tta, with_tta

    want = run.config.tta if tta is None else check_tta(tta)
    if want != run.config.tta:
        log.warning("--tta %s: the run's threshold was chosen on validation scores with tta "
                    "%s", want, run.config.tta)
    run.model = with_tta(run.model, want)
    return run


def load_run(run_dir: Path, tta: str | None = None) -> LoadedRun:
    """A finished run, its model in eval mode under test-time augmentation `tta` (None: the
    run's own; see apply_tta)."""
    import torch

    from cxrlab.models import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CxrlabError(f"{run_dir}: run directory not found")
    info = load_info(run_dir)
    if info.state != "complete" or not (run_dir / "model.pt").is_file():
        raise CxrlabError(f"{run_dir}: run is not complete (state: {info.state})")
    config = RunConfig.load(run_dir / "config.yaml")
    model = create_model(
        config.model,
        num_classes=1 if len(info.classes) == 2 else len(info.classes),
        in_chans=info.in_chans,
        dropout=config.dropout,
        batchnorm=config.batchnorm,
        image_size=config.image_size, intensity=config.intensity,
        head=config.head,
    )
    if info.ensemble:  # members share the architecture; model.pt holds all their weights
        from cxrlab.models.ensemble import EnsembleModel

        model = EnsembleModel([copy.deepcopy(model) for _ in info.ensemble["members"]])
    state = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return apply_tta(LoadedRun(run_dir, config, info, read_threshold(run_dir), model), tta)


def run_state(run_dir: Path, config: RunConfig) -> str:
    """'missing', 'complete' or 'broken' (half-written by a killed or failed sweep).

    A complete run trained with another configuration is an error, not something to redo.
    """
    if not run_dir.exists():
        return "missing"
    try:
        info = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return "broken"
    needed = ("config.yaml", "model.pt", "metrics.json")
    if info.get("state") != "complete" or not all((run_dir / f).is_file() for f in needed):
        return "broken"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    want = config.model_dump()
    want.pop("loggers")  # where the numbers are also sent does not change the run
    fields = RunConfig.model_fields  # a key added since the run was saved: its default
    diff = [k for k in want
            if saved.get(k, fields[k].get_default(call_default_factory=True)) != want[k]]
    if diff:
        k = diff[0]
        raise CxrlabError(f"{run_dir}: was trained with {k}={saved.get(k)!r}, now asked for "
                          f"{want[k]!r}; use a new --out for a changed study")
    return "complete"


def move_aside(run_dir: Path) -> Path:
    """Keep what a killed run left, out of the way: `<name>.failed-<UTC time>`."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.failed-{stamp}")
    k = 1
    while target.exists():
        k += 1
        target = run_dir.with_name(f"{run_dir.name}.failed-{stamp}-{k}")
    run_dir.rename(target)
    return target


SHIFT_JSON = "shift.json"  # written by cxrlab.site.shift (`evaluate --shift`)


def read_shift(run_dir: Path) -> dict | None:
    """The saved stress test of a run, or None."""
    path = Path(run_dir) / SHIFT_JSON
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s: not readable JSON; stress test ignored", path)
        return None
