"""A time budget for a training run: measure a few steps, then plan epochs (and, if need be,
image size) so the whole run ends on time.

Three parts, kept apart so the planning can be tested without training anything:
`parse_budget`/`resolve_budget` (what the user asked for), `measure` (a short warm-up on the
real data and model, on a copy, leaving the run's weights and random streams untouched) and
`plan_run` (pure arithmetic on those timings). The warm-up plans from its best timings (a busy
moment only ever adds time); `BudgetWatch` re-checks the plan against the first full epoch's
real time and cuts epochs only if that says the run would end over budget, and with
`RunProgressBar` keeps the user informed while the run trains.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

from cxrlab.config import RunConfig, budget_seconds, format_seconds
from cxrlab.data.augment import augment_batch
from cxrlab.deploy.inference import folded, use_bf16
from cxrlab.errors import CxrlabError
from cxrlab.run import write_json
from cxrlab.training.finetune import (
    backbone_bn_eval,
    can_cache_features,
    freeze_stages,
    frozen_bn_eval,
    head_parameters,
    pooled_features,
    set_backbone_trainable,
    trainable_parameters,
)
from cxrlab.training.optim import cosine_schedule, make_optimizer

log = logging.getLogger("cxrlab")

AUTO_SECONDS = 30 * 60  # the README's promise for the default recipe on a CPU
# The machine looked busy during the warm-up: its slowest timed step took this many times its
# fastest, or the 1-minute load average per CPU exceeded this.
BUSY_SPREAD = 1.5
BUSY_LOAD = 1.5


# ---------------------------------------------------------------------------------------
# what was asked


def train_device(config) -> torch.device:
    """The device Lightning will train on (accelerator 'auto' picks CUDA, then MPS, then CPU)."""
    acc = config.accelerator
    if acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    if acc == "mps" or (acc == "auto" and torch.backends.mps.is_available()):
        return torch.device("mps")
    return torch.device("cpu")


def resolve_budget(config) -> float | None:
    """Seconds the run may take, or None for no budget.

    'auto' is 30 minutes only when training on a CPU with the recipe's number of epochs (an
    explicit --epochs, or a config.yaml that names every field, means the user chose the
    length); an explicit budget always applies.
    """
    parallel = config.devices * config.num_nodes > 1
    if config.time_budget == "auto":
        if parallel or "epochs" in config.model_fields_set:
            return None
        return AUTO_SECONDS if train_device(config).type == "cpu" else None
    seconds = budget_seconds(config.time_budget)
    if seconds is not None and parallel:
        raise CxrlabError("--time-budget: not supported with data-parallel training "
                          "(devices x num_nodes > 1); give --epochs instead")
    return seconds


def head_epochs(config) -> int:
    """Epochs of the recipe that train the head only (frozen backbone)."""
    if config.unfreeze_after is not None:
        return min(config.unfreeze_after, config.epochs)
    return config.epochs if config.freeze_backbone else 0


# ---------------------------------------------------------------------------------------
# the plan (pure)


@dataclass(frozen=True)
class Timings:
    """Seconds measured at `image_size` by `measure` (or given by a test)."""

    image_size: int
    full_step: float  # one training step with everything training (0 when not measured)
    head_step: float  # one step with the backbone frozen (0 when not measured); on the
    #                   pooled features when they are cached
    val_image: float  # validation forward of the whole model, per image
    epoch_overhead: float = 0.0  # checkpoints written every epoch
    fixed: float = 0.0  # final evaluation, plots, metrics
    bf16: bool = False  # the precision timed
    # frozen backbone, no augmentation: training computes the pooled features once
    # (finetune.cache_features) and every epoch trains the head on them
    features_cached: bool = False
    feature_pass: float = 0.0  # that one backbone pass over the train and validation images
    cached_val_image: float = 0.0  # validation per image on the cached features (head only)
    spread: float = 1.0  # the warm-up's main timing: slowest / fastest timed call
    load: float = 0.0  # 1-minute load average per CPU before the warm-up


def busy(t: Timings) -> str | None:
    """Why the machine looked busy during the warm-up (None: it did not). The plan comes from
    the best timings either way; this says how far to trust it."""
    why = []
    if t.spread > BUSY_SPREAD:
        why.append(f"the warm-up's step times spread {t.spread:.1f}x")
    if t.load > BUSY_LOAD:
        why.append(f"load average {t.load:.1f} per CPU")
    return ", ".join(why) or None


@dataclass(frozen=True)
class Plan:
    epochs: int
    image_size: int
    head_epochs: int
    predicted_s: float  # the whole run, from its start
    budget_s: float
    fits: bool
    asked_epochs: int
    asked_image_size: int
    full_epoch_s: float | None = None  # predicted, at image_size (the ETA before one ran)


def _epoch_seconds(t: Timings, steps: int, n_val: int, size: int) -> tuple[float, float]:
    """(a head-only epoch, a full epoch) at `size` px."""
    scale = (size / t.image_size) ** 2  # convolutions: cost grows with the pixels
    val = n_val * t.val_image
    full = (steps * t.full_step + val) * scale + t.epoch_overhead
    if t.features_cached:  # the head on pooled features: their size is not the image's
        return steps * t.head_step + n_val * t.cached_val_image + t.epoch_overhead, full
    return (steps * t.head_step + val) * scale + t.epoch_overhead, full


def predict_seconds(t: Timings, epochs: int, n_head: int, steps: int, n_val: int,
                    size: int) -> float:
    """The run: its epochs, the cached features' one backbone pass (if any) and the end."""
    head, full = _epoch_seconds(t, steps, n_val, size)
    h = min(n_head, epochs)
    scale = (size / t.image_size) ** 2
    return h * head + (epochs - h) * full + (t.feature_pass + t.fixed) * scale


