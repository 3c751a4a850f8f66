"""A time budget for a training run: measure a few steps, then plan epochs (and, if need be,
image size) so the whole run ends on time.

Three parts, kept apart so the planning can be tested without training anything:
`parse_budget`/`resolve_budget` (what the user asked for), `measure` (a short warm-up on the
real data and model, on a copy, leaving the run's weights and random streams untouched) and
`plan_run` (pure arithmetic on those timings). `BudgetWatch` and `RunProgressBar` keep the
user informed while the run trains.
"""

from __future__ import annotations

import copy
import io
import logging
import time
from dataclasses import asdict, dataclass, replace

import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar

from cxrlab.config import RunConfig, budget_seconds, format_seconds
from cxrlab.data.augment import augment_batch
from cxrlab.deploy.inference import folded, use_bf16
from cxrlab.errors import CxrlabError
from cxrlab.training.finetune import (
    backbone_bn_eval,
    freeze_stages,
    frozen_bn_eval,
    head_parameters,
    set_backbone_trainable,
    trainable_parameters,
)
from cxrlab.training.optim import make_optimizer

log = logging.getLogger("cxrlab")

AUTO_SECONDS = 30 * 60  # the README's promise for the default recipe on a CPU


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
    full_step: float  # one training step with everything training
    head_step: float  # one training step with the backbone frozen (0 when not measured)
    val_image: float  # validation forward, per image
    epoch_overhead: float = 0.0  # checkpoints written every epoch
    fixed: float = 0.0  # final evaluation, plots, metrics
    bf16: bool = False  # the precision timed


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
    scale = (size / t.image_size) ** 2  # convolutions: cost grows with the pixels
    val = n_val * t.val_image
    return ((steps * t.head_step + val) * scale + t.epoch_overhead,
            (steps * t.full_step + val) * scale + t.epoch_overhead)


def predict_seconds(t: Timings, epochs: int, n_head: int, steps: int, n_val: int,
                    size: int) -> float:
    head, full = _epoch_seconds(t, steps, n_val, size)
    h = min(n_head, epochs)
    return h * head + (epochs - h) * full + t.fixed * (size / t.image_size) ** 2


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
        return Plan(e, s, min(n_head, e), total(e, s), budget_s, fits, epochs, image_size,
                    _epoch_seconds(t, steps, n_val, s)[1])

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


def _time(fn, device: torch.device, repeats: int) -> float:
    """The mean of `repeats` timed calls: a run's time is the sum of its steps, slow ones
    included. Tried on one Zen 4 machine, the landed default (8.2-9.2 min): the median of 5
    steps predicted 7.0 min (ran 9.2), the mean of 5 7.3 (8.2), the mean of 3 8.4 and 9.9
    (8.7, 8.5): no better than 3, so 3 it stays. Those runs still paid PyTorch's NaN fill of
    new tensors, which the warm-up never did (a sixth of an epoch; gone since
    `training.deterministic_without_nan_fill`). The validation forward is timed over 3
    passes too: one pass of 64 images read 4.2-10.0 ms an image in fresh processes on one
    machine, 3 passes 4.1-5.6."""
    fn()  # untimed: first calls pay for allocation and kernel selection
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeats


def measure(model: torch.nn.Module, config, train_x, val_x, n_head: int,
            repeats: int = 3) -> Timings:
    """Time training steps (head-only when the recipe has such epochs, and full) and a
    validation forward on the real images, model, precision, batch size and layout.

    Works on a deep copy inside `fork_rng`: the run's weights and random streams are exactly
    as if this never ran."""
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
            out.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        m.train()
        frozen_bn_eval(m)
        opt = make_optimizer(trainable_parameters(m), config, device)
        full = _time(lambda: step(opt, False), device, repeats)
        head = 0.0
        if n_head:
            set_backbone_trainable(m, False)
            m.train()
            backbone_bn_eval(m)
            opt = make_optimizer(head_parameters(m), config, device)
            head = _time(lambda: step(opt, True), device, repeats)
            set_backbone_trainable(m, True)

        @torch.no_grad()
        def validate():
            x = vb.to(device).float().div_(255.0).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                folded(m, x)(x)  # as validation_step (the untimed first call folds)

        m.eval()
        val = _time(validate, device, repeats) / max(len(vb), 1)  # 64 images a pass

        def checkpoint():  # best.ckpt and last.ckpt: weights + optimizer state, twice
            torch.save({"model": m.state_dict(), "opt": opt.state_dict()}, io.BytesIO())

        ckpt = 2 * _time(checkpoint, device, 1)
    # final evaluation (validation and test forward) is counted by the caller; plots, metrics
    # with bootstrap intervals and model.pt: a few seconds on a CPU
    return Timings(int(xb.shape[-1]), full, head, val, ckpt, 10.0 + ckpt, bf16)


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


