"""What the atomic checkpoint costs: AtomicCheckpointIO (temp file, fsync, rename, fsync dir)
against Lightning's TorchCheckpointIO, on a real checkpoint of a model with AdamW state.

    PYTHONPATH=src python benchmarks/checkpoint_write.py [--model resnet18] [--repeats 5]

Prints the median seconds per save of each and their ratio, measured in one run, in a
temporary folder on the same disk as the current directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cxrlab.models import create_model
from cxrlab.training.checkpoints import AtomicCheckpointIO


def checkpoint_of(model_name: str) -> dict:
    model = create_model(model_name, num_classes=1, in_chans=1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.rand(2, 1, 64, 64)).sum().backward()
    opt.step()  # fills both Adam moments: the checkpoint's real size
    return {"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}


def median_seconds(io, ckpt: dict, folder: Path, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        io.save_checkpoint(ckpt, folder / f"c{i % 2}.ckpt")
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ckpt = checkpoint_of(args.model)
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        folder = Path(tmp)
        plain = median_seconds(TorchCheckpointIO(), ckpt, folder, args.repeats)
        atomic = median_seconds(AtomicCheckpointIO(), ckpt, folder, args.repeats)
        size = (folder / "c0.ckpt").stat().st_size / 2**20
    print(f"{args.model}: checkpoint {size:.0f} MiB")
    print(f"  Lightning TorchCheckpointIO  {plain:.3f} s")
    print(f"  AtomicCheckpointIO           {atomic:.3f} s  ({atomic / plain:.2f}x)")


if __name__ == "__main__":
    main()