def plan_run(budget_s: float, t: Timings, *, epochs: int, n_head: int, image_size: int,
             steps: int, n_val: int, spent: float = 0.0, min_full_epochs: int = 2,
             size_step: int = 32, min_size: int = 128) -> Plan:
    """The longest run that fits `budget_s`: fewer epochs first (down to the head-only
    epochs + `min_full_epochs`), then smaller images (`size_step` px at a time, not below
    `min_size`), with as many epochs as fit at the largest size where the minimum fits. If
    nothing fits: the minimum at the smallest size, marked `fits=False`. `spent`: seconds
    the run has already taken (data preparation, warm-up); `predicted_s` includes them.

    Never more epochs, nor larger images, than asked; the head-only epochs stay."""
    least = min(epochs, min(n_head, epochs) + min_full_epochs)
    if n_head >= epochs:  # frozen for the whole run: every epoch is head-only
        least = min(epochs, 1 + min_full_epochs)
    sizes = [image_size]
    while sizes[-1] - size_step >= min_size:
        sizes.append(sizes[-1] - size_step)

    def total(e: int, s: int) -> float:
        return spent + predict_seconds(t, e, n_head, steps, n_val, s)

    def make(e: int, s: int, fits: bool) -> Plan:
        # the ETA's epoch: a full one, or a head-only one when the backbone stays frozen
        epoch = _epoch_seconds(t, steps, n_val, s)[0 if n_head >= epochs else 1]
        return Plan(e, s, min(n_head, e), total(e, s), budget_s, fits, epochs, image_size,
                    epoch)

    for s in sizes:
        fitting = [e for e in range(least, epochs + 1) if total(e, s) <= budget_s]
        if fitting:
            return make(max(fitting), s, True)
    return make(least, sizes[-1], False)


# ---------------------------------------------------------------------------------------
# measuring (a warm-up on a copy)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: torch.device, repeats: int,
          clock=time.perf_counter) -> tuple[float, float]:
    """(the fastest of `repeats` timed calls, slowest / fastest). Other work on the machine only
    ever adds time, so the fastest call is this machine's own speed: the same command plans the
    same run whatever ran during these seconds (a busy warm-up cut the default recipe from 9
    epochs to 3 on a machine that trains all 9 in 11 min). The best call is optimistic about a
    whole epoch (allocation, the data loader, Python between steps): `BudgetWatch` re-checks
    the plan against the first full epoch's real time before cutting anything more. The
    spread says whether the machine looked busy. Tried before on one Zen 4 machine (the
    default recipe, which ran 8.2-9.2 min): the median of 5 steps predicted 7.0 min, the mean
    of 5 7.3, the mean of 3 8.4 and 9.9; the mean of 3 was kept until that busy warm-up."""
    fn()  # untimed: first calls pay for allocation and kernel selection
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    best = min(times)
    return best, (max(times) / best if best > 0 else 1.0)


