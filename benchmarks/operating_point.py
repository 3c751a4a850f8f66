"""Which threshold rule gives an operating point that travels? Measured on validation only.

    cd benchmarks && nice -n 10 python operating_point.py RUN[=PROBS] ... \\
        --json results/operating-point-....json

Each RUN is scored on its own validation images (split.csv), clean and under the stress shifts
of `cxrlab evaluate RUN --shift` (`cxrlab.site.shift`, the run's seed) plus framing.py's
"margins". PROBS says where those scores are: a .npz of benchmarks/framing.py or a folder of
`<shift>:<severity>.npy` of benchmarks/site_calibration.py (several, comma-separated), or
`clean` for the rules on the run's own val_predictions.csv only; without it framing.py's
scorer computes them (every shift) and caches them next to --json. `--crossval DIR` adds each
rule's per-fold thresholds and its threshold on the pooled out-of-fold scores.
Nothing is trained and no test image is read. For every candidate rule:

- its threshold on the clean validation scores, its patient-bootstrap 95% interval (the
  re-chosen threshold over resamples of patients, `cxrlab.evaluation.operating_point`) and what
  the interval's ends decide on validation;
- where the rule would put the threshold if it were chosen on each shifted copy instead (how
  far the shift moves it);
- accuracy / sensitivity / specificity of its CLEAN threshold on each shifted copy, summarised
  over the mild and moderate severities (the severe ones ruin every rule) and over "framing"
  (zoom + margins: the shifts that push normal films towards pneumonia, as the held-back intake
  does);
- for --crossval: its per-fold thresholds, their spread, and its threshold on the pooled
  out-of-fold scores.

Rules: Youden's J; target sensitivity 0.95 .. 0.99; 0.5 (the same decisions as 0.5 after
temperature scaling, which never moves a two-class 0.5); 0.5 after Platt scaling (the
accuracy-optimal point at validation prevalence); the median of the bootstrap thresholds of
Youden / sensitivity 0.97 (a bagged threshold); "stress": the threshold that maximises the mean
balanced accuracy over the mild and moderate stress shifts with clean sensitivity >= 0.95, scored
leave-one-shift-family-out (chosen without the family it is scored on). Selection-biased like every
validation figure. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from framing import score_run, val_records
from throughput import cpu_name

from cxrlab.data.split import patient_key
from cxrlab.evaluation.metrics import choose_threshold
from cxrlab.evaluation.operating_point import bootstrap_thresholds, span
from cxrlab.run import load_info, read_predictions, read_threshold

FLOOR = 0.95  # the product's screening constraint: sensitivity
FRAMING = ("zoom", "margins")
SENS_TARGETS = (0.95, 0.97, 0.98, 0.99)
GRID = np.unique(np.concatenate([1 / (1 + np.exp(-np.linspace(-9, 9, 721))), [0.5]]))


def rates(is_pos: np.ndarray, p: np.ndarray, t: float) -> dict:
    c = p >= t
    sens, spec = float(c[is_pos].mean()), float((~c[~is_pos]).mean())
    return {"accuracy": float((c == is_pos).mean()), "sensitivity": sens, "specificity": spec,
            "balanced_accuracy": (sens + spec) / 2}


def platt_half(is_pos: np.ndarray, p: np.ndarray) -> float:
    """Raw threshold whose Platt-calibrated probability is 0.5."""
    from sklearn.linear_model import LogisticRegression

    z = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1)).reshape(-1, 1)
    lr = LogisticRegression(C=1e6).fit(z, is_pos)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    return float(1 / (1 + np.exp(b / a)))


def stress_rule(is_pos: np.ndarray, clean: np.ndarray, shifted: dict[str, np.ndarray],
                floor: float = FLOOR) -> float:
    """Maximise the mean balanced accuracy over `shifted` subject to clean sensitivity >=
    floor; ties to the highest threshold (fewest normals called)."""
    ok = np.array([(clean[is_pos] >= t).mean() >= floor for t in GRID])
    if not shifted:
        return float(GRID[ok][-1])
    bal = np.mean([[((p[is_pos] >= t).mean() + (p[~is_pos] < t).mean()) / 2 for t in GRID]
                   for p in shifted.values()], axis=0)
    bal = np.where(ok, bal, -1)
    return float(GRID[np.flatnonzero(bal == bal.max())[-1]])


def family(key: str) -> str:
    return key.split(":")[0]


def mild_moderate(probs: dict) -> dict:
    return {k: v for k, v in probs.items() if k != "none:0" and int(k.split(":")[1]) <= 2}


def rule_thresholds(is_pos, clean, probs, exclude_family: str | None = None) -> dict:
    """Every rule's threshold on the clean scores (stress: on the shifts, without one family)."""
    out = {"youden": choose_threshold(is_pos, clean, "youden")}
    for t in SENS_TARGETS:
        out[f"sensitivity_{t:g}"] = choose_threshold(is_pos, clean, "sensitivity", t)
    out["fixed_0.5"] = 0.5
    out["platt_0.5"] = platt_half(is_pos, clean)
    shifted = {k: v for k, v in mild_moderate(probs).items() if family(k) != exclude_family}
    out["stress"] = stress_rule(is_pos, clean, shifted)
    return out


