"""Adapting a run to a new intake without labels: `cxrlab adapt RUN IMAGES --out NEW_RUN`.

A hospital has thousands of unlabelled films of its own intake long before it has labels.
Two things can be learnt from them alone:

- **BatchNorm statistics** (AdaBN, Li et al. 2016): every BatchNorm's running mean and
  variance re-estimated on the intake, mixed with the run's own as in Schneider et al.
  (NeurIPS 2020): mean, var = (N * source + n * intake) / (N + n), N the prior strength in
  images, n the intake's images. The images are SHUFFLED (seeded) before they are batched:
  a class-sorted folder gives class-pure batches, whose variances carry the labels into the
  statistics. The statistics are the average over equal-sized batches (BatchNorm's cumulative
  average, `momentum=None`), every other layer in eval mode (no dropout, no drop-path).
- **The intake's prevalence** (two classes): EM on the run's posteriors (Saerens et al. 2002),
  after Platt-calibrating them on the run's own labelled validation predictions, whose
  prevalence is the source prior (calibrated EM: Alexandari et al., ICML 2020). The run's
  threshold is then moved by the change of prior odds, so that a film is called positive at
  the intake's prevalence exactly when its calibrated posterior odds, corrected to that
  prevalence, clear the run's own cut-off: logit t' = logit t - log(odds(q) / odds(pi)) / a.

Which of the two `adapt` applies by default was chosen on measurements (docs/intake-shift.md,
benchmarks/adapt.py): neither (DEFAULT_BN, DEFAULT_PREVALENCE), so the user names one.

The new run is complete like `calibrate`'s: a copy of the original with model.pt (adapted
statistics), threshold, val_predictions.csv, metrics.json and plots replaced, run.json's
"site_adaptation" saying what it was adapted on and what changed, and digests.csv extended by
the intake's images (split "adaptation"). It appears all at once or not at all.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrlab.data.cache import load_images
from cxrlab.deploy.inference import decide, float_batches, predict_probs
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.overlap import file_digests, pixel_digests, record
from cxrlab.run import (
    LoadedRun,
    check_out_dir,
    load_run,
    read_predictions,
    write_json,
    write_threshold,
)
from cxrlab.site.calibration import (
    _logit,
    _rescore,
    _sigmoid,
    platt,
    write_new_run,
    write_validation,
)

log = logging.getLogger("cxrlab")

MIN_IMAGES = 100  # below: statistics and a prevalence from so few films move decisions on noise
BATCH = 64  # images per batch for the statistics (Li et al. and Schneider et al. use 32-200)
# Neither is on by default: measured (docs/intake-shift.md "Adapting without labels",
# benchmarks/adapt.py), AdaBN cost accuracy on an unshifted intake and under blur, and the
# prevalence estimate, right on an unshifted intake, followed a framing shift's inflated
# scores (0.94 estimated for 0.625) and moved the threshold the wrong way.
DEFAULT_BN = False
DEFAULT_PREVALENCE = False
WHY_NOT = ("neither helped on both kinds of run measured (docs/intake-shift.md, "
           "\"Adapting without labels\")")
DEFAULT_BN_PRIOR = 0.0  # N, in images; 0: the intake's statistics alone (AdaBN)
SPLIT = "adaptation"  # the intake's rows in RUN/digests.csv


def batchnorms(model: nn.Module, frozen_stages: int = 0
               ) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The BatchNorm layers whose running statistics training estimated: the ones AdaBN
    re-estimates. The first `frozen_stages` stages (config `frozen_stages`) are left out: they
    kept their pretrained statistics while the layers after them learnt on what those
    statistics output, so the intake's would change every feature downstream (measured: on an
    unshifted intake, accuracy 0.964 -> 0.881 when they were re-estimated too)."""
    frozen = ()
    if frozen_stages and hasattr(model, "stage_names"):
        frozen = tuple(f"{name}." for stage in model.stage_names()[:frozen_stages]
                       for name in stage)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and not f"{n}.".startswith(frozen or ("\0",))]