def _load_per_cpu() -> float:
    """The 1-minute load average per CPU (0 where the system does not say)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


def measure(model: torch.nn.Module, config, train_x, val_x, n_head: int,
            repeats: int = 5, cached: bool = False) -> Timings:
    """Time training steps (head-only when the recipe has such epochs, full when it has those)
    and a validation forward on the real images, model, precision, batch size and layout.
    `cached` (frozen backbone, no augmentation: finetune.can_cache_features): time the one
    backbone pass that computes the pooled features and the head's steps on them instead.

    Works on a deep copy inside `fork_rng`: the run's weights and random streams are exactly
    as if this never ran."""
    load = _load_per_cpu()
    device = train_device(config)
    bf16 = use_bf16(config.precision, model)
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        m = copy.deepcopy(model).to(device)
        freeze_stages(m, config.frozen_stages)
        fmt = torch.channels_last if config.channels_last else torch.contiguous_format
        m.to(memory_format=fmt)
        gen = torch.Generator(device=device).manual_seed(config.seed + 1)
        xb = torch.as_tensor(train_x[: config.batch_size])
        vb = torch.as_tensor(val_x[: max(config.batch_size, 64)])

        def step(opt, frozen: bool):
            x = xb.to(device).float().div_(255.0)
            if config.augment != "none":
                x = augment_batch(x, config.augment, gen)
            x = x.contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if frozen:
                    with torch.no_grad():
                        feats = m.forward_features(x)
                    out = m.forward_head(feats)
                else:
                    out = m(x)
            backward(opt, out)

        def backward(opt, out):
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def pool(images):  # as finetune.cache_features
            return pooled_features(m, images, bf16=bf16, channels_last=config.channels_last)

        full = head = feature_pass = cached_val = 0.0
        spread = 1.0
        if n_head < config.epochs:
            m.train()
            frozen_bn_eval(m)
            opt = make_optimizer(trainable_parameters(m), config, device)
            full, spread = _time(lambda: step(opt, False), device, repeats)
        if n_head:
            set_backbone_trainable(m, False)
            m.train()
            backbone_bn_eval(m)
            opt = make_optimizer(head_parameters(m), config, device)
            if cached:
                per_pass, spread = _time(lambda: pool(vb), device, repeats)
                feature_pass = per_pass / max(len(vb), 1) * (len(train_x) + len(val_x))
                feats, vfeats = pool(xb).to(device), pool(vb).to(device)
                m.train()
                backbone_bn_eval(m)

                def head_step():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        out = m.forward_head(feats)
                    backward(opt, out)

                @torch.no_grad()
                def head_val():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        m.forward_head(vfeats)

                head = _time(head_step, device, repeats)[0]
                m.eval()
                cached_val = _time(head_val, device, repeats)[0] / max(len(vb), 1)
            else:
                head, head_spread = _time(lambda: step(opt, True), device, repeats)
                if not full:  # frozen throughout: the head-only step is the run's
                    spread = head_spread
            set_backbone_trainable(m, True)

        @torch.no_grad()
        def validate():
            x = vb.to(device).float().div_(255.0).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                folded(m, x)(x)  # as validation_step (the untimed first call folds)

        m.eval()
        val = _time(validate, device, repeats)[0] / max(len(vb), 1)  # 64 images a pass

        def checkpoint():  # best.ckpt and last.ckpt: weights + optimizer state, twice
            torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, io.BytesIO())

        ckpt = 2 * _time(checkpoint, device, 1)[0]
    # final evaluation (validation and test forward) is counted by the caller; plots, metrics
    # with bootstrap intervals and model.pt: a few seconds on a CPU
    return Timings(int(xb.shape[-1]), full, head, val, ckpt, 10.0 + ckpt, bf16, cached,
                   feature_pass, cached_val, spread, load)


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """As make_loader: drop_last when there is more than one batch."""
    return n_train // batch_size if n_train > batch_size else 1


@dataclass
class Budgeted:
    """A planned run: what fit's callbacks and RUN_DIR/plan.json need."""

    plan: Plan
    timings: Timings
    started: float  # time.time() when the run started
    record: dict
    # re-check the plan after the first full epoch (not in a cross-validation's fold: every
    # fold trains the plan fold 1 made, so that the pooled result is one recipe's)
    recheck: bool = True