def analyse_run(run_dir: Path, probs: dict, n_boot: int, seed: int) -> dict:
    info = load_info(run_dir)
    paths, labels = val_records(run_dir)  # the order framing.score_run scored them in
    is_pos = np.array([c == info.classes[info.positive] for c in labels])
    clean = probs["none:0"]
    vpaths, _, vprobs = read_predictions(run_dir / "val_predictions.csv", info.classes)
    ref = dict(zip(vpaths, vprobs[:, info.positive], strict=True))
    assert max(abs(ref[str(p)] - c) for p, c in zip(paths, clean, strict=True)) < 1e-4
    keys = [patient_key(Path(p), None) for p in paths]
    base = rule_thresholds(is_pos, clean, probs)
    boot = {}
    for rule in ("youden", "sensitivity_0.97"):
        ts, _ = bootstrap_thresholds(is_pos, clean, rule.split("_")[0],
                                     float(rule.split("_")[1]) if "_" in rule else 0.95,
                                     n_boot, seed, keys)
        boot[rule] = ts
    base["youden_bagged"] = float(np.median(boot["youden"]))
    base["sensitivity_0.97_bagged"] = float(np.median(boot["sensitivity_0.97"]))
    rules = {}
    for name, t in base.items():
        r = {"threshold": t, "clean": rates(is_pos, clean, t)}
        if name.startswith(("youden", "sensitivity")) and not name.endswith("bagged"):
            kind = name.split("_")[0]
            target = float(name.split("_")[1]) if kind == "sensitivity" else 0.95
            ts, method = bootstrap_thresholds(is_pos, clean, kind, target, n_boot, seed, keys)
            lo, hi = np.percentile(ts, [2.5, 97.5])
            r["bootstrap"] = {"interval": [float(lo), float(hi)], "method": method,
                              "sd_logit": float(np.std(np.log(ts / (1 - ts)))),
                              **span(is_pos, clean, lo, hi)}
            r["rechosen_on_shift"] = {
                k: choose_threshold(is_pos, p, kind, target) for k, p in probs.items()}
        per_shift = {}
        for k, p in probs.items():
            if k == "none:0":
                continue
            t_k = t
            if name == "stress":  # chosen without the family it is scored on
                t_k = rule_thresholds(is_pos, clean, probs, exclude_family=family(k))["stress"]
            per_shift[k] = {"threshold": t_k, **rates(is_pos, p, t_k)}
        r["per_shift"] = per_shift
        r["summary"] = summarise(per_shift)
        rules[name] = r
    return {"run": str(run_dir), "n": int(len(is_pos)), "n_positive": int(is_pos.sum()),
            "run_threshold": read_threshold(run_dir), "rules": rules}


def summarise(per_shift: dict) -> dict:
    def block(keys):
        rows = [per_shift[k] for k in keys if k in per_shift]
        if not rows:
            return None
        return {"n_shifts": len(rows),
                "mean_balanced_accuracy": float(np.mean([r["balanced_accuracy"] for r in rows])),
                "worst_balanced_accuracy": float(min(r["balanced_accuracy"] for r in rows)),
                "mean_accuracy": float(np.mean([r["accuracy"] for r in rows])),
                "mean_sensitivity": float(np.mean([r["sensitivity"] for r in rows])),
                "min_sensitivity": float(min(r["sensitivity"] for r in rows)),
                "mean_specificity": float(np.mean([r["specificity"] for r in rows])),
                "min_specificity": float(min(r["specificity"] for r in rows)),
                "shifts_below_floor": int(sum(r["sensitivity"] < FLOOR for r in rows))}
    mm = [k for k in per_shift if int(k.split(":")[1]) <= 2]
    return {"mild_moderate": block(mm),
            "framing": block([k for k in per_shift if family(k) in FRAMING]),
            "all": block(list(per_shift))}


