"""What does test-time augmentation buy a run, clean and under the stress shifts? Paired.

    nice -n 10 python benchmarks/tta.py RUN --json benchmarks/results/tta-....json

On the run's own validation images (split.csv), clean and under every shift and level of the
stress test (`cxrlab.site.shift.SHIFTS`, the run's seed, as `cxrlab evaluate RUN --shift`),
each view (`cxrlab.models.tta.VIEWS`, and a central-90% crop measured here) is scored once
through `predict_probs` (fp32); a TTA setting's probability is the mean of its views' (what
`TestTimeAugmentation` computes in one graph; checked on the clean images). For each setting
against none, per condition:

- ROC AUC, accuracy, sensitivity, specificity at the run's threshold (chosen without TTA) and
  at the threshold the run's rule picks on the clean validation images WITH the setting (what
  `cxrlab train --tta SETTING` stores);
- paired differences with 95% patient-bootstrap intervals (evaluation.comparison's kernel),
  and the exact McNemar test on the decisions that changed;
- a control, "threshold_only": no TTA, the threshold moved to the setting's own, since a
  setting's own threshold can differ from the run's by more than TTA moves the scores.

Selection-biased like every validation figure (the epoch and threshold were chosen on these
images). Per-view probabilities are cached next to --json, so an interrupted run resumes.
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
import torch
import torch.nn.functional as F
from scipy.stats import binomtest
from throughput import cpu_name

from cxrlab.data.cache import load_images
from cxrlab.deploy.inference import decide, predict_probs
from cxrlab.evaluation.comparison import _stats
from cxrlab.evaluation.metrics import choose_threshold, group_codes, resample_weights
from cxrlab.models.tta import TTA as SHIPPED
from cxrlab.models.tta import VIEWS as SHIPPED_VIEWS
from cxrlab.models.tta import hflip, with_tta
from cxrlab.run import load_run, read_predictions
from cxrlab.site.shift import SHIFTS

CROP = 0.9  # the measured framing view: the central 90% of each side, resized back up


def centre_crop(x: torch.Tensor) -> torch.Tensor:
    """A tighter framing (the stress test's weakest shift) seen at test time; measured, not
    shipped: it cost accuracy under tighter framing (docs/serving.md)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ch, cw = max(1, round(h * CROP)), max(1, round(w * CROP))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


VIEWS = {**SHIPPED_VIEWS, "crop": centre_crop, "crop-hflip": lambda x: hflip(centre_crop(x))}
TTA = {**SHIPPED, "crop": ("identity", "crop"),
       "flip-crop": ("identity", "hflip", "crop", "crop-hflip")}


class OneView(torch.nn.Module):
    """The model on one view of its input (the benchmark scores each view once)."""

    def __init__(self, model: torch.nn.Module, view: str):
        super().__init__()
        self.model, self.view = model, view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(VIEWS[self.view](x))


def val_records(run: Path) -> tuple[list[str], list[str], list[str]]:
    rows = [r for r in csv.DictReader(open(run / "split.csv")) if r["split"] == "val"]
    return [r["path"] for r in rows], [r["label"] for r in rows], [r["patient"] for r in rows]


def conditions(only: list[str] | None = None) -> list[tuple[str, str, float | None]]:
    """(key, shift, level): none:0 (clean), then every shift:severity, or those in `only`
    (in its order)."""
    every = {"none:0": ("none", None)}
    for s in SHIFTS.values():
        every |= {f"{s.name}:{k}": (s.name, lv) for k, lv in enumerate(s.levels, start=1)}
    keys = list(every) if only is None else ["none:0", *[k for k in only if k != "none:0"]]
    return [(k, *every[k]) for k in keys]


def view_probs(run, images: np.ndarray, cache: Path, views: list[str],
               only: list[str] | None, cached_only: bool = False,
               ) -> dict[str, dict[str, np.ndarray]]:
    """{condition: {view: p(positive)}}, each (condition, view) scored once and cached,
    condition by condition, so an interrupted run answers for the conditions it finished."""
    pos, seed = run.info.positive, run.config.seed
    nets = {v: OneView(run.model, v).eval() for v in views}
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, name, level in conditions(only):
        out[key] = {}
        x = None
        for v, net in nets.items():
            f = cache / f"{key.replace(':', '-')}-{v}.npy"
            if not f.is_file() and cached_only:
                continue
            if not f.is_file():
                if x is None:
                    x = images if name == "none" else SHIFTS[name].fn(images, level, seed)
                tmp = f.with_suffix(".tmp.npy")
                np.save(tmp, predict_probs(net, x)[:, pos])
                tmp.replace(f)  # whole or absent: two runs may share the cache
                print(f"scored {key} {v}", flush=True)
            out[key][v] = np.load(f)
    return out


def paired_rows(y, pos, p_a, p_b, t_a, t_b, codes, n_boot) -> dict:
    """b minus a on the same images: observed, 95% paired bootstrap interval, McNemar."""
    def as_probs(p):
        probs = np.zeros((len(p), 2))
        probs[:, pos], probs[:, 1 - pos] = p, 1 - p
        return probs

    pa, pb = as_probs(p_a), as_probs(p_b)
    da, db = decide(pa, pos, t_a), decide(pb, pos, t_b)
    sa, sb = _stats(y, pa, da, pos, 2), _stats(y, pb, db, pos, 2)
    one = np.ones((1, len(y)))
    obs_a, obs_b = sa(one), sb(one)
    diffs = {k: [] for k in obs_a}
    for w in resample_weights(len(y), n_boot, 0, codes):
        ra, rb = sa(w), sb(w)
        for k in diffs:
            diffs[k].append(rb[k] - ra[k])
    out = {}
    for k in obs_a:
        d = np.concatenate(diffs[k])
        d = d[np.isfinite(d)]
        lo, hi = np.percentile(d, [2.5, 97.5])
        out[k] = {"none": float(obs_a[k][0]), "tta": float(obs_b[k][0]),
                  "difference": float(obs_b[k][0] - obs_a[k][0]),
                  "ci95": [float(lo), float(hi)]}
    right_a, right_b = da == y, db == y
    fixed, broke = int((~right_a & right_b).sum()), int((right_a & ~right_b).sum())
    out["decisions"] = {"became_right": fixed, "became_wrong": broke,
                        "mcnemar_exact_p": float(binomtest(fixed, fixed + broke).pvalue)
                        if fixed + broke else 1.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--settings", default="flip,crop,flip-crop",
                    help="TTA settings compared with none (comma-separated)")
    ap.add_argument("--conditions", default=None,
                    help="shift:severity keys to score (default: all 30; clean always)")
    ap.add_argument("--cached-only", action="store_true",
                    help="score nothing: compare where the cache holds every view a setting "
                         "needs (a loaded machine's partial run)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared, loaded machine: one thread wastes no spin-waits
    cache = args.cache or args.json.parent / f"tta-cache-{args.run.name}"
    cache.mkdir(parents=True, exist_ok=True)
    run = load_run(args.run)
    pos, t_run = run.info.positive, run.threshold
    paths, labels, patients = val_records(args.run)
    y = np.array([run.classes.index(c) for c in labels])
    images, bad = load_images([Path(p) for p in paths], run.config.image_size, run.info.in_chans,
                              bit_depth=run.bit_depth)
    assert not bad, bad
    settings = args.settings.split(",")
    views = list(dict.fromkeys(v for s in ["none", *settings] for v in TTA[s]))
    only = args.conditions.split(",") if args.conditions else None
    probs = view_probs(run, images, cache, views, only, args.cached_only)
    clean = probs["none:0"]
    # the identity view is the run's own val_predictions.csv; the mean of views is the wrapper
    vpaths, _, vprobs = read_predictions(args.run / "val_predictions.csv", run.classes)
    order = {p: i for i, p in enumerate(vpaths)}
    checks = {"max_diff_identity_vs_val_predictions": float(
        np.abs(vprobs[[order[p] for p in paths], pos] - clean["identity"]).max())}
    for setting in [s for s in settings if s in SHIPPED and all(v in clean for v in TTA[s])]:
        wrapped = predict_probs(with_tta(run.model, setting), images[:128])[:, pos]
        mean = np.mean([clean[v][:128] for v in TTA[setting]], axis=0)
        checks[f"max_diff_wrapper_vs_mean_{setting}_128_images"] = float(
            np.abs(wrapped - mean).max())
    codes = group_codes(patients, len(y))
    is_pos = y == pos

    def setting_p(cond: str, setting: str) -> np.ndarray:
        return np.mean([probs[cond][v] for v in TTA[setting]], axis=0)

    result = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"), "cpu": cpu_name(),
        "cores": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__,
        "precision": "fp32 (predict_probs)", "run": str(args.run),
        "command": " ".join(["nice -n 10 python", *sys.argv]),
        "n": int(len(y)), "n_positive": int(is_pos.sum()), "threshold_run": t_run,
        "threshold_rule": run.config.threshold_rule, "n_boot": args.boot,
        "interval": "95% paired patient bootstrap (split.csv patients), percentile",
        "inference_passes": {s: len(v) for s, v in TTA.items()}, "checks": checks,
        "thresholds_rechosen_on_clean": {}, "conditions": {}}
    for setting in [s for s in settings if all(v in clean for v in TTA[s])]:
        t_own = float(choose_threshold(is_pos.astype(int), setting_p("none:0", setting),
                                       run.config.threshold_rule,
                                       run.config.target_sensitivity))
        result["thresholds_rechosen_on_clean"][setting] = t_own
    for cond in probs:
        if "identity" not in probs[cond]:
            continue  # --cached-only: not scored
        row = {}
        base = setting_p(cond, "none")
        for setting, t_own in result["thresholds_rechosen_on_clean"].items():
            if not all(v in probs[cond] for v in TTA[setting]):
                continue  # --cached-only: not scored under this condition
            p = setting_p(cond, setting)
            row[setting] = {
                "at_run_threshold": paired_rows(y, pos, base, p, t_run, t_run, codes, args.boot),
                "at_own_threshold": paired_rows(y, pos, base, p, t_run, t_own, codes, args.boot),
                # the control: no TTA, only the threshold moved to the setting's own
                "threshold_only": paired_rows(y, pos, base, base, t_run, t_own, codes,
                                              args.boot)}
        result["conditions"][cond] = row
        print(cond, " ".join(f"{s}: dAUC {r['at_run_threshold']['roc_auc']['difference']:+.4f}"
                             f" dAcc {r['at_run_threshold']['accuracy']['difference']:+.4f}"
                             for s, r in row.items()), flush=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