def plan_for(config, budget_s: float, t: Timings, n_train: int, n_val: int,
             spent: float = 0.0) -> Plan:
    """`config`'s plan from warm-up timings `t` (pure: a test gives the timings).

    The automatic budget only shortens the schedule (a warm-up on a busy machine must not
    silently train the default recipe on smaller images), and never from a warm-up that looked
    busy: then the recipe's epochs start and the first full epoch decides (`BudgetWatch`)."""
    auto = config.time_budget == "auto"
    kw = dict(epochs=config.epochs, n_head=head_epochs(config), image_size=config.image_size,
              steps=steps_per_epoch(n_train, config.batch_size), n_val=n_val, spent=spent,
              min_size=config.image_size if auto else 128)
    if auto and busy(t):
        plan = plan_run(math.inf, t, **kw)
        return replace(plan, budget_s=budget_s, fits=plan.predicted_s <= budget_s)
    return plan_run(budget_s, t, **kw)


def plan_config(config, budget_s: float, model: torch.nn.Module, data, started: float):
    """Warm up, plan, log the plan; returns (the config to train with, Budgeted).

    The returned config names the planned epochs and image size and has no budget left to
    apply: saved as config.yaml, it retrains the same run without planning again."""
    tx, _, _ = data.subset("train")
    vx, _, _ = data.subset("val")
    n_test = int((data.splits == "test").sum())
    t = measure(model, config, tx, vx, head_epochs(config),
                cached=can_cache_features(model, config))
    t = replace(t, fixed=t.fixed + (len(vx) + n_test) * t.val_image)
    plan = plan_for(config, budget_s, t, len(tx), len(vx), spent=time.time() - started)
    auto = config.time_budget == "auto"
    log.info("%s", describe(plan, t, started, auto))
    if not plan.fits and not (auto and busy(t)):  # busy: the first full epoch decides
        log.warning("time budget %s: even %d epochs at %d px are predicted to take %.1f min; "
                    "the run will exceed its budget", format_seconds(budget_s), plan.epochs,
                    plan.image_size, plan.predicted_s / 60)

    planned = RunConfig.build({**config.model_dump(), "epochs": plan.epochs,
                               "image_size": plan.image_size, "time_budget": "none"})
    return planned, Budgeted(plan, t, started,
                             plan_record(plan, t, config.time_budget, started),
                             recheck=config.fold is None)


def describe(plan: Plan, t: Timings, started: float, auto: bool = False) -> str:
    end = time.strftime("%H:%M", time.localtime(started + plan.predicted_s))
    what = f"{plan.epochs} epochs"
    if plan.epochs < plan.asked_epochs:
        what = f"{plan.epochs} of {plan.asked_epochs} epochs"
    if plan.head_epochs:
        what += f" ({plan.head_epochs} head-only)"
    size = f"{plan.image_size} px"
    if plan.image_size != plan.asked_image_size:
        size = f"{plan.image_size} px (not {plan.asked_image_size})"
    size += " in bf16" if t.bf16 else " in fp32"
    steps = []
    if t.full_step:
        steps.append(f"step {t.full_step:.2f} s")
    if t.features_cached:
        steps.append(f"features once {t.feature_pass:.1f} s, then head-only step "
                     f"{t.head_step * 1e3:.1f} ms")
    elif t.head_step:
        steps.append(f"head-only step {t.head_step:.2f} s")
    steps.append(f"validation {t.val_image * 1e3:.1f} ms/image")
    text = (f"time budget {format_seconds(plan.budget_s)}: {what} at {size}, predicted "
            f"{plan.predicted_s / 60:.1f} min, ending about {end} (warm-up, best of its "
            f"timings: {', '.join(steps)})")
    why = busy(t)
    if why:
        text += f"; the machine looked busy ({why})"
        if auto:
            text += ": the first full epoch decides whether to cut epochs"
    return text