def crossval(cv: Path, n_boot: int, seed: int) -> dict:
    """Fold thresholds per rule, and the rule applied to the pooled out-of-fold scores."""
    folds = sorted(p for p in cv.glob("fold-*") if (p / "metrics.json").is_file())
    ys, ss, keys, per_fold = [], [], [], []
    for f in folds:
        info = load_info(f)
        paths, y, pr = read_predictions(f / "val_predictions.csv", info.classes)
        is_pos, s = y == info.positive, pr[:, info.positive]
        ys.append(is_pos)
        ss.append(s)
        keys += [patient_key(Path(p), None) for p in paths]
        per_fold.append({"fold": f.name, "n": int(len(y)), **{
            k: v for k, v in rule_thresholds(is_pos, s, {"none:0": s}).items()
            if k != "stress"}})
    if not folds:
        return {}
    is_pos, s = np.concatenate(ys), np.concatenate(ss)
    pooled = {k: v for k, v in rule_thresholds(is_pos, s, {"none:0": s}).items()
              if k != "stress"}
    out = {"dir": str(cv), "folds": per_fold, "pooled_out_of_fold": pooled,
           "pooled_n": int(len(s))}
    out["spread"] = {k: {"min": min(f[k] for f in per_fold), "max": max(f[k] for f in per_fold),
                         **span(is_pos, s, min(f[k] for f in per_fold),
                                max(f[k] for f in per_fold))}
                     for k in pooled if len(per_fold) > 1}
    ts, method = bootstrap_thresholds(is_pos, s, "youden", 0.95, n_boot, seed, keys)
    out["pooled_youden_bootstrap"] = {"interval": [float(x) for x in
                                                   np.percentile(ts, [2.5, 97.5])],
                                      "method": method}
    return out


def clean_scores(run_dir: Path) -> np.ndarray:
    info = load_info(run_dir)
    vpaths, _, vprobs = read_predictions(run_dir / "val_predictions.csv", info.classes)
    ref = dict(zip(vpaths, vprobs[:, info.positive], strict=True))
    return np.array([ref[str(p)] for p in val_records(run_dir)[0]])


def rounded(x):
    """Floats to 4 decimals: the JSON stays readable (and a tenth of its size)."""
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [rounded(v) for v in x]
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="RUN, or RUN=PROBS where PROBS is a .npz of "
                    "benchmarks/framing.py or a folder of <shift>:<severity>.npy of "
                    "benchmarks/site_calibration.py (several, comma-separated)")
    ap.add_argument("--crossval", type=Path, action="append", default=[])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--n-boot", type=int, default=1000)
    args = ap.parse_args()
    result = {"date": datetime.now(UTC).isoformat(timespec="minutes"), "cpu": cpu_name(),
              "cores": os.cpu_count(), "python": sys.version.split()[0],
              "precision": "fp32 (predict_probs scores every run in fp32)",
              "command": " ".join(["python", *sys.argv]), "floor": FLOOR, "runs": [],
              "crossval": []}
    for spec in args.runs:
        run_dir, _, npz = spec.partition("=")
        if npz == "clean":  # no shifted scores: the rules on the run's own val_predictions
            probs = {"none:0": clean_scores(Path(run_dir))}
        elif npz:
            probs = {}
            for part in npz.split(","):  # framing.py's .npz, or site_calibration.py's folder
                probs.update(dict(np.load(part)) if part.endswith(".npz") else
                             {f.stem: np.load(f) for f in sorted(Path(part).glob("*.npy"))})
        else:
            probs = score_run(Path(run_dir), args.json.parent)["probs"]
        result["runs"].append(analyse_run(Path(run_dir), probs, args.n_boot, 0))
    for cv in args.crossval:
        result["crossval"].append(crossval(cv, args.n_boot, 0))
    args.json.write_text(json.dumps(rounded(result), indent=1) + "\n")
    print_tables(result)


def print_tables(result: dict) -> None:
    for r in result["runs"]:
        print(f"\n{r['run']} ({r['n']} images)")
        print("| rule | threshold | bootstrap 95% | ends' change (pts) | clean sens / spec | "
              "mild+moderate: mean bal. acc / worst / min sens / below 0.95 | framing: mean "
              "sens / mean spec / min spec |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, x in r["rules"].items():
            b = x.get("bootstrap")
            bi = f"{b['interval'][0]:.3f}-{b['interval'][1]:.3f}" if b else ""
            ch = f"{b['change_points']:.1f}" if b else ""
            mm, fr = x["summary"]["mild_moderate"], x["summary"]["framing"]
            if mm is None or fr is None:
                print(f"| {name} | {x['threshold']:.3f} | {bi} | {ch} | "
                      f"{x['clean']['sensitivity']:.3f} / {x['clean']['specificity']:.3f} | | |")
                continue
            print(f"| {name} | {x['threshold']:.3f} | {bi} | {ch} | "
                  f"{x['clean']['sensitivity']:.3f} / {x['clean']['specificity']:.3f} | "
                  f"{mm['mean_balanced_accuracy']:.3f} / {mm['worst_balanced_accuracy']:.3f} / "
                  f"{mm['min_sensitivity']:.3f} / {mm['shifts_below_floor']} | "
                  f"{fr['mean_sensitivity']:.3f} / {fr['mean_specificity']:.3f} / "
                  f"{fr['min_specificity']:.3f} |")
    for cv in result["crossval"]:
        if not cv:
            continue
        print(f"\n{cv['dir']}: per-fold thresholds, pooled out-of-fold")
        for name, v in cv["pooled_out_of_fold"].items():
            folds = ", ".join(f"{f[name]:.3f}" for f in cv["folds"])
            print(f"| {name} | {folds} | pooled {v:.3f} |")


if __name__ == "__main__":
    main()
