"""What a continued run (`cxrlab train --resume RUN --epochs N`, `Run.fit`) changes in training:
the learning-rate schedule restarts, and early stopping's patience starts over.

A continuation is recorded in config.yaml (`continued`: the epoch it started at and the epochs
the run was aimed at before), so the schedule is a function of the config alone: resuming a
continuation killed midway, or training the same config.yaml afresh, gives the same run.

The cosine schedule warm-restarts (SGDR, Loshchilov & Hutter 2017; what fastai's
`fit_one_cycle` does when called again on a trained learner): the added epochs get a warm-up
and a cosine of their own, from the run's lr down to 0. The epochs already trained keep the
schedule they were trained with (their history stays true), and "N more epochs" means the
same whatever the run did before. Re-aiming the old cosine at the new total would restart it
part-way up (a 9-epoch cosine re-aimed at 12 jumps from ~0 back to 15% of the peak) and still
not equal a run planned for 12 epochs. `plateau` and `none` simply go on.
"""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch.callbacks import EarlyStopping

from cxrlab.config import RunConfig
from cxrlab.training.optim import cosine_schedule


def restart_epochs(config: RunConfig) -> list[int]:
    """The (0-based) epochs at which a continuation started."""
    return [c.at_epoch for c in config.continued]


def restarted_cosine(total_steps: int, config: RunConfig) -> Callable[[int], float]:
    """The cosine schedule's factor by step: one cosine per training session (the first
    aimed at the epochs planned then, each continuation's at its new total). Without
    continuations exactly `cosine_schedule(total_steps)`."""
    if not config.continued:
        return cosine_schedule(total_steps)
    per_epoch = total_steps // config.epochs
    # (first step, steps it was aimed at) of each session
    starts = [0] + [c.at_epoch * per_epoch for c in config.continued]
    ends = [c.epochs_before * per_epoch for c in config.continued] + [total_steps]
    pieces = [(s, cosine_schedule(e - s)) for s, e in zip(starts, ends, strict=True)]

    def f(step: int) -> float:
        start, piece = next(p for p in reversed(pieces) if step >= p[0])
        return piece(step - start)

    return f


class RestartingEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping whose patience starts over at each continuation (as a new
    `fit` in Keras or fastai starts its callbacks afresh), while its best score stays the
    whole run's: a continuation stops after `patience` epochs that do not beat the run's best.
    A decision to stop at the epoch before a continuation is withdrawn."""

    def __init__(self, restarts: list[int], **kwargs):
        super().__init__(**kwargs)
        self.restarts = set(restarts)

    @property
    def state_key(self) -> str:
        """EarlyStopping's own: checkpoints written before this class existed restore it."""
        return f"EarlyStopping{dict(monitor=self.monitor, mode=self.mode)!r}"

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.current_epoch in self.restarts:  # continuing: the LR schedule restarts too
            sync_lr(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch in self.restarts:
            self.wait_count = 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.current_epoch + 1 in self.restarts:
            trainer.should_stop = False


def sync_lr(trainer) -> None:
    """After a checkpoint is restored, the optimizer holds the lr its old schedule set for the
    next step; a continuation's schedule says otherwise at that step (the warm restart)."""
    for cfg in trainer.lr_scheduler_configs:
        sched = cfg.scheduler
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is None:
            continue
        for group, base, f in zip(sched.optimizer.param_groups, sched.base_lrs, lambdas,
                                  strict=True):
            group["lr"] = base * f(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
