"""Small sets: how many optimizer steps, and frozen or fine-tuned, on the covid19 set's
cross-validation (251 images, 3 classes), paired against the default recipe's 9 epochs.

    nice -n 10 python benchmarks/small_sets.py ../shared/data/covid19/train --out runs/small \
        --folds 3 --json benchmarks/results/small-sets-2026-12-06-xeon.json default-9 default-60

Each variant is an ordinary cross-validation (`cxrlab train DATA --folds K` with the variant's
options) under OUT/<variant>; a finished one is read, not retrained. Every variant uses the
same seed, so the same folds: the paired comparison counts the images each variant decides
differently from the reference (the first variant named) and gives the exact McNemar p.
Epochs are always given explicitly, so a variant trains the same schedule whatever the
small-set rule would choose. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binomtest

from cxrlab.config import RunConfig
from cxrlab.deploy.inference import decide
from cxrlab.run import load_info, read_predictions
from cxrlab.training.crossval import RESULT_FILE, fold_dir, run_crossval

FROZEN_CACHED = dict(freeze_backbone=True, augment="none")  # head on pooled features
VARIANTS: dict[str, dict] = {
    # the default recipe (EfficientNet-Lite0, ImageNet, 192 px, head 1 epoch then fine-tuned,
    # intensity augmentation) for more epochs: 3 folds of 251 images = 5 steps an epoch
    "default-9": dict(epochs=9),
    "default-30": dict(epochs=30),
    "default-60": dict(epochs=60),  # (default-30/60: not run on 2026-12-06, too slow there)
    # frozen backbone, head only (-aug: with the default's augmentation, so not cached)
    "lite0-frozen-aug-60": dict(freeze_backbone=True, epochs=60),
    "lite0-frozen-30": dict(**FROZEN_CACHED, epochs=30),  # what small_sets.py trains
    "lite0-frozen-120": dict(**FROZEN_CACHED, epochs=120),
    # docs/recipes.md's recommended covid19 recipe, and a longer head schedule
    "lite2-frozen-260-30": dict(**FROZEN_CACHED, model="efficientnet_lite2", image_size=260,
                                epochs=30),
    "lite2-frozen-260-120": dict(**FROZEN_CACHED, model="efficientnet_lite2", image_size=260,
                                 epochs=120),
}


def decisions(out: Path, folds: int) -> dict[str, tuple[int, int]]:
    """Every out-of-fold image: (label, decision), as crossval.json pooled them."""
    result = json.loads((out / RESULT_FILE).read_text())
    seen = {}
    for i in range(1, folds + 1):
        run = fold_dir(out, i)
        info = load_info(run)
        paths, y, probs = read_predictions(run / "val_predictions.csv", info.classes)
        pred = decide(probs, info.positive, result["per_fold"][i - 1]["pooled_threshold"])
        seen.update({p: (int(a), int(b)) for p, a, b in zip(paths, y, pred, strict=True)})
    return seen


def paired(ref: dict, var: dict) -> dict:
    """Images the variant got right that the reference got wrong, and the reverse."""
    if set(ref) != set(var):
        raise SystemExit("the variants validated different images (different folds?)")
    fixed = sum(var[p][0] == var[p][1] and ref[p][0] != ref[p][1] for p in ref)
    broke = sum(var[p][0] != var[p][1] and ref[p][0] == ref[p][1] for p in ref)
    p = binomtest(min(fixed, broke), fixed + broke).pvalue if fixed + broke else 1.0
    return {"became_right": fixed, "became_wrong": broke, "mcnemar_exact_p": float(p)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows, ref = {}, None
    for name in args.variants:
        out = args.out / name
        if not (out / RESULT_FILE).is_file():
            cfg = RunConfig.build({"data": args.data, "folds": args.folds, "seed": args.seed,
                                   **VARIANTS[name]})
            run_crossval(cfg, out, progress=False)
        result = json.loads((out / RESULT_FILE).read_text())
        cfg = RunConfig.load(out / "crossval.yaml")
        seen = decisions(out, args.folds)
        ref = ref or seen
        pooled = result["pooled"]
        rows[name] = {
            "options": VARIANTS[name], "model": cfg.model, "image_size": cfg.image_size,
            "epochs": cfg.epochs, "epochs_run": [f["epochs"] for f in result["per_fold"]],
            "accuracy": pooled["accuracy"], "correct": pooled["correct"], "n": pooled["n"],
            "accuracy_ci": pooled["accuracy_ci"], "recall": pooled["recall"],
            "confusion_matrix": pooled["confusion_matrix"],
            "fold_roc_auc": [f["roc_auc"] for f in result["per_fold"]],
            "vs_reference": paired(ref, seen),
        }
        r = rows[name]
        d = r["vs_reference"]
        print(f"{name:24s} {r['correct']}/{r['n']} = {r['accuracy']:.3f} "
              f"[{r['accuracy_ci'][0]:.3f}, {r['accuracy_ci'][1]:.3f}]  epochs run "
              f"{r['epochs_run']}  recall {json.dumps(r['recall'])}  vs {args.variants[0]}: "
              f"+{d['became_right']} -{d['became_wrong']} p={d['mcnemar_exact_p']:.3g}",
              flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "what": "covid19 cross-validation: pooled out-of-fold accuracy per variant, paired "
                    "against the first (same seed, same folds; exact McNemar)",
            "command": f"nice -n 10 python benchmarks/small_sets.py {args.data} --out "
                       f"{args.out} --folds {args.folds} --json {args.json} "
                       + " ".join(args.variants),
            "date": str(date.today()), "cpu": platform.processor() or platform.machine(),
            "precision": "fp32 (precision auto: EfficientNet-Lite trains in fp32 on a CPU)",
            "torch": torch.__version__, "folds": args.folds, "seed": args.seed,
            "reference": args.variants[0], "variants": rows,
        }, indent=1) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
