"""Does site calibration ever make screening worse? Repeated small-sample splits of shifted
validation films, each calibration variant against no calibration.

    nice -n 10 python benchmarks/site_calibration.py RUN --cache /tmp/sitecal \\
        --json benchmarks/results/site-calibration-....json

1. Score once (inference only, cached per shift in --cache): the run's own validation images
   (split.csv), clean and under stress shifts of `cxrlab.site.shift` (framing = `zoom`, which
   pushes normal films towards pneumonia as the held-back intake does; intensity; blur ...)
   plus framing.py's "margins" (brighter lateral margins, the held-back normals' cue).
2. For each shifted set, --repeats random 10% / 90% splits, stratified by class and drawn by
   patient (split.csv's patient column: no patient on both sides): every variant of
   `cxrlab.site.calibration.fit_binary` is fitted on the 10% through the library's own code,
   and its decisions on the 90% are scored (accuracy, sensitivity, specificity) beside the
   uncalibrated run at its own threshold on the same 90%.

Selection-biased like every validation figure (the epoch and threshold were chosen on the
clean images); the shifts are synthetic. Never part of the test suite.
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

sys.path.insert(0, str(Path(__file__).parent))
from throughput import cpu_name  # noqa: E402

# (shift, severity) scored; margins is framing.py's own shift (level = grey levels added)
SHIFTED = [("zoom", 2), ("zoom", 3), ("margins", 2), ("contrast", 2), ("gamma", 2),
           ("brightness", 2), ("blur", 2), ("zoom", 1)]
MARGIN_LEVELS = {1: 20, 2: 40, 3: 70}


def margins(images: np.ndarray, level: float) -> np.ndarray:
    """The outer 12% of the width on each side brightened by `level` grey levels."""
    out = images.astype(np.float32)
    k = max(1, round(images.shape[-1] * 0.12))
    out[..., :k] += level
    out[..., -k:] += level
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def val_rows(run: Path) -> list[dict]:
    with open(run / "split.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "val"]


def score(run_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """{"none:0" | "shift:severity": positive-class probability per validation image}; each
    set is scored once and cached (cache/<key>.npy), so an interrupted run resumes."""
    from cxrlab.data.cache import load_images
    from cxrlab.deploy.inference import predict_probs
    from cxrlab.run import load_run, read_predictions
    from cxrlab.site.shift import apply_shift

    cache.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir)
    pos = run.info.positive
    rows = val_rows(run_dir)
    keys = ["none:0"] + [f"{s}:{k}" for s, k in SHIFTED]
    out = {k: np.load(cache / f"{k}.npy") for k in keys if (cache / f"{k}.npy").is_file()}
    if len(out) == len(keys):
        return out
    images, bad = load_images([Path(r["path"]) for r in rows], run.config.image_size,
                              run.info.in_chans, bit_depth=run.bit_depth)
    assert not bad, bad
    for key in keys:
        if key in out:
            continue
        name, sev = key.split(":")
        x = images if name == "none" else (
            margins(images, MARGIN_LEVELS[int(sev)]) if name == "margins"
            else apply_shift(images, name, int(sev), seed=run.config.seed))
        t0 = time.time()
        out[key] = predict_probs(run.model, x)[:, pos].astype(np.float64)
        np.save(cache / f"{key}.npy", out[key])
        print(f"scored {key}: {len(x)} images in {time.time() - t0:.0f} s", flush=True)
    vpaths, _, vprobs = read_predictions(run_dir / "val_predictions.csv", run.classes)
    order = {p: i for i, p in enumerate(vpaths)}
    ref = vprobs[[order[r["path"]] for r in rows], pos]
    diff = float(np.abs(ref - out["none:0"]).max())
    assert diff < 1e-5, f"clean scores differ from val_predictions.csv by {diff}"
    return out


def split(rng: np.random.Generator, is_pos: np.ndarray, patient: np.ndarray,
          fraction: float) -> np.ndarray:
    """Mask of the calibration side: `fraction` of the patients with a positive film and of
    those with none, drawn at random (whole patients, so none is on both sides)."""
    pos = np.unique(patient[is_pos])
    neg = np.setdiff1d(np.unique(patient[~is_pos]), pos)
    take = [rng.choice(g, max(1, round(fraction * len(g))), replace=False) for g in (pos, neg)]
    return np.isin(patient, np.concatenate(take))


def variants(val_sens: float) -> dict[str, tuple[str, str, float, float]]:
    """name -> (map, rule, target sensitivity, confidence), the old default first. Every map
    is monotone, so a rank rule's decisions hardly depend on it (up to where the midpoint
    between two scores falls): the maps are compared by log-loss, the rules by decisions."""
    return {
        "platt + youden (old default)": ("platt", "youden", 0.95, 0.9),
        "intercept + sensitivity val (plain)": ("intercept", "sensitivity", val_sens, 0.9),
        "intercept + sensitivity 0.95 (plain)": ("intercept", "sensitivity", 0.95, 0.9),
        "intercept + keep val @0.9 (new default)": ("intercept", "keep-sensitivity", val_sens,
                                                    0.9),
        "intercept + keep 0.95 @0.9": ("intercept", "keep-sensitivity", 0.95, 0.9),
        "intercept + keep 0.95 @0.8": ("intercept", "keep-sensitivity", 0.95, 0.8),
    }


def rates(is_pos: np.ndarray, called: np.ndarray) -> tuple[float, float, float]:
    return (float((called == is_pos).mean()), float(called[is_pos].mean()),
            float((~called[~is_pos]).mean()))


def log_loss(is_pos: np.ndarray, z: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0, np.where(is_pos, -z, z))))


def evaluate(probs: dict[str, np.ndarray], is_pos: np.ndarray, patient: np.ndarray,
             run_threshold: float, fraction: float, repeats: int, seed: int) -> dict:
    from cxrlab.site.calibration import REFITS, _logit, _sigmoid, site_threshold

    val_sens = float((probs["none:0"][is_pos] >= run_threshold).mean())
    vs = variants(val_sens)
    out = {}
    for key, p in probs.items():
        z = _logit(p)
        rng = np.random.default_rng(seed)
        res: dict[str, list] = {k: [] for k in ["none", *vs]}
        nll: dict[str, list] = {k: [] for k in ["none", *REFITS]}
        n_cal = []
        for _ in range(repeats):
            cal = split(rng, is_pos, patient, fraction)
            test = ~cal
            n_cal.append(int(cal.sum()))
            yt = is_pos[test]
            res["none"].append((*rates(yt, p[test] >= run_threshold), run_threshold))
            nll["none"].append(log_loss(yt, z[test]))
            maps = {m: f(z[cal], is_pos[cal]) for m, f in REFITS.items()}
            for m, (a, b) in maps.items():
                nll[m].append(log_loss(yt, a * z[test] + b))
            for name, (m, rule, target, conf) in vs.items():
                a, b = maps[m]
                score = _sigmoid(a * z + b)
                t = site_threshold(is_pos[cal], score[cal], rule, target, conf)
                # the threshold on the original scale, for its spread across splits
                t0 = float(_sigmoid((_logit(np.array([t]))[0] - b) / a))
                res[name].append((*rates(yt, score[test] >= t), t0))
        none = np.array(res["none"])
        rows = {}
        for name, r in res.items():
            r = np.array(r)
            rows[name] = {
                "accuracy": r[:, 0].mean(), "sensitivity": r[:, 1].mean(),
                "specificity": r[:, 2].mean(),
                "sensitivity_p10": np.percentile(r[:, 1], 10),
                "accuracy_p10": np.percentile(r[:, 0], 10),
                "frac_sens_not_below_uncalibrated": np.mean(r[:, 1] >= none[:, 1] - 1e-12),
                "frac_sens_not_below_min_uncal_0.95": np.mean(
                    r[:, 1] >= np.minimum(none[:, 1], 0.95) - 1e-12),
                "frac_sens_at_least_0.95": np.mean(r[:, 1] >= 0.95 - 1e-12),
                "frac_acc_above_uncalibrated": np.mean(r[:, 0] > none[:, 0] + 1e-12),
                "frac_acc_below_uncalibrated": np.mean(r[:, 0] < none[:, 0] - 1e-12),
                "threshold_median": np.median(r[:, 3]),
                "threshold_p10_p90": np.percentile(r[:, 3], [10, 90]).tolist(),
            }
            rows[name] = {k: (round(float(v), 4) if np.isscalar(v) else [round(x, 4) for x in v])
                          for k, v in rows[name].items()}
        out[key] = {"n_calibration_median": int(np.median(n_cal)),
                    "n_positive": int(is_pos.sum()), "n": int(len(is_pos)),
                    "auc": auc(is_pos, p), "variants": rows,
                    "test_log_loss_mean": {k: round(float(np.mean(v)), 4)
                                           for k, v in nll.items()}}
    return {"validation_sensitivity_at_run_threshold": val_sens, "sets": out}


def auc(is_pos: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(is_pos, p)), 4)


def table(result: dict) -> str:
    lines = []
    for key, s in result["sets"].items():
        lines.append(f"== {key}: AUC {s['auc']}, ~{s['n_calibration_median']} calibration films; "
                     f"test log-loss {s['test_log_loss_mean']}")
        lines.append(f"{'variant':42s} {'acc':>6s} {'sens':>6s} {'spec':>6s} {'sens10':>6s} "
                     f"{'s>=unc':>6s} {'s>=min':>6s} {'s>=.95':>6s} {'acc>u':>6s} "
                     f"{'acc<u':>6s} thr")
        for name, r in s["variants"].items():
            lines.append(
                f"{name:42s} {r['accuracy']:6.3f} {r['sensitivity']:6.3f} "
                f"{r['specificity']:6.3f} {r['sensitivity_p10']:6.3f} "
                f"{r['frac_sens_not_below_uncalibrated']:6.2f} "
                f"{r['frac_sens_not_below_min_uncal_0.95']:6.2f} "
                f"{r['frac_sens_at_least_0.95']:6.2f} {r['frac_acc_above_uncalibrated']:6.2f} "
                f"{r['frac_acc_below_uncalibrated']:6.2f} {r['threshold_median']:.3g}")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--cache", type=Path, required=True, help="where the scores are kept")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--fractions", default="0.1,0.06",
                    help="calibration shares (0.06 of 1043 is about the issue's 62 films)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score-only", action="store_true")
    ap.add_argument("--sets", default=None, help="only these keys (comma-separated)")
    args = ap.parse_args()
    probs = score(args.run, args.cache) if not args.sets else {
        k: np.load(args.cache / f"{k}.npy") for k in args.sets.split(",")}
    if args.score_only:
        sys.exit(0)
    rows = val_rows(args.run)
    from cxrlab.run import load_run

    run = load_run(args.run)
    is_pos = np.array([run.classes.index(r["label"]) == run.info.positive for r in rows])
    patient = np.array([r["patient"] or f"#{i}" for i, r in enumerate(rows)])
    result = {"command": "nice -n 10 python " + " ".join(sys.argv),
              "cpu": cpu_name(), "cores": os.cpu_count(), "precision": "fp32 (predict_probs)",
              "date": datetime.now(UTC).isoformat(timespec="seconds"),
              "run": str(args.run.resolve()), "run_threshold": run.threshold,
              "repeats": args.repeats, "by_fraction": {}}
    for fr in (float(f) for f in args.fractions.split(",")):
        result["by_fraction"][str(fr)] = r = evaluate(probs, is_pos, patient, run.threshold,
                                                      fr, args.repeats, args.seed)
        print(f"### calibration share {fr}\n" + table(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
