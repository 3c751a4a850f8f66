"""Data-parallel training helpers: which process writes the run, and epoch outputs gathered.

Lightning runs one process per device (launched by itself, `torchrun` or SLURM's `srun`);
every process runs the whole `cxrlab train` command. Only global rank 0 writes the run
directory; the others train and write nothing.
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.strategies import DDPStrategy


def global_rank() -> int:
    """This process's global rank, from the launcher's environment, before Lightning starts.

    torchrun sets RANK; SLURM sets SLURM_PROCID; Lightning's own launcher sets NODE_RANK and
    LOCAL_RANK for the processes it starts (rank 0 is the one the user started).
    """
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            if key == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1") or 1) < 2:
                continue  # one task: an interactive allocation, not a distributed launch
            return int(os.environ[key])
    node = int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0")) or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return node * 1000 + local  # only "is it zero" matters before Lightning knows world size


def is_rank_zero() -> bool:
    return global_rank() == 0


def gather_in_order(module, tensors: list[torch.Tensor], n_total: int | None) -> list[torch.Tensor]:
    """Each process's per-sample outputs, gathered from all processes, in dataset order.

    With Lightning's DistributedSampler (shuffle off, as for validation) process r holds samples
    r, r + W, r + 2W, ... of the dataset padded by repeating its first samples to a multiple of
    W. Interleaving the gathered rows restores dataset order; cutting at `n_total` drops the
    padding duplicates. With `n_total=None` (shuffled training samples) the rows are simply
    concatenated.
    """
    out = []
    for t in tensors:
        g = module.all_gather(t.to(module.device)).cpu()  # (W, n, ...)
        if n_total is not None:
            g = g.transpose(0, 1).reshape(-1, *t.shape[1:])[:n_total]
        else:
            g = g.reshape(-1, *t.shape[1:])
        out.append(g)
    return out


def rewrap_after_unfreeze(trainer) -> None:
    """Rebuild the DDP wrapper once more parameters require gradients (--unfreeze-after).

    DDP registers gradient averaging only for the parameters that require gradients when it
    wraps the model: a backbone unfrozen later would train on each process's own gradients
    and the processes would silently drift apart. Wrapping again (collectively, at the same
    epoch start on every process; it broadcasts rank 0's weights, identical anyway) makes the
    new wrapper average the backbone's gradients too. One process: nothing to do.
    """
    if trainer.world_size < 2 or not isinstance(trainer.strategy, DDPStrategy):
        return
    strategy = trainer.strategy
    strategy.model = strategy.lightning_module  # drop the old wrapper and its reducer
    strategy.configure_ddp()