def plan_record(plan: Plan, t: Timings, budget: str, started: float) -> dict:
    """What RUN_DIR/plan.json keeps: the budget, the timings and the plan they gave."""
    return {"time_budget": budget, "started": time.strftime("%Y-%m-%dT%H:%M:%S",
                                                           time.localtime(started)),
            "plan": asdict(plan), "timings": asdict(t)}


# ---------------------------------------------------------------------------------------
# keeping to it


def remaining_seconds(epoch_seconds: list[float], done: int, total: int,
                      current_fraction: float = 0.0, planned_epoch: float | None = None,
                      head_epochs: int = 0) -> float | None:
    """Seconds left at the latest full epoch's pace (a head-only epoch is much faster than
    the full ones after it, so it does not count while full epochs remain); before a full
    epoch finished, the plan's full epoch time or, without a plan, None."""
    full = epoch_seconds[head_epochs:] if head_epochs < total else epoch_seconds
    per = full[-1] if full else planned_epoch
    if per is None:
        return None
    return max(0.0, (total - done - current_fraction) * per)


def recheck_epochs(plan: Plan, t: Timings, elapsed: float, epoch_s: float, done: int,
                   min_full_epochs: int = 2) -> tuple[int, float]:
    """(epochs to train, the whole run's predicted seconds) once the first full epoch took
    `epoch_s` (`done` epochs finished, `elapsed` seconds into the run, its checkpoint still to
    write). The plan's epochs unless that pace would end the run over budget; then the most
    that fit, but not fewer than the plan's own minimum (head-only epochs + `min_full_epochs`)
    nor than those done. Never more than planned: the schedule was set for them."""
    frozen = plan.head_epochs >= plan.epochs
    least = max(done, min(plan.epochs, (1 if frozen else plan.head_epochs) + min_full_epochs))
    fixed = t.fixed * (plan.image_size / t.image_size) ** 2

    def total(e: int) -> float:
        return elapsed + t.epoch_overhead + (e - done) * (epoch_s + t.epoch_overhead) + fixed

    if total(plan.epochs) <= plan.budget_s or least >= plan.epochs:
        return plan.epochs, total(plan.epochs)
    fitting = [e for e in range(least, plan.epochs) if total(e) <= plan.budget_s]
    e = max(fitting) if fitting else least
    return e, total(e)


