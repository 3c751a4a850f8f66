"""Does a recipe hold when the framing changes? Two runs on the same split, paired.

    python benchmarks/framing.py BASE_RUN NEW_RUN --json benchmarks/results/framing-....json

For each run, on its own validation images (split.csv; the two runs must share them): the
stress test of `cxrlab evaluate RUN VAL --shift` (`cxrlab.site.shift.stress_test` through
`predict_probs`, the run's threshold and seed, exactly as `evaluate` calls it; the unshifted
scores are checked against the run's val_predictions.csv), plus one shift of this script's
own, "margins": the outer 12% of the width on each side brightened by 20 / 40 / 70 grey levels
(a hard-edged, additive lift; the held-back intake's normal films have brighter lateral
margins than the training normals). Every image's probability under every shift is kept, so
this also reports, per shift and level:

- sensitivity / specificity at the run's threshold, at the threshold the default rule
  (target sensitivity 0.97, since 2026-12-06) picks on clean validation, and at target
  sensitivity 0.95 (runs trained before 2026-12-06 carry Youden's J as their threshold);
- where each rule would put the threshold if it were chosen on the shifted images instead
  (how far the choice moves);
- the paired change of decisions between the runs (NEW minus BASE, each at its own threshold,
  and each at its default-rule threshold): images that became right, became wrong, and the
  exact McNemar p.

Selection-biased like every validation figure (the epoch and threshold were chosen on these
images), alike for both runs. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from scipy.stats import binomtest
from throughput import cpu_name

from cxrlab.data.cache import load_images
from cxrlab.deploy.inference import predict_probs
from cxrlab.evaluation.metrics import choose_threshold
from cxrlab.run import load_run, read_predictions
from cxrlab.site.shift import stress_test

MARGIN_LEVELS = (20, 40, 70)  # grey levels added to the outer MARGIN_WIDTH of each side
MARGIN_WIDTH = 0.12
DEFAULT_TARGET = 0.97  # the default threshold rule's target sensitivity (config.py)


def margins(images: np.ndarray, level: float) -> np.ndarray:
    """The outer MARGIN_WIDTH of the width on each side brightened by `level` grey levels."""
    out = images.astype(np.float32)
    k = max(1, round(images.shape[-1] * MARGIN_WIDTH))
    out[..., :k] += level
    out[..., -k:] += level
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def val_records(run: Path) -> tuple[list[Path], list[str]]:
    rows = [r for r in csv.DictReader(open(run / "split.csv")) if r["split"] == "val"]
    return [Path(r["path"]) for r in rows], [r["label"] for r in rows]


def rates(is_pos: np.ndarray, p: np.ndarray, t: float) -> dict:
    call = p >= t
    return {"sensitivity": float(call[is_pos].mean()),
            "specificity": float((~call[~is_pos]).mean())}


def score_run(run_dir: Path, cache: Path) -> dict:
    """Probabilities of the positive class on the run's validation images, clean and under
    every shift and level, and the stress test's own result."""
    npz = cache / f"{run_dir.name}-probs.npz"
    res = cache / f"{run_dir.name}-stress.json"
    run = load_run(run_dir)
    pos = run.info.positive
    paths, labels = val_records(run_dir)
    y = np.array([run.classes.index(c) for c in labels])
    if npz.is_file() and res.is_file():
        return {"run": run, "y": y, "paths": paths, "probs": dict(np.load(npz)),
                "stress": json.loads(res.read_text())}
    images, bad = load_images(paths, run.config.image_size, run.info.in_chans)
    assert not bad, bad
    calls: list[np.ndarray] = []

    def predict(x: np.ndarray) -> np.ndarray:
        p = predict_probs(run.model, x)
        calls.append(p[:, pos])
        return p

    t0 = time.time()
    stress = stress_test(predict, images, y, pos, run.threshold, seed=run.config.seed)
    stress["wall_s"] = round(time.time() - t0, 1)
    # stress_test scores every row in order, then the baseline
    keys = [f"{r['shift']}:{r['severity']}" for r in stress["rows"]] + ["none:0"]
    assert len(calls) == len(keys), (len(calls), len(keys))
    probs = dict(zip(keys, calls, strict=True))
    for k, level in enumerate(MARGIN_LEVELS, start=1):
        probs[f"margins:{k}"] = predict(margins(images, level))[:, pos]
    # the unshifted scores are the run's own validation predictions
    vpaths, vy, vprobs = read_predictions(run_dir / "val_predictions.csv", run.classes)
    order = {p: i for i, p in enumerate(vpaths)}
    ref = vprobs[[order[str(p)] for p in paths], pos]
    stress["max_diff_vs_val_predictions"] = float(np.abs(ref - probs["none:0"]).max())
    assert stress["max_diff_vs_val_predictions"] < 1e-4, stress["max_diff_vs_val_predictions"]
    np.savez(npz, **probs)
    res.write_text(json.dumps(stress, indent=1))
    return {"run": run, "y": y, "paths": paths, "probs": probs, "stress": stress}