def statistics(model: nn.Module, frozen_stages: int = 0
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{BatchNorm name: (running mean, running var)}, copies, of `batchnorms`."""
    return {n: (m.running_mean.clone(), m.running_var.clone())
            for n, m in batchnorms(model, frozen_stages)}


@torch.no_grad()
def intake_statistics(model: nn.Module, images: np.ndarray, batch_size: int = BATCH,
                      seed: int = 0, shuffle: bool = True, frozen_stages: int = 0
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every BatchNorm's mean and variance on `images` (uint8 N, C, S, S), as AdaBN estimates
    them: the model in eval mode but its BatchNorms normalising each batch by its own
    statistics, which are averaged over equal-sized batches. `shuffle=False` keeps the given
    order (only to show what class-sorted batches do)."""
    n = len(images)
    if n < 2:
        raise CxrlabError(f"{n} image(s): BatchNorm statistics need at least 2")
    m = copy.deepcopy(model).eval()
    for _, bn in batchnorms(m, frozen_stages):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: every batch weighs the same
        bn.train()
    for part in batches(n, batch_size, seed, shuffle):
        for x in float_batches(m, images[part], len(part)):
            m(x)
    return statistics(m, frozen_stages)


def batches(n: int, batch_size: int = BATCH, seed: int = 0, shuffle: bool = True
            ) -> list[np.ndarray]:
    """The indices of each batch of `intake_statistics`: a seeded permutation of 0..n-1 cut
    into equal-sized batches (sizes differ by at most one), so no batch is one class's."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return np.array_split(order, max(1, math.ceil(n / batch_size)))


def mixed(model: nn.Module, intake: dict, n: int, prior: float) -> nn.Module:
    """A copy of `model` with each BatchNorm's statistics (N * source + n * intake) / (N + n),
    N = `prior` (Schneider et al. 2020); prior 0 is AdaBN, the intake's alone."""
    if prior < 0:
        raise CxrlabError(f"--bn-prior {prior}: must be >= 0 (images)")
    out = copy.deepcopy(model).eval()
    w = n / (prior + n)
    for name, (mean, var) in intake.items():
        bn = out.get_submodule(name)
        bn.running_mean.mul_(1 - w).add_(mean.to(bn.running_mean.dtype), alpha=w)
        bn.running_var.mul_(1 - w).add_(var.to(bn.running_var.dtype), alpha=w)
    return out


def em_prevalence(posterior: np.ndarray, source_prior: float, tol: float = 1e-8,
                  max_iter: int = 1000) -> float:
    """The prevalence of the positive class in a sample, by EM on calibrated posteriors that
    assume `source_prior` (Saerens, Latinne & Decaestecker 2002)."""
    p = np.clip(np.asarray(posterior, dtype=np.float64), 1e-12, 1 - 1e-12)
    pi = float(np.clip(source_prior, 1e-6, 1 - 1e-6))
    q = pi
    for _ in range(max_iter):
        w1, w0 = q / pi, (1 - q) / (1 - pi)
        new = float(np.mean(w1 * p / (w1 * p + w0 * (1 - p))))
        new = min(max(new, 1e-6), 1 - 1e-6)
        if abs(new - q) < tol:
            return new
        q = new
    return q


def shifted_threshold(threshold: float, a: float, source_prior: float, prevalence: float
                      ) -> float:
    """The run's threshold moved for a new prevalence: the score whose Platt-calibrated
    posterior odds (slope `a`), times odds(prevalence) / odds(source_prior), equal the
    calibrated odds at the run's threshold."""
    log_ratio = _logit(np.array([prevalence]))[0] - _logit(np.array([source_prior]))[0]
    z = _logit(np.array([threshold]))[0] - log_ratio / a
    return float(_sigmoid(z))


def validation_calibration(run: LoadedRun) -> tuple[float, float, float]:
    """(a, b, prevalence): Platt scaling of the run's validation scores and their prevalence,
    from val_predictions.csv (the labelled evidence the prevalence estimate stands on)."""
    vp_file = run.run_dir / "val_predictions.csv"
    if not vp_file.is_file():
        raise CxrlabError(f"{run.run_dir}: no val_predictions.csv; the intake's prevalence is "
                          "estimated against the run's validation predictions (--no-prevalence "
                          "to adapt without it)")
    _, vy, vp = read_predictions(vp_file, run.classes)
    pos = run.info.positive
    is_pos = vy == pos
    if is_pos.all() or not is_pos.any():
        raise CxrlabError(f"{vp_file}: one class only; cannot calibrate the prevalence estimate")
    a, b = platt(_logit(vp[:, pos]), is_pos)
    if a <= 0:
        raise CxrlabError(f"{vp_file}: the run's validation scores do not rank the classes; "
                          "no prevalence estimate (--no-prevalence)")
    return a, b, float(is_pos.mean())


def moved(before: np.ndarray, after: np.ndarray, classes: list[str]) -> dict[str, int]:
    """{"A->B": how many images' decisions went from class A to class B} (changes only)."""
    out: dict[str, int] = {}
    for i, a in enumerate(classes):
        for j, b in enumerate(classes):
            k = int(((before == i) & (after == j)).sum())
            if i != j and k:
                out[f"{a}->{b}"] = k
    return out


def _intake(run: LoadedRun, data: Path, skip_bad: bool, min_images: int):
    from cxrlab.deploy.predict import expand_paths

    files = expand_paths([Path(data)])
    if len(files) < min_images:
        raise CxrlabError(f"{data}: {len(files)} image(s); adapt needs at least {min_images} "
                          "unlabelled films of the intake")
    images, bad = load_images(files, run.config.image_size, run.info.in_chans, cache_dir=None,
                              skip_bad=skip_bad, bit_depth=run.bit_depth)
    bad_paths = {Path(p) for p, _ in bad}
    files = [f for f in files if f not in bad_paths]
    if len(files) < min_images:
        raise CxrlabError(f"{data}: {len(files)} readable image(s); adapt needs at least "
                          f"{min_images} unlabelled films of the intake")
    return files, images


def adapt_run(run_dir: Path, data: Path, out: Path, *, bn: bool | None = None,
              bn_prior: float = DEFAULT_BN_PRIOR, prevalence: bool | None = None,
              skip_bad: bool = False, seed: int = 0, n_boot: int = 1000,
              min_images: int = MIN_IMAGES) -> dict:
    """Adapt the run to the unlabelled images under DATA and write the new complete run OUT.

    `bn` / `prevalence`: None takes the measured default (DEFAULT_BN / DEFAULT_PREVALENCE).
    Returns what changed (see `describe`)."""
    out = Path(out)
    check_out_dir(out)
    if out.resolve().is_relative_to(Path(run_dir).resolve()):
        raise CxrlabError(f"--out {out}: inside the run {run_dir}; choose a folder outside it")
    if bn_prior < 0:
        raise CxrlabError(f"--bn-prior {bn_prior}: must be >= 0 (images)")
    run = load_run(run_dir)
    bn = DEFAULT_BN if bn is None else bn
    pos = run.info.positive
    if prevalence is None:
        prevalence = DEFAULT_PREVALENCE and pos is not None
    if not bn and not prevalence:
        raise CxrlabError(f"adapt: choose --bn and/or --prevalence; {WHY_NOT}")
    if prevalence and pos is None:
        raise CxrlabError(f"{run_dir}: {len(run.classes)} classes; --prevalence adapts "
                          "two-class runs only")
    frozen = run.config.frozen_stages
    if bn and not batchnorms(run.model, frozen):
        raise CxrlabError(f"{run_dir}: the model has no BatchNorm layers that training "
                          "estimated; nothing for --bn to re-estimate (--no-bn)")
    cal = validation_calibration(run) if prevalence else None  # refuse before any decoding
    files, images = _intake(run, data, skip_bad, min_images)
    if bn:
        log.warning("adapt --bn: re-estimated BatchNorm statistics cost accuracy on the runs "
                    "measured unless the intake was shifted; score it on labelled films of the "
                    "intake that it was not adapted on before using it")
    if prevalence:
        log.warning("adapt --prevalence: the estimate assumes only the class mix changed; "
                    "where the films themselves differ (evaluate's intake check warns) it "
                    "follows the shifted scores and can move the threshold the wrong way")
    n = len(files)
    before = predict_probs(run.model, images)
    model = run.model
    rec: dict = {"data": str(Path(data).resolve()), "n_images": n,
                 "adapted_from": str(Path(run_dir).resolve()),
                 "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                 "batchnorm": None, "prevalence": None}
    if bn:
        stats = intake_statistics(run.model, images, seed=seed, frozen_stages=frozen)
        model = mixed(run.model, stats, n, bn_prior)
        rec["batchnorm"] = {"method": "AdaBN with a source prior (Schneider et al. 2020)",
                            "prior_images": bn_prior, "intake_weight": n / (bn_prior + n),
                            "layers": len(stats), "frozen_stages_kept": frozen,
                            "batch_size": BATCH,
                            "shuffled": True, "seed": seed}
    after = predict_probs(model, images) if bn else before
    threshold = run.threshold
    if prevalence:
        a, b, pi = cal
        t0 = 0.5 if run.threshold is None else run.threshold
        post = _sigmoid(a * _logit(after[:, pos]) + b)
        q = em_prevalence(post, pi)
        threshold = shifted_threshold(t0, a, pi, q)
        rec["prevalence"] = {
            "method": "EM on Platt-calibrated posteriors (Saerens et al. 2002)",
            "positive_class": run.classes[pos], "estimated": q, "validation": pi,
            "platt": [a, b], "threshold_before": run.threshold, "threshold_after": threshold}
    old_dec = decide(before, pos, run.threshold)
    new_dec = decide(after, pos, threshold)
    rec["decisions_moved"] = moved(old_dec, new_dec, run.classes)
    rec["n_moved"] = int((old_dec != new_dec).sum())
    rec["predicted_before"] = {c: int((old_dec == k).sum()) for k, c in enumerate(run.classes)}
    rec["predicted_after"] = {c: int((new_dec == k).sum()) for k, c in enumerate(run.classes)}
    _write_run(run, out, rec, model, threshold, n_boot, files, images)
    return {**rec, "out": str(out)}


def describe(r: dict) -> str:
    """What `adapt_run` changed, in a few sentences for the console."""
    parts = [f"Adapted on {r['n_images']} unlabelled images of {r['data']}."]
    if r["batchnorm"]:
        b = r["batchnorm"]
        parts.append(f"BatchNorm statistics of {b['layers']} layers re-estimated on them "
                     f"(prior {b['prior_images']:g} images: intake weight "
                     f"{b['intake_weight']:.2f}).")
    if r["prevalence"]:
        p = r["prevalence"]
        old = "0.5 (none saved)" if p["threshold_before"] is None else \
            f"{p['threshold_before']:.4g}"
        parts.append(f"Estimated prevalence of {p['positive_class']}: {p['estimated']:.3f} "
                     f"(validation: {p['validation']:.3f}); threshold {old} -> "
                     f"{p['threshold_after']:.4g}.")
    moves = ", ".join(f"{v} {k}" for k, v in r["decisions_moved"].items()) or "none"
    parts.append(f"Decisions on these images moved: {r['n_moved']} of {r['n_images']} "
                 f"({moves}).")
    return " ".join(parts)


def _write_run(run: LoadedRun, out: Path, rec: dict, model: nn.Module,
               threshold: float | None, n_boot: int, files: list[Path],
               images: np.ndarray) -> None:
    """The new run, built beside OUT and renamed into place (complete or absent)."""
    def fill(tmp: Path) -> None:
        _adapted_files(run, tmp, rec, model, threshold, n_boot)
        record(tmp, files, [SPLIT] * len(files), file_digests(files), pixel_digests(images),
               append=True)

    write_new_run(run, out, fill, what="adapting")


def _adapted_files(run: LoadedRun, new: Path, rec: dict, model: nn.Module,
                   threshold: float | None, n_boot: int) -> None:
    classes = run.classes
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, new / "model.pt")
    if threshold is not None:
        write_threshold(new, threshold)
    vp_file = new / "val_predictions.csv"
    if vp_file.is_file():
        paths, vy, vp = read_predictions(vp_file, classes)
        if rec["batchnorm"]:
            scored = _rescore(run, model, paths)
            if scored is None:  # the old scores would describe another model
                raise CxrlabError(f"{run.run_dir}: its validation images are not all readable "
                                  "here; the BatchNorm-adapted run cannot score them "
                                  "(--no-bn adapts the decision only)")
            vp = scored
        rec["val_predictions"] = ("validation images scored by the adapted model.pt" if
                                  rec["batchnorm"] else "the original's (model unchanged)")
        write_validation(run, new, paths, vy, vp, threshold, n_boot,
                         {"note": "the adapted run on the source's validation images, which "
                                  "are not the intake it was adapted to"},
                         "Validation confusion matrix (adapted to an intake)")
    info = json.loads((new / "run.json").read_text())
    info["site_adaptation"] = rec
    write_json(new / "run.json", info)