class BudgetWatch(Callback):
    """After the first full epoch: re-check the plan against that epoch's real time and cut
    epochs only if it says the run would end over budget (the cosine schedule is re-aimed at
    the new last epoch; RUN_DIR/config.yaml and plan.json say so, so --resume continues the
    cut run). After each epoch: warn once when the run is predicted to end >10% over its
    budget."""

    def __init__(self, budgeted: Budgeted, run_dir: Path | None = None):
        self.budgeted, self.run_dir = budgeted, run_dir
        self.plan, self.started = budgeted.plan, budgeted.started
        t = budgeted.timings
        self.fixed = t.fixed * (self.plan.image_size / t.image_size) ** 2
        frozen = self.plan.head_epochs >= self.plan.epochs
        self.first_full = 1 if frozen else self.plan.head_epochs + 1  # epochs done after it
        self.durations: list[float] = []
        self.warned = False
        self._t0 = time.time()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.durations.append(time.time() - self._t0)
        done = trainer.current_epoch + 1
        if self.budgeted.recheck and done == self.first_full:
            self.recheck(trainer, pl_module, done)
        left = remaining_seconds(self.durations, done, trainer.max_epochs,
                                 planned_epoch=self.plan.full_epoch_s,
                                 head_epochs=self.plan.head_epochs)
        total = time.time() - self.started + (left or 0.0) + self.fixed
        if not self.warned and total > 1.1 * self.plan.budget_s:
            self.warned = True
            log.warning("time budget %s: after epoch %d the run is predicted to take %.1f min "
                        "(%.0f%% over); it keeps its %d epochs",
                        format_seconds(self.plan.budget_s), done, total / 60,
                        100 * (total / self.plan.budget_s - 1), trainer.max_epochs)

    def recheck(self, trainer, pl_module, done: int) -> None:
        epoch_s = self.durations[-1]
        epochs, predicted = recheck_epochs(self.plan, self.budgeted.timings,
                                           time.time() - self.started, epoch_s, done)
        budget = format_seconds(self.plan.budget_s)
        said = (f"the first full epoch took {epoch_s:.0f} s (the warm-up predicted "
                f"{self.plan.full_epoch_s or 0:.0f} s)")
        if epochs < trainer.max_epochs:
            log.warning("time budget %s: %s: cut to %d of %d epochs, predicted %.1f min",
                        budget, said, epochs, trainer.max_epochs, predicted / 60)
            self.cut(trainer, pl_module, epochs)
        else:
            log.info("time budget %s: %s: all %d epochs, predicted %.1f min", budget, said,
                     epochs, predicted / 60)
        self.budgeted.record["recheck"] = {"after_epoch": done, "epoch_s": round(epoch_s, 3),
                                           "epochs": epochs, "predicted_s": round(predicted, 1)}
        if self.run_dir is not None and (self.run_dir / "plan.json").is_file():
            write_json(self.run_dir / "plan.json", self.budgeted.record)

    def cut(self, trainer, pl_module, epochs: int) -> None:
        """Train `epochs` in all. Runs before this epoch's checkpoints are written, so they,
        config.yaml and a resumed run all agree on the new length."""
        trainer.fit_loop.max_epochs = epochs
        if pl_module.cfg.schedule == "cosine":  # as configure_optimizers would for `epochs`
            f = cosine_schedule(trainer.estimated_stepping_batches)
            for sc in trainer.lr_scheduler_configs:
                sc.scheduler.lr_lambdas = [f] * len(sc.scheduler.lr_lambdas)
        path = self.run_dir / "config.yaml" if self.run_dir is not None else None
        if path is not None and path.is_file():
            from cxrlab.config import RunConfig

            cfg = RunConfig.load(path)
            RunConfig.build({**cfg.model_dump(), "epochs": epochs}).save(path)


def _duration(seconds: float) -> str:
    """A time left as people say it: 45s, 4m12s, 1h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class RunProgressBar(RichProgressBar):
    """Lightning's Rich bar, plus the predicted end of the whole run ('run: ends in 4m12s,
    ~03:58', a duration and the clock time): from the latest full epoch's time once one
    finished, before that from the plan (or the current epoch's pace). Epochs count from 1,
    as in history.csv's plots and the logs ('Epoch 1/9')."""

    def __init__(self, *args, planned_end: float | None = None, fixed: float = 0.0,
                 planned_epoch: float | None = None, head_epochs: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.planned_end, self.fixed = planned_end, fixed
        self.planned_epoch, self.head_epochs = planned_epoch, head_epochs
        self.durations: list[float] = []
        self._t0: float | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._t0 = time.time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._t0 is not None:
            self.durations.append(time.time() - self._t0)
        super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        end = self.run_end(trainer)
        if end is not None:
            clock = time.strftime("%H:%M", time.localtime(end))
            run = {"run": f"ends in {_duration(end - time.time())}, ~{clock}"}
            items = {**run, **items}  # first: a narrow terminal cuts the line's end
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning's reads "Epoch 0/8" for the first of 9: counted from 1 here
        text = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None:
            text += f"/{self.trainer.max_epochs}"
        return f"{text:{len(self.validation_description)}}"  # padded: no flicker

    def run_end(self, trainer) -> float | None:
        now = time.time()
        if not self.durations and self.planned_end is not None:
            return self.planned_end
        in_epoch = now - self._t0 if self._t0 is not None else 0.0
        left = remaining_seconds(self.durations, trainer.current_epoch, trainer.max_epochs,
                                 planned_epoch=self.planned_epoch, head_epochs=self.head_epochs)
        if left is None:  # no full epoch finished, no plan: the current epoch's pace
            done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
            total = trainer.num_training_batches
            if self._t0 is None or not done or not isinstance(total, int) or total <= 0:
                return None
            per = in_epoch * total / done  # validation not yet counted
            left = remaining_seconds([], trainer.current_epoch, trainer.max_epochs,
                                     planned_epoch=per)
        return now + max(0.0, left - in_epoch) + self.fixed