def plan_config(config, budget_s: float, model: torch.nn.Module, data, started: float):
    """Warm up, plan, log the plan; returns (the config to train with, Budgeted).

    The returned config names the planned epochs and image size and has no budget left to
    apply: saved as config.yaml, it retrains the same run without planning again."""
    tx, _, _ = data.subset("train")
    vx, _, _ = data.subset("val")
    n_test = int((data.splits == "test").sum())
    n_head = head_epochs(config)
    t = measure(model, config, tx, vx, n_head)
    t = replace(t, fixed=t.fixed + (len(vx) + n_test) * t.val_image)
    plan = plan_run(budget_s, t, epochs=config.epochs, n_head=n_head,
                    image_size=config.image_size,
                    steps=steps_per_epoch(len(tx), config.batch_size), n_val=len(vx),
                    spent=time.time() - started,
                    # the automatic budget only shortens the schedule: a warm-up on a busy
                    # machine must not silently train the default recipe on smaller images
                    min_size=config.image_size if config.time_budget == "auto" else 128)
    log.info("%s", describe(plan, t, started))
    if not plan.fits:
        log.warning("time budget %s: even %d epochs at %d px are predicted to take %.1f min; "
                    "the run will exceed its budget", format_seconds(budget_s), plan.epochs,
                    plan.image_size, plan.predicted_s / 60)

    planned = RunConfig.build({**config.model_dump(), "epochs": plan.epochs,
                               "image_size": plan.image_size, "time_budget": "none"})
    return planned, Budgeted(plan, t, started,
                             plan_record(plan, t, config.time_budget, started))


def describe(plan: Plan, t: Timings, started: float) -> str:
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
    return (f"time budget {format_seconds(plan.budget_s)}: {what} at {size}, predicted "
            f"{plan.predicted_s / 60:.1f} min, ending about {end} (warm-up: step "
            f"{t.full_step:.2f} s" + (f", head-only step {t.head_step:.2f} s" if t.head_step
                                      else "") + f", validation {t.val_image * 1e3:.1f} ms/image)")


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


class BudgetWatch(Callback):
    """After each epoch: warn once when the run is predicted to end >10% over its budget
    (the schedule is not cut: it was planned to end at the last epoch)."""

    def __init__(self, plan: Plan, started: float, fixed: float):
        self.plan, self.started, self.fixed = plan, started, fixed
        self.durations: list[float] = []
        self.warned = False
        self._t0 = time.time()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.durations.append(time.time() - self._t0)
        left = remaining_seconds(self.durations, trainer.current_epoch + 1, trainer.max_epochs,
                                 planned_epoch=self.plan.full_epoch_s,
                                 head_epochs=self.plan.head_epochs)
        total = time.time() - self.started + (left or 0.0) + self.fixed
        if not self.warned and total > 1.1 * self.plan.budget_s:
            self.warned = True
            log.warning("time budget %s: after epoch %d the run is predicted to take %.1f min "
                        "(%.0f%% over); it keeps its planned %d epochs",
                        format_seconds(self.plan.budget_s), trainer.current_epoch + 1,
                        total / 60, 100 * (total / self.plan.budget_s - 1), self.plan.epochs)


class RunProgressBar(RichProgressBar):
    """Lightning's Rich bar, plus the predicted end of the whole run ('run ETA 12:34'): from
    the latest full epoch's time once one finished, before that from the plan (or the
    current epoch's pace)."""

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
            items["run ETA"] = time.strftime("%H:%M", time.localtime(end))
        return items

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