def summarise(s: dict, target: float = 0.95) -> dict:
    run, y, probs = s["run"], s["y"], s["probs"]
    is_pos = y == run.info.positive
    clean = probs["none:0"]
    t_run = run.threshold
    t_sens = choose_threshold(is_pos, clean, "sensitivity", target)
    t_default = default_threshold(s)
    rows = {}
    for key, p in probs.items():
        from sklearn.metrics import roc_auc_score

        rows[key] = {
            "roc_auc": float(roc_auc_score(is_pos, p)),
            "at_run_threshold": rates(is_pos, p, t_run),
            "at_target_sensitivity": rates(is_pos, p, t_sens),
            "at_default_rule": rates(is_pos, p, t_default),
            "youden_rechosen": choose_threshold(is_pos, p, "youden"),
            "target_sensitivity_rechosen": choose_threshold(is_pos, p, "sensitivity", target),
            "normals_median_p": float(np.median(p[~is_pos])),
            "pneumonia_median_p": float(np.median(p[is_pos])),
        }
    return {"run": str(run.run_dir), "augment": run.config.augment, "n": int(len(y)),
            "n_positive": int(is_pos.sum()), "threshold_run": t_run,
            "threshold_target_sensitivity_0.95": t_sens,
            "threshold_default_rule": t_default,
            "stress_wall_s": s["stress"].get("wall_s"),
            "max_diff_vs_val_predictions": s["stress"]["max_diff_vs_val_predictions"],
            "rows": rows}


def default_threshold(s: dict) -> float:
    """The default rule's threshold on the run's clean validation scores."""
    is_pos = s["y"] == s["run"].info.positive
    return choose_threshold(is_pos, s["probs"]["none:0"], "sensitivity", DEFAULT_TARGET)


def paired(a: dict, b: dict, default_rule: bool = False) -> dict:
    """b minus a, each at its own run threshold (or each at its default-rule threshold):
    decisions that became right / wrong."""
    assert [str(p) for p in a["paths"]] == [str(p) for p in b["paths"]], "different images"
    y = a["y"]
    is_pos = y == a["run"].info.positive
    ta, tb = ((default_threshold(a), default_threshold(b)) if default_rule
              else (a["run"].threshold, b["run"].threshold))
    out = {}
    for key in a["probs"]:
        ra = (a["probs"][key] >= ta) == is_pos
        rb = (b["probs"][key] >= tb) == is_pos
        fixed, broke = int((~ra & rb).sum()), int((ra & ~rb).sum())
        p = binomtest(fixed, fixed + broke).pvalue if fixed + broke else 1.0
        out[key] = {"became_right": fixed, "became_wrong": broke, "mcnemar_exact_p": float(p),
                    "normals_became_right": int((~ra & rb & ~is_pos).sum()),
                    "normals_became_wrong": int((ra & ~rb & ~is_pos).sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=None,
                    help="where the per-image probabilities are kept (default: next to --json)")
    args = ap.parse_args()
    cache = args.cache or args.json.parent
    cache.mkdir(parents=True, exist_ok=True)
    a, b = score_run(args.base, cache), score_run(args.new, cache)
    result = {"date": datetime.now(UTC).isoformat(timespec="minutes"),
              "cpu": cpu_name(), "cores": os.cpu_count(), "python": sys.version.split()[0],
              "precision": "fp32 (predict_probs scores every run in fp32)",
              "margins_shift": {"levels_grey": MARGIN_LEVELS, "width_per_side": MARGIN_WIDTH},
              "base": summarise(a), "new": summarise(b), "new_minus_base": paired(a, b),
              "new_minus_base_default_rule": paired(a, b, default_rule=True)}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    keys = ["none:0"] + [k for k in a["probs"] if k != "none:0"]
    print(f"thresholds at the default rule: base {result['base']['threshold_default_rule']:.3f}, "
          f"new {result['new']['threshold_default_rule']:.3f}")
    print("| shift | base AUC | new AUC | base sens / spec | new sens / spec | "
          "became right / wrong (McNemar p) |")
    for k in keys:
        ra, rb = result["base"]["rows"][k], result["new"]["rows"][k]
        d = result["new_minus_base_default_rule"][k]
        qa, qb = ra["at_default_rule"], rb["at_default_rule"]
        print(f"| {k} | {ra['roc_auc']:.4f} | {rb['roc_auc']:.4f}"
              f" | {qa['sensitivity']:.3f} / {qa['specificity']:.3f}"
              f" | {qb['sensitivity']:.3f} / {qb['specificity']:.3f}"
              f" | {d['became_right']} / {d['became_wrong']} ({d['mcnemar_exact_p']:.3g}) |")


if __name__ == "__main__":
    main()
