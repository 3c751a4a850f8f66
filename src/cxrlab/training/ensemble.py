"""Ensembles as runs: N members on one split with different seeds (`--seeds N`), or the K fold
runs of a cross-validation (`--folds K`), and OUT itself the run that averages them.

Members are ordinary runs, trained (and continued after a kill) one after the other. When the
last is complete, OUT gets a run's files and every command uses it like any run: model.pt holds
an `EnsembleModel` (the members' mean probability as one logit; one ONNX graph on export).

    OUT/ensemble.yaml    (seeds) the configuration; continuing must match it
    OUT/crossval.yaml    (folds) the same, with crossval.json (training/crossval.py)
    OUT/seed-<i>/, OUT/fold-<i>/   the members
    OUT/config.yaml model.pt threshold metrics.json val_predictions.csv split.csv digests.csv
    intake.json run.json  the ensemble as a run; run.json (written last) names the members

Its validation figures differ by kind, and metrics.json["ensemble"] says which:
- seeds: the members share one validation split, so the ensemble scores those images itself;
  its threshold is chosen on them by the run's rule (selection-biased, as a single run's).
- folds: every image trained K-1 members, so the ensemble has no held-out image; the figures
  are the pooled out-of-fold scores (each image by the one member that never saw it) with a
  threshold chosen on them: an estimate of one member, not of the average (Ovadia et al. 2019
  found ensembles at least as accurate and better calibrated than their members).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cxrlab.config import RunConfig, format_seconds
from cxrlab.data.cache import load_images
from cxrlab.data.sources import load_source
from cxrlab.data.split import assign_splits
from cxrlab.deploy.inference import predict_probs
from cxrlab.errors import CxrlabError
from cxrlab.evaluation import overlap
from cxrlab.evaluation.metrics import compute_metrics
from cxrlab.evaluation.operating_point import decide_on_validation, threshold_spread, warning
from cxrlab.models import create_model
from cxrlab.models.ensemble import EnsembleModel
from cxrlab.models.tta import with_tta
from cxrlab.reporting import plots
from cxrlab.run import (
    SPLIT_CSV_COLUMNS,
    RunInfo,
    atomic_write_text,
    check_out_dir,
    load_info,
    move_aside,
    patients_of,
    prepare_out_dir,
    read_predictions,
    read_split_csv,
    run_bit_depth,
    run_state,
    save_info,
    write_json,
    write_predictions_csv,
    write_threshold,
)
from cxrlab.training import small_sets
from cxrlab.training.budget import resolve_budget
from cxrlab.training.lifecycle import TrainResult, resume_run, train_run

log = logging.getLogger(__name__)
SEEDS_FILE = "ensemble.yaml"
FOLDS_FILE = "crossval.yaml"  # crossval.CONFIG_FILE
MEMBER_KEYS = ("fold", "seed", "split_seed", "time_budget")  # what members may differ in


def kind_of(config: RunConfig) -> str | None:
    return "folds" if config.folds is not None else "seeds" if config.seeds is not None else None


def size_of(config: RunConfig) -> int:
    return config.folds if config.folds is not None else config.seeds


def member_dir(out: Path, kind: str, i: int) -> Path:
    return Path(out) / f"{kind[:-1]}-{i}"


def member_config(config: RunConfig, i: int) -> RunConfig:
    """Member i's own configuration: fold i of the folds, or seed + i - 1 on the ensemble's
    split (split_seed keeps the split while the weights' seed moves)."""
    values = config.model_dump()
    if kind_of(config) == "folds":
        values["fold"] = i
    else:
        split = config.seed if config.split_seed is None else config.split_seed
        values.update(seeds=None, seed=config.seed + i - 1, split_seed=split)
    return RunConfig.build(values)


def study_file(out: Path) -> Path | None:
    """OUT's ensemble.yaml or crossval.yaml: the configuration an ensemble continues with."""
    for name in (SEEDS_FILE, FOLDS_FILE):
        if (Path(out) / name).is_file():
            return Path(out) / name
    return None


def budgeted_member_config(config: RunConfig, i: int, out: Path,
                           budget_s: float | None) -> RunConfig:
    """Member i's configuration under a time budget of `budget_s` seconds for the whole
    ensemble (None: `member_config`). Member 1 plans once, for an N-th of the budget (its
    warm-up, `<member-1>/plan.json`); every member trains that plan's epochs and image size,
    so the members are one recipe and continuing finds them as they were saved."""
    cfg = member_config(config, i)
    if budget_s is None:
        return cfg
    kind = kind_of(config)
    plan_file = member_dir(out, kind, 1) / "plan.json"
    if plan_file.is_file():
        plan = json.loads(plan_file.read_text())["plan"]
        return RunConfig.build({**cfg.model_dump(), "epochs": plan["epochs"],
                                "image_size": plan["image_size"], "time_budget": "none"})
    if i != 1:
        raise CxrlabError(f"{plan_file}: not found; under a time budget {kind[:-1]} 1's plan "
                          f"sets every member's epochs and image size: choose a new --out")
    share = format_seconds(max(1.0, budget_s / size_of(config)))
    return RunConfig.build({**cfg.model_dump(), "time_budget": share})


def train_members(config: RunConfig, out: Path, progress: bool = True,
                  on_member: Callable[[int, str], None] | None = None,
                  check: Callable[[RunConfig], None] | None = None) -> int:
    """Train (or continue) every member under `out`. A new `out` must be empty (`check` may
    refuse the configuration before anything is written); one holding the configuration file
    continues only with the same configuration: complete members are kept, a killed one
    resumes from its checkpoint (or is set aside as `<member>.failed-<time>` when it has none).
    Returns how many members were trained or resumed (0: all were complete already).
    """
    kind = kind_of(config)
    budget_s = resolve_budget(member_config(config, 1))  # explicit budgets (auto: none here)
    out = Path(out)
    saved = out / (FOLDS_FILE if kind == "folds" else SEEDS_FILE)
    if saved.is_file():
        if RunConfig.load(saved) != config:
            raise CxrlabError(f"--out {out}: holds an ensemble with another configuration "
                              f"(see {saved}); choose a new --out")
    else:
        check_out_dir(out)
        if check is not None:
            check(config)
        prepare_out_dir(out)
        config.save(saved)
    trained = 0
    for i in range(1, size_of(config) + 1):
        cfg, run_dir = budgeted_member_config(config, i, out, budget_s), member_dir(out, kind, i)
        state = run_state(run_dir, cfg)
        if state == "complete":
            _tell(on_member, kind, i, "complete: kept")
            continue
        if state == "broken" and (run_dir / "checkpoints" / "last.ckpt").is_file():
            _tell(on_member, kind, i, "resuming from its last checkpoint")
            resume_run(run_dir, progress=progress)
            trained += 1
            continue
        if state == "broken":
            _tell(on_member, kind, i, f"set aside as {move_aside(run_dir).name} (no checkpoint)")
            cfg = budgeted_member_config(config, i, out, budget_s)  # member 1's plan went too
        if budget_s is not None and cfg.time_budget != "none":  # member 1, not yet planned
            _tell(on_member, kind, i, f"planning for its share of the time budget "
                  f"({cfg.time_budget}); every member trains this plan")
        _tell(on_member, kind, i, "training")
        train_run(cfg, run_dir, progress=progress)
        trained += 1
    return trained


def _tell(on_member, kind: str, i: int, what: str) -> None:
    if on_member is not None:
        on_member(i, what)
    log.info("%s %d: %s", kind[:-1], i, what)


def run_seeds(config: RunConfig, out: Path, progress: bool = True,
              on_member: Callable[[int, str], None] | None = None) -> TrainResult:
    """`--seeds N`: train (or continue) the members, then write OUT as their ensemble run."""
    if config.seeds is None:
        raise CxrlabError("--seeds: give the number of members (2-20)")
    # named before ensemble.yaml is written, as crossval does: continuing finds the same
    config = small_sets.with_recipe(config, small_set_for_seeds(config))
    trained = train_members(config, out, progress, on_member)
    return finish(config, out, rebuild=trained > 0)


def small_set_for_seeds(config: RunConfig) -> small_sets.SmallSet | None:
    """The small-set recipe (training/small_sets.py) of every member, decided once on the
    members' one split as a single run on it decides (from the split alone, nothing decoded):
    the members' own configurations name every field, which turns the rule off for them."""
    if not small_sets.applies(config):
        return None
    source = load_source(Path(config.data), config.image_col, config.label_col)
    seed = config.seed if config.split_seed is None else config.split_seed
    split = assign_splits(source, config.val_fraction, seed, config.group_regex)
    return small_sets.small_set_recipe(config, split.splits.count("train"))


# ---------------------------------------------------------------------------------------
# OUT as a run


def finish(config: RunConfig, out: Path, rebuild: bool = False) -> TrainResult:
    """Write OUT's run files from its complete members; a complete OUT is kept unless
    `rebuild` (a member was trained again), when it says running until rewritten."""
    out = Path(out)
    kind, n = kind_of(config), size_of(config)
    dirs = [member_dir(out, kind, i) for i in range(1, n + 1)]
    info_file = out / "run.json"
    if info_file.is_file() and json.loads(info_file.read_text()).get("state") == "complete":
        if not rebuild:
            return _result(out, json.loads((out / "metrics.json").read_text()))
        old = load_info(out)
        old.state = "running"
        save_info(out, old)  # not a run while its files change
    infos = [load_info(d) for d in dirs]
    cfgs = [RunConfig.load(d / "config.yaml") for d in dirs]
    for d, info, cfg in zip(dirs[1:], infos[1:], cfgs[1:], strict=True):
        if (info.classes, info.positive, info.in_chans) != (
                infos[0].classes, infos[0].positive, infos[0].in_chans):
            raise CxrlabError(f"{d}: classes or channels differ from {dirs[0].name}'s")
        diff = [k for k, v in cfg.model_dump().items()
                if k not in MEMBER_KEYS and v != getattr(cfgs[0], k)]
        if diff:
            raise CxrlabError(f"{d}: trained with {diff[0]}={getattr(cfg, diff[0])!r}, "
                              f"{dirs[0].name} with {getattr(cfgs[0], diff[0])!r}: not one recipe")
    run_cfg = RunConfig.build({**cfgs[0].model_dump(), "fold": None, "seed": config.seed,
                               "split_seed": config.split_seed, "folds": config.folds,
                               "seeds": config.seeds})
    model = _ensemble_model(run_cfg, infos[0], dirs)
    scorer = with_tta(model, run_cfg.tta)  # as load_run scores it later (members' own tta)
    info = RunInfo(infos[0].classes, infos[0].positive, infos[0].in_chans,
                   data_bit_depth=infos[0].data_bit_depth,
                   ensemble={"kind": kind, "members": [d.name for d in dirs]})
    rows = _split_rows(dirs, kind)
    if kind == "seeds":
        paths, y, probs = _score(scorer, run_cfg, info, [r for r in rows if r["split"] == "val"])
        scored = "ensemble"
    else:
        pooled = [read_predictions(d / "val_predictions.csv", info.classes) for d in dirs]
        paths = [p for ps, _, _ in pooled for p in ps]
        y = np.concatenate([yy for _, yy, _ in pooled])
        probs = np.concatenate([pp for _, _, pp in pooled])
        scored = "out-of-fold member"
    classes, pos = info.classes, info.positive
    threshold, metrics = decide_on_validation(
        y, probs, classes, pos, run_cfg.threshold_rule, run_cfg.target_sensitivity,
        config.seed, patients_of(rows, paths))
    members = [json.loads((d / "metrics.json").read_text()) for d in dirs]
    metrics.update(_ensemble_notes(kind, n, scored, threshold is not None, members))
    if threshold is not None:  # how far members differ
        write_threshold(out, threshold)
        metrics["threshold_spread"] = threshold_spread([m.get("threshold") for m in members],
                                                       y == pos, probs[:, pos])
        for what, st in (("the threshold's 95% interval", metrics["threshold_stability"]),
                         ("the members' thresholds' range", metrics["threshold_spread"])):
            if warning(st, what):
                log.warning(warning(st, what))
    metrics["tta"] = run_cfg.tta
    test = [r for r in rows if r["split"] == "test"]
    test_metrics = None
    if test:
        tp, ty, tprobs = _score(scorer, run_cfg, info, test)
        test_metrics = compute_metrics(ty, tprobs, classes, positive=pos, threshold=threshold,
                                       seed=config.seed, groups=patients_of(rows, tp))
        test_metrics["split"] = "test"
        write_json(out / "metrics_test.json", test_metrics)
    torch.save(model.state_dict(), out / "model.pt")
    run_cfg.save(out / "config.yaml")
    _write_split(out / "split.csv", rows)
    _write_digests(out, dirs)
    if (dirs[0] / "intake.json").is_file():  # one image pool: member 1's reference is theirs
        shutil.copyfile(dirs[0] / "intake.json", out / "intake.json")
    write_predictions_csv(out / "val_predictions.csv", paths, [classes[k] for k in y], probs,
                          classes)
    write_json(out / "metrics.json", metrics)
    plots.plot_confusion(np.array(metrics["confusion_matrix"]), classes,
                         out / "confusion_matrix.png", title="Validation confusion matrix")
    plots.plot_roc(y, probs, classes, out / "roc.png", positive=pos, threshold=threshold)
    plots.plot_pr(y, probs, classes, out / "pr.png", positive=pos)
    info.state = "complete"
    save_info(out, info)  # last: OUT is a run only now
    return _result(out, metrics, test_metrics)


def _ensemble_model(cfg: RunConfig, info: RunInfo, dirs: list[Path]) -> EnsembleModel:
    """The members' model.pt files in one EnsembleModel (each loaded with every key checked)."""
    n_out = 1 if len(info.classes) == 2 else len(info.classes)
    members = []
    for d in dirs:
        m = create_model(cfg.model, num_classes=n_out, in_chans=info.in_chans,
                         dropout=cfg.dropout, batchnorm=cfg.batchnorm,
                         image_size=cfg.image_size, intensity=cfg.intensity, head=cfg.head)
        m.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
        members.append(m)
    return EnsembleModel(members).eval()


def _score(model: torch.nn.Module, cfg: RunConfig, info: RunInfo,
           rows: list[dict]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """These split.csv rows' images through the ensemble, read as training read them."""
    images, _ = load_images([Path(r["path"]) for r in rows], cfg.image_size, info.in_chans,
                            bit_depth=run_bit_depth(cfg, info))
    y = np.array([info.classes.index(r["label"]) for r in rows], dtype=np.int64)
    return [r["path"] for r in rows], y, predict_probs(model, images)


def _split_rows(dirs: list[Path], kind: str) -> list[dict]:
    """The ensemble's split.csv: the members' own (seeds: one split, checked), or for folds
    the pool's images as validation (each validated out-of-fold once) and any test images."""
    splits = [read_split_csv(d / "split.csv") for d in dirs]
    if kind == "seeds":
        for d, rows in zip(dirs[1:], splits[1:], strict=True):
            if rows != splits[0]:
                raise CxrlabError(f"{d / 'split.csv'}: differs from {dirs[0].name}'s; the "
                                  "members of a --seeds ensemble share one split")
        return splits[0]
    return [{**r, "split": "test" if r["split"] == "test" else "val"} for r in splits[0]]


def _write_split(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SPLIT_CSV_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _write_digests(out: Path, dirs: list[Path]) -> None:
    """OUT/digests.csv: every member's images (evaluate refuses what any member trained on:
    for folds, every image of the pool). A member without one: its split.csv, by file bytes."""
    rows: dict[tuple, dict] = {}
    for d in dirs:
        if (d / overlap.DIGESTS).is_file():
            with (d / overlap.DIGESTS).open(newline="", encoding="utf-8",
                                            errors="surrogateescape") as f:
                found = list(csv.DictReader(f))
        else:
            seen = [r for r in read_split_csv(d / "split.csv") if r["split"] in ("train", "val")]
            files = overlap.file_digests([r["path"] for r in seen])
            found = [{"path": r["path"], "split": r["split"], "file": fd or "", "pixels": ""}
                     for r, fd in zip(seen, files, strict=True)]
        for r in found:
            rows.setdefault(tuple(r[c] for c in overlap.COLUMNS), r)
    kept = list(rows.values())
    overlap.record(out, [r["path"] for r in kept], [r["split"] for r in kept],
                   [r["file"] or None for r in kept], [r["pixels"] for r in kept])


def _ensemble_notes(kind: str, n: int, scored: str, binary: bool, members: list[dict]) -> dict:
    if kind == "seeds":
        biased = ("the threshold and each member's epoch were chosen on these images" if binary
                  else "each member's epoch was chosen on these images")
        how = "the ensemble on the members' shared validation split"
    else:
        biased = ("out-of-fold: each image scored by the member that did not train on it "
                  "(its epoch chosen on that image)" + (", the threshold chosen on these pooled "
                                                        "scores" if binary else "")
                  + "; an estimate for one member, the average has no held-out images")
        how = "pooled out-of-fold scores of the members (no image is held out from the ensemble)"
    return {"split": "val", "selection_biased": biased,
            "epochs": max(int(m.get("epochs") or 0) for m in members),
            "train_seconds": round(sum(float(m.get("train_seconds") or 0) for m in members), 1),
            "train_precision": members[0].get("train_precision"),
            "ensemble": {"kind": kind, "members": n, "scored_by": scored,
                         "validation": how,
                         "member_roc_auc": [m.get("roc_auc") for m in members],
                         "member_accuracy": [m.get("accuracy") for m in members],
                         "member_epochs": [m.get("epochs") for m in members]}}


def _result(out: Path, metrics: dict, test_metrics: dict | None = None) -> TrainResult:
    if test_metrics is None and (out / "metrics_test.json").is_file():
        test_metrics = json.loads((out / "metrics_test.json").read_text())
    rows = read_split_csv(out / "split.csv")
    n_train = sum(r["split"] == "train" for r in rows)
    return TrainResult(out, metrics, test_metrics, int(metrics.get("epochs") or 0),
                       float(metrics.get("train_seconds") or 0.0), n_train, int(metrics["n"]))
