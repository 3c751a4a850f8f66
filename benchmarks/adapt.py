"""Does adapting without labels help? `cxrlab adapt`'s candidates on shifted intakes, honestly.

    nice -n 10 python benchmarks/adapt.py RUN [RUN ...] --json benchmarks/results/adapt-....json

For each run, on its own validation images (split.csv): an "intake" with the prevalence of the
Kermany official test (0.625 pneumonia; all normal films kept, pneumonia films subsampled,
seeded), under each stress shift of `cxrlab.site.shift` (and none). The intake is split in two
random halves (stratified by nothing the method sees: a seeded permutation); each half is
adapted on (labels hidden) and the OTHER half scored, and the two scored halves pooled, so
every image is scored once by a model that never saw it. Methods, each at the run's threshold
unless it moves it:

- none: the run as it is;
- prevalence: EM on Platt-calibrated posteriors (Saerens 2002), threshold moved (site/adapt.py);
- bn:W: BatchNorm statistics re-estimated on the adaptation half (shuffled batches of 64),
  intake weight W = n / (N + n) (W 1: AdaBN; below: Schneider et al.'s prior of N images);
- bn:W+prevalence: both, the prevalence estimated on the adapted model's scores.

Also one trap, measured once per run on the unshifted intake: the statistics from the
class-sorted order without shuffling, scored the same way.

Selection-biased like every validation figure (the epoch and threshold were chosen on these
images), alike for every method. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from throughput import cpu_name

from cxrlab.data.cache import load_images
from cxrlab.deploy.inference import predict_probs
from cxrlab.run import load_run
from cxrlab.site.adapt import (
    _logit,
    _sigmoid,
    em_prevalence,
    intake_statistics,
    mixed,
    shifted_threshold,
    validation_calibration,
)
from cxrlab.site.shift import apply_shift, score

PREVALENCE = 0.625  # the Kermany official test split's (390 / 624)
SHIFTS = [("none", 0), ("zoom", 2), ("zoom", 3), ("gamma", 2), ("contrast", 3), ("blur", 2),
          ("border", 2), ("brightness", 3)]
WEIGHTS = (1.0, 0.5, 0.25)


def intake(run_dir: Path, run, seed: int, max_images: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    rows = [r for r in csv.DictReader(open(run_dir / "split.csv")) if r["split"] == "val"]
    y = np.array([run.classes.index(r["label"]) for r in rows])
    images, _ = load_images([r["path"] for r in rows], run.config.image_size,
                            run.info.in_chans, bit_depth=run.bit_depth)
    pos = run.info.positive
    rng = np.random.default_rng(seed)
    neg_idx, pos_idx = np.flatnonzero(y != pos), np.flatnonzero(y == pos)
    k = min(len(pos_idx), round(len(neg_idx) * PREVALENCE / (1 - PREVALENCE)))
    keep = np.sort(np.concatenate([neg_idx, rng.choice(pos_idx, k, replace=False)]))
    if max_images and len(keep) > max_images:  # a smaller intake, same prevalence (CPU time)
        keep = np.sort(rng.choice(keep, max_images, replace=False))
    return images[keep], y[keep]


def evaluate(run, images: np.ndarray, y: np.ndarray, seed: int, cal, sorted_trap: bool,
             weights: tuple[float, ...]) -> dict:
    pos, t = run.info.positive, run.threshold
    a, b, pi = cal
    halves = np.array_split(np.random.default_rng(seed + 1).permutation(len(y)), 2)
    probs = {}  # method -> positive scores in intake order
    thr = {}  # method -> per-image threshold
    est = {}  # method -> [prevalence estimated on each adaptation half]

    def put(name, idx, p, th, q=None):
        probs.setdefault(name, np.zeros(len(y)))[idx] = p
        thr.setdefault(name, np.zeros(len(y)))[idx] = th
        if q is not None:
            est.setdefault(name, []).append(q)

    base = predict_probs(run.model, images)[:, pos]
    for h in range(2):
        adapt_idx, score_idx = halves[h], halves[1 - h]
        n = len(adapt_idx)

        def prev(adapt_scores):
            q = em_prevalence(_sigmoid(a * _logit(adapt_scores) + b), pi)
            return q, shifted_threshold(t, a, pi, q)

        put("none", score_idx, base[score_idx], t)
        q, t2 = prev(base[adapt_idx])
        put("prevalence", score_idx, base[score_idx], t2, q)
        orders = [("", adapt_idx)]
        if sorted_trap:  # class-sorted intake, batched in that order (the trap)
            orders.append(("sorted-unshuffled ", adapt_idx[np.argsort(y[adapt_idx],
                                                                        kind="stable")]))
        for tag, idx in orders:
            stats = intake_statistics(run.model, images[idx], seed=seed, shuffle=not tag,
                                      frozen_stages=run.config.frozen_stages)
            for w in weights if not tag else (1.0,):
                model = mixed(run.model, stats, n, n * (1 - w) / w)
                p = predict_probs(model, images)[:, pos]
                put(f"{tag}bn:{w:g}", score_idx, p[score_idx], t)
                if not tag:
                    q, t2 = prev(p[adapt_idx])
                    put(f"bn:{w:g}+prevalence", score_idx, p[score_idx], t2, q)
    out = {}
    for name, p in probs.items():
        called = p >= thr[name]
        s = score(y, np.stack([1 - p, p], 1), pos, 0.5)  # AUC; decisions redone below
        is_pos = y == pos
        out[name] = {"roc_auc": s["roc_auc"], "accuracy": float((called == is_pos).mean()),
                     "sensitivity": float(called[is_pos].mean()),
                     "specificity": float((~called[~is_pos]).mean()),
                     "thresholds": sorted({float(v) for v in thr[name]}),
                     "prevalence_estimates": est.get(name)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shifts", default=",".join(f"{n}:{k}" for n, k in SHIFTS),
                    help="name:severity,... (none: unshifted)")
    ap.add_argument("--max-images", type=int, default=None,
                    help="a random subset of the intake, same prevalence (CPU time)")
    ap.add_argument("--trap", action=argparse.BooleanOptionalAction, default=True,
                    help="also the class-sorted, unshuffled statistics on the unshifted intake")
    ap.add_argument("--weights", default=",".join(map(str, WEIGHTS)),
                    help="intake weights W = n / (N + n) of the BatchNorm statistics")
    args = ap.parse_args()
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "cpu": cpu_name(),
              "cores": os.cpu_count(), "python": sys.version.split()[0], "precision": "fp32",
              "command": "nice -n 10 python " + " ".join(sys.argv), "prevalence": PREVALENCE,
              "what": __doc__, "runs": {}}
    for run_dir in args.runs:
        run = load_run(run_dir)
        cal = validation_calibration(run)
        images, y = intake(run_dir, run, args.seed, args.max_images)
        r = {"n": int(len(y)), "n_positive": int((y == run.info.positive).sum()),
             "threshold": run.threshold, "validation_prevalence": cal[2],
             "platt": list(cal[:2]), "shifts": {}}
        for item in args.shifts.split(","):
            name, _, sev = item.partition(":")
            sev = int(sev or 0)
            x = images if name == "none" else apply_shift(images, name, sev, args.seed)
            key = name if name == "none" else f"{name}:{sev}"
            r["shifts"][key] = evaluate(run, x, y, args.seed, cal,
                                        sorted_trap=args.trap and name == "none",
                                        weights=tuple(float(w) for w in args.weights.split(",")))
            row = r["shifts"][key]
            print(run_dir, key, " ".join(
                f"{m}={v['accuracy']:.3f}/{v['sensitivity']:.2f}/{v['specificity']:.2f}"
                for m, v in row.items()), flush=True)
            result["runs"][str(run_dir)] = r
            args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
