"""Which recipe holds on a new intake? Variants trained on one proxy, each scored on the same
patient-grouped validation images clean and under `cxrlab evaluate --shift`.

    python benchmarks/robustness.py ../shared/data/chest_xray/train --out runs/robust
    python benchmarks/robustness.py DATA --out OUT --variants base intensity intensity+wise

The proxy (so that six recipes fit a 2-core session): every second patient of DATA (symlinks),
128 px, 5 epochs (1 head-only + 4), no time budget, seed 0: the same split for every variant.
Each variant is `cxrlab train` with its options, then `cxrlab evaluate RUN VAL --shift` on the
run's own validation images (selection-biased for the threshold, alike for every variant).
The table: validation AUC and accuracy, then the stress test's severities 1-2 (what a new
site plausibly does; 3 is extreme): mean AUC, the lowest AUC over all 30 cells, and at the
run's own threshold mean accuracy, specificity, sensitivity and the lowest specificity.
WiSE-FT weights other than the run's can be scored offline from checkpoints/head_trained.pt
and checkpoints/best.ckpt (see `wise_sweep` below). Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from throughput import cpu_name

from cxrlab.data.split import patient_key

VARIANTS = {  # name -> train options (on top of the proxy's)
    "light": ["--augment", "light", "--wise-ft", "1"],  # the recipe before 2026-12-01
    "light+wise": ["--augment", "light", "--wise-ft", "0.5"],
    "light+image": ["--augment", "light", "--wise-ft", "1", "--intensity", "image"],
    "intensity": ["--augment", "intensity", "--wise-ft", "1"],
    "intensity+wise": ["--augment", "intensity", "--wise-ft", "0.5"],
    "intensity+wise+image": ["--augment", "intensity", "--wise-ft", "0.5",
                             "--intensity", "image"],
}


def half(data: Path, out: Path) -> Path:
    """Every second patient (sorted keys; a file without one is its own) of each class
    folder, as symlinks."""
    dst = out / "proxy"
    if dst.is_dir():
        return dst
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        key = {f: patient_key(f) or f.stem for f in files}
        keep = set(sorted(set(key.values()))[::2])
        (dst / cls.name).mkdir(parents=True)
        for f in files:
            if key[f] in keep:
                (dst / cls.name / f.name).symlink_to(f.resolve())
    return dst


def val_folder(run: Path, out: Path) -> Path:
    """The run's validation images as class folders (symlinks), for `cxrlab evaluate`."""
    import csv

    dst = out / "val"
    if not dst.is_dir():
        for row in csv.DictReader(open(run / "split.csv")):
            if row["split"] == "val":
                (dst / row["label"]).mkdir(parents=True, exist_ok=True)
                (dst / row["label"] / Path(row["path"]).name).symlink_to(
                    Path(row["path"]).resolve())
    return dst


def row(name: str, run: Path) -> dict:
    m = json.loads((run / "eval.json").read_text())
    sh = m["shift"]
    rows = [r for r in sh["rows"] if r["severity"] < 3]
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    return {"variant": name, "val_auc": sh["baseline"]["roc_auc"],
            "val_accuracy": sh["baseline"]["accuracy"], "threshold": sh["threshold"],
            "shift_auc": mean("roc_auc"),
            "shift_min_auc": min(r["roc_auc"] for r in sh["rows"]),
            "shift_accuracy": mean("accuracy"), "shift_specificity": mean("specificity"),
            "shift_sensitivity": mean("sensitivity"),
            "shift_min_specificity": min(r["specificity"] for r in rows),
            "wall_s": float((run / "wall_seconds").read_text())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    proxy = half(args.data, args.out)
    results = []
    for name in args.variants:
        run = args.out / name
        if not (run / "metrics.json").is_file():
            t0 = time.time()
            subprocess.run(["cxrlab", "train", str(proxy), "--out", str(run), "--image-size",
                            "128", "--epochs", "5", "--time-budget", "none", "-q",
                            *VARIANTS[name]], check=True)
            (run / "wall_seconds").write_text(f"{time.time() - t0:.0f}\n")
        val = val_folder(run, args.out)
        if not (run / "eval.json").is_file():
            subprocess.run(["cxrlab", "evaluate", str(run), str(val), "--shift", "--json",
                            str(run / "eval.json")], check=True, stdout=subprocess.DEVNULL)
        results.append(row(name, run))
    keys = list(results[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in results:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                for v in r.values()) + " |")
    (args.out / "robustness.json").write_text(json.dumps(
        {"cpu": cpu_name(), "cores": os.cpu_count(), "python": sys.version.split()[0],
         "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
