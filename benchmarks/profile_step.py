"""Where does a training step's time go? torch.profiler over the same step as a run.

    python benchmarks/profile_step.py                          # resnet18 224 px b32, bf16 + CL
    python benchmarks/profile_step.py --fp32                   # fp32, contiguous (the naive math)
    python benchmarks/profile_step.py --model cnn --image-size 180 --batch-size 16

The step is throughput.py's ceiling (a): ClassifierModule loss, train.make_optimizer, random
tensors in memory, so only the model's arithmetic is profiled. Prints self CPU time per
operator family and the top operators. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from cxrlab.config import RunConfig
from cxrlab.models import create_model
from cxrlab.training.loop import ClassifierModule
from cxrlab.training.optim import make_optimizer

FAMILIES = [  # first match wins
    ("convolution backward", r"convolution_backward|mkldnn_convolution_backward"),
    ("convolution forward", r"convolution|conv2d|mkldnn_convolution"),
    ("batch norm (fwd + bwd)", r"batch_norm"),
    ("activations, pooling (fwd + bwd)", r"relu|threshold|pool|hardtanh|silu|sigmoid"),
    ("optimizer", r"adam|_foreach|lerp|addcdiv|sqrt"),
    ("bf16 casts, layout copies", r"^aten::(to|_to_copy|copy_|contiguous|clone)$"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--fp32", action="store_true", help="fp32 and contiguous")
    args = ap.parse_args()
    bf16, cl = not args.fp32, not args.fp32
    cfg = RunConfig.build({"data": "x", "model": args.model, "image_size": args.image_size,
                           "precision": "bf16" if bf16 else "fp32", "channels_last": cl})
    torch.manual_seed(0)
    module = ClassifierModule(create_model(args.model, 1, 1, image_size=args.image_size), cfg,
                              2, None, 1)
    fmt = torch.channels_last if cl else torch.contiguous_format
    module.model.to(memory_format=fmt)
    module.train()
    opt = make_optimizer(module.model.parameters(), cfg, torch.device("cpu"))
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size)
    x = x.contiguous(memory_format=fmt)
    y = torch.randint(0, 2, (args.batch_size,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = module.loss(module(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    fam: dict[str, float] = defaultdict(float)
    for e in events:
        name = next((f for f, rx in FAMILIES if re.search(rx, e.key)), "other")
        fam[name] += e.self_cpu_time_total
    per_step = total / args.steps / 1e6
    print(f"{args.model} {args.image_size} px b{args.batch_size}, "
          f"{'bf16 + channels_last' if bf16 else 'fp32 contiguous'}: "
          f"{per_step:.2f} s of CPU time per step ({torch.get_num_threads()} threads)")
    for name, t in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"  {name:36s} {100 * t / total:5.1f}%")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
