"""What makes a run resumable: atomic checkpoint files and the state Lightning does not save.

Lightning's checkpoint holds the model, optimizer, scheduler, loop counters and the callbacks'
state (early stopping, best checkpoint). It does not hold the random number generators, our
augmentation generator, the train loader's shuffling generator or history.csv; `TrainingState`
adds them. The checkpoint is written at the very end of an epoch (after the history row, the
early-stopping update and all of the epoch's random draws), so resuming from it continues
exactly where an uninterrupted run would be: a run killed mid-epoch repeats that epoch from
its start with the same random numbers.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cxrlab.training.restarts import restart_epochs

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file beside the target, fsync, then rename over it.

    A crash (SIGKILL, power loss, full disk) during the write leaves the previous checkpoint
    intact instead of a truncated one that cannot be resumed from.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a run is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)


def rng_states() -> dict[str, Any]:
    """Global generators, as plain types and tensors (checkpoints load with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                      float(gauss)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    kind, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


class TrainingState(Callback):
    """The resumable state Lightning leaves out, saved in every checkpoint.

    `history` is the module's HistoryCSV (its rows travel in the checkpoint, so a resumed run's
    history.csv is rewritten from them and never holds a row of an epoch that was lost);
    `sampler_generator` is the train loader's shuffling (or weighted sampling) generator.
    """

    def __init__(self, sampler_generator: torch.Generator | None = None):
        self.sampler_generator = sampler_generator
        self.module: L.LightningModule | None = None
        self.seconds_before = 0.0  # training time of earlier sessions of this run
        self.resumed = False
        self._pending: dict[str, Any] | None = None
        self._t0 = time.perf_counter()

    @property
    def state_key(self) -> str:
        return "cxrlab.TrainingState"

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.module = pl_module

    def state_dict(self) -> dict[str, Any]:
        m = self.module
        aug = getattr(m, "_aug_gen", None)
        history = getattr(m, "history", None)
        trainer = m.trainer if m is not None else None
        return {
            "rng": rng_states(),
            "aug_generator": aug.get_state() if aug is not None else None,
            "sampler_generator": (self.sampler_generator.get_state()
                                  if self.sampler_generator is not None else None),
            "history": list(history.rows) if history is not None else [],
            "val_loss": (float(trainer.callback_metrics["val_loss"])
                         if trainer is not None and "val_loss" in trainer.callback_metrics
                         else None),
            "seconds": self.seconds,
            # early stopping decided at this epoch's end: a resumed run must not train on
            "should_stop": bool(trainer.should_stop) if trainer is not None else False,
        }

    @property
    def seconds(self) -> float:
        """Training time of the whole run, over all its sessions."""
        return self.seconds_before + time.perf_counter() - self._t0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict
        # Now, not at on_train_start: Lightning creates the first epoch's loader iterator,
        # which draws from this generator, before on_train_start.
        if state_dict["sampler_generator"] is not None and self.sampler_generator is not None:
            self.sampler_generator.set_state(state_dict["sampler_generator"])

    def on_train_start(self, trainer, pl_module) -> None:
        """Applied here, after Lightning restored everything and before the first batch."""
        self._t0 = time.perf_counter()
        s, self._pending = self._pending, None
        if s is None:
            return
        self.resumed = True
        self.seconds_before = float(s.get("seconds") or 0.0)
        if pl_module.history is not None and trainer.is_global_zero:
            pl_module.history.replace(s["history"])
        if s["aug_generator"] is not None:
            pl_module.restore_augmentation(s["aug_generator"])
        # Lightning steps epoch-interval schedulers (ReduceLROnPlateau) after the checkpoint
        # is written and does not repeat that step on resume; repeat it here.
        for cfg in trainer.lr_scheduler_configs:
            if cfg.interval != "epoch":
                continue
            if isinstance(cfg.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                if s["val_loss"] is not None:
                    cfg.scheduler.step(s["val_loss"])
            else:
                cfg.scheduler.step()
        if s.get("should_stop") and trainer.current_epoch not in restart_epochs(pl_module.cfg):
            trainer.should_stop = True  # (a continuation starting here trains on: restarts.py)
        set_rng_states(s["rng"])
