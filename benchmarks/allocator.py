"""What keeping freed memory (cxrlab.training.allocator) buys: the same steps with glibc's default
allocator (CXRLAB_MALLOC=system) and with cxrlab's, each in its own child process, interleaved.

    python benchmarks/allocator.py                      # ~4 min on 2 cores
    python benchmarks/allocator.py --models resnet18 --precisions fp32 --repeats 3

Per model and precision: training steps on random tensors (the model, AdamW, autocast and
channels-last as a run trains; efficientnet_lite0 with every stage training, the heaviest
case) and `predict_probs` at batch 64 (fp32, 224 px); for each, img/s, page faults per
step, and the system (kernel) CPU seconds that the faults cost. Best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import cpu_has_bf16, cpu_name  # noqa: E402

SIZES = {"efficientnet_lite0": 192, "resnet18": 224}
CHILD = """
import json, resource, sys, time, torch
import cxrlab.training.allocator as allocator
from cxrlab.models import create_model
from cxrlab.deploy.inference import predict_probs
name, size, bf16, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "bf16", int(sys.argv[4])
torch.manual_seed(0)
def usage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), r.ru_minflt, r.ru_stime
def rate(fn, n, images):
    fn()
    t, f, s = usage()
    for _ in range(n):
        fn()
    t1, f1, s1 = usage()
    return {"img_s": n * images / (t1 - t), "faults": (f1 - f) / n, "sys_s": (s1 - s) / n}
m = create_model(name, 2).to(memory_format=torch.channels_last).train()
opt = torch.optim.AdamW(m.parameters(), 1e-3)
x = torch.rand(32, 1, size, size).contiguous(memory_format=torch.channels_last)
y = torch.randint(0, 2, (32,)).float()
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = m(x)
    torch.nn.functional.binary_cross_entropy_with_logits(out.float()[:, 0], y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
step()
res = {"applied": allocator.keep_freed_memory(), "train": rate(step, steps, 32)}
m.eval()
xi = torch.randint(0, 256, (64, 1, 224, 224), dtype=torch.uint8)
res["infer"] = rate(lambda: predict_probs(m, xi, batch_size=64), 4, 64)
res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(res))
"""


def child(model: str, precision: str, steps: int, system: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CXRLAB_MALLOC"}
    if system:
        env["CXRLAB_MALLOC"] = "system"
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(SIZES[model]), precision,
                          str(steps)], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def best(a: dict | None, b: dict) -> dict:
    if a is None:
        return b
    return {k: (max(a[k], b[k], key=lambda r: r["img_s"]) if k in ("train", "infer") else b[k])
            for k in b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientnet_lite0,resnet18")
    ap.add_argument("--precisions", default=None,
                    help="fp32,bf16 (default: fp32, and bf16 where the CPU has it)")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per child")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds, best kept")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()
    precisions = (args.precisions or ("fp32,bf16" if cpu_has_bf16() else "fp32")).split(",")
    cases = [(m, p) for m in args.models.split(",") for p in precisions]
    results: dict = {}
    for _ in range(args.repeats):
        for m, p in cases:
            for system in (True, False):
                key = f"{m} {p} {'glibc default' if system else 'cxrlab'}"
                results[key] = best(results.get(key), child(m, p, args.steps, system))
    print(f"{cpu_name()}, bf16 in the CPU: {cpu_has_bf16()}, {os.cpu_count()} cores; "
          f"best of {args.repeats}, {args.steps} training steps of 32, inference 4 x 64 at 224 px")
    print(f"{'case':42s} {'train img/s':>11s} {'faults/step':>11s} {'sys s/step':>10s} "
          f"{'infer img/s':>11s} {'faults/batch':>12s} {'peak RSS MB':>11s}")
    for m, p in cases:
        for who in ("glibc default", "cxrlab"):
            r = results[f"{m} {p} {who}"]
            tr, inf = r["train"], r["infer"]
            print(f"{m + ' ' + p + ', ' + who:42s} {tr['img_s']:11.1f} {tr['faults']:11.0f} "
                  f"{tr['sys_s']:10.2f} {inf['img_s']:11.1f} {inf['faults']:12.0f} "
                  f"{r['rss_mb']:11.0f}")
        a, b = results[f"{m} {p} glibc default"], results[f"{m} {p} cxrlab"]
        print(f"{'  cxrlab / glibc default':42s} {b['train']['img_s'] / a['train']['img_s']:10.2f}x"
              f" {'':22s} {b['infer']['img_s'] / a['infer']['img_s']:10.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "bf16_cpu": cpu_has_bf16(),
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
