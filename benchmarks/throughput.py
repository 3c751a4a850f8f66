"""Does the model ever wait for data? Training and inference throughput, in ratios from one run.

    python benchmarks/throughput.py                       # the README table (~25 min, 2 cores)
    python benchmarks/throughput.py --quick               # smoke check (~2 min)
    python benchmarks/throughput.py --models resnet18 --steps 30 --repeats 5 --device cuda

For each model (cnn at 180 px batch 16, resnet18 at 224 px batch 32, the default
efficientnet_lite0 at 192 px batch 32 as its full epochs train it (the recipe's first 4 stages
frozen, the rest training; --frozen-stages 0: every layer), on
../shared/data/chest_xray/train) one child process measures, and this process prints one table:

(a) ceiling   training steps on random tensors already in memory: the same ClassifierModule,
              loss, AdamW, bf16 autocast and channels_last as a run; nothing but arithmetic.
(b) end to end  the real data path: cxrlab's cache -> ArrayDataset -> make_loader -> a
              Lightning Trainer built as `train.fit` builds it (bf16-mixed, deterministic,
              RichProgressBar rendering to /dev/null) -> ClassifierModule with augment
              "notebook" ("intake", the recipe's, for efficientnet_lite0) (uint8 batch ->
              float -> batched augmentation in on_after_batch_transfer). b/a is the share of
              time the model does not wait.
(c) epochs    `train.fit` itself for whole epochs (train + validation + checkpoint writes, from
              the start of one epoch to the start of the next): the first epoch with a cold
              cache (fresh CXRLAB_CACHE: decode + cache build inside it, and the Trainer's
              setup), the first epoch of a new run with the cache on disk, and a steady
              (second) epoch.
(d) naive     the usual recipe: PIL decode + per-sample notebook augmentation in a DataLoader
              with 2 workers, fp32, contiguous, in a plain loop; speedup = b / d.
(e) precision the ceiling in fp32 contiguous vs (a); where bf16 is used, also fp32 channels-last,
              so bf16's own share of the speedup shows (it differs a lot between models).
(k) Keras     with --keras JSON (benchmarks/keras_baseline.py, run on this machine under a
              Python with TensorFlow): (b) over the notebooks' Keras `fit` for cnn and resnet18.
(f) inference images/s at batch 64: `predict_probs` (fp32, what cxrlab uses) and the same under
              bf16 autocast for comparison, ONNX Runtime (exported here) in fp32 and in
              int8 as `cxrlab export --int8` quantizes for this CPU.
(g) memory    peak RSS of the model's process after (c) (the real training path, all 5216
              images in memory) and at the end; and of the naive DataLoader workers.

Repeated measurements are interleaved (a, b, a-fp32, naive, a, b, ...) and the best of
--repeats is kept, so background load on a shared machine hits all of them alike and the
ratios stay honest; the 1-minute load average is sampled throughout and shown in the caption.

--device cuda runs the same thing on a GPU: random tensors live on the GPU for (a); in (b)
Lightning uploads each uint8 batch once and the augmentation runs there; the naive loader
uploads its float batches; ONNX Runtime uses its CUDA provider when installed.

Never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

# name -> (image size, batch size, augmentation): the notebooks' models with the notebook's
# augmentation, and the default recipe's model as it trains (192 px, `intake`, the backbone
# training but for its frozen early stages: the full epochs that are most of its time;
# results before 2026-12-06 used `intensity`, the recipe's then)
MODELS = {"cnn": (180, 16, "notebook"), "resnet18": (224, 32, "notebook"),
          "efficientnet_lite0": (192, 32, "intake")}
# Timed steps per measurement: windows of >= ~10 s of the ceiling, since a 2-s window on a
# 2-vCPU VM is mostly scheduling noise (the CNN's 20 steps once gave b/a 0.78, then 0.91).
STEPS = {"cnn": 100, "resnet18": 20, "efficientnet_lite0": 20}
INFER_BATCH = 64
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray" / "train"


# ---------------------------------------------------------------------------------------
# helpers


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """AVX-512 bf16 in the CPU's flags (what the machine is, whatever torch decides)."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: kilobytes


class LoadSampler:
    """The 1-minute load average every few seconds, for the caption."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._t.start()

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> str:
        self._stop.set()
        s = self.samples
        return f"{min(s):.2f}-{max(s):.2f} (mean {sum(s) / len(s):.2f})"


def subset_folder(data: Path, n: int, into: Path) -> Path:
    """Every k-th image of each class (symlinks), ~n in all, class proportions kept."""
    files = {c.name: sorted(f for f in c.iterdir() if f.is_file())
             for c in sorted(p for p in data.iterdir() if p.is_dir())}
    step = max(1, math.ceil(sum(map(len, files.values())) / n))
    for cls, fs in files.items():
        (into / cls).mkdir(parents=True)
        for f in fs[::step]:
            (into / cls / f.name).symlink_to(f.resolve())
    return into


# ---------------------------------------------------------------------------------------
# the measurements (in the child process, one model)


class Bench:
    def __init__(self, args, name: str):
        import torch

        from cxrlab.config import RunConfig

        self.torch = torch
        self.args = args
        self.name = name
        self.size, self.bs, policy = MODELS[name]
        self.device = torch.device(args.device)
        self.cfg = RunConfig.build({"data": str(args.data), "model": name,
                                    "image_size": self.size, "batch_size": self.bs,
                                    "augment": policy, "epochs": 2,
                                    "freeze_backbone": False,
                                    **({} if args.frozen_stages is None
                                       else {"frozen_stages": args.frozen_stages})})
        from cxrlab.deploy.inference import use_bf16
        from cxrlab.models import create_model

        # as a run decides: per model (EfficientNet-Lite trains in fp32 on a CPU)
        self.bf16 = use_bf16(self.cfg.precision, create_model(name, num_classes=1, in_chans=1,
                                                              image_size=self.size))

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def new_module(self, weights=None):
        from cxrlab.models import create_model
        from cxrlab.training.loop import ClassifierModule

        torch = self.torch
        torch.manual_seed(0)
        model = create_model(self.name, num_classes=1, in_chans=1, image_size=self.size)
        return ClassifierModule(model, self.cfg, 2, weights, positive=1)

    # -- (c) whole epochs through train.fit --------------------------------------------------
    def epochs(self, data_dir: Path, tmp: Path) -> dict:
        """Cold: a fresh CXRLAB_CACHE, 2 epochs (the first holds the decode); warm: the cache
        on disk only (as for a new process), 1 epoch. prepare_data is inside the first epoch."""
        from cxrlab.data import cache
        from cxrlab.data.prepared import prepare_data
        from cxrlab.models import create_model
        from cxrlab.training.loop import ClassifierModule, fit

        # Epoch boundaries as wall-clock stamps, so every epoch is measured alike: from the
        # start of one epoch to the start of the next (or the end of training), checkpoint
        # writes included. (history.csv's seconds stop before the checkpoints.)
        stamps: list[float] = []
        start_hook, end_hook = ClassifierModule.on_train_epoch_start, ClassifierModule.on_train_end

        def on_start(module):
            stamps.append(time.perf_counter())
            start_hook(module)

        def on_end(module):
            stamps.append(time.perf_counter())
            end_hook(module)

        ClassifierModule.on_train_epoch_start, ClassifierModule.on_train_end = on_start, on_end
        out: dict = {}
        os.environ["CXRLAB_CACHE"] = str(tmp / "cache")
        for label, epochs in (("cold", 2), ("warm", 1)):
            cache._memory.clear()
            gc.collect()
            cfg = self.cfg.model_copy(update={"epochs": epochs, "data": str(data_dir)})
            t0 = time.perf_counter()
            data = prepare_data(cfg)
            out[f"{label}_event"] = cache.last.event
            out[f"{label}_load_s"] = time.perf_counter() - t0
            tx, ty, _ = data.subset("train")
            vx, vy, _ = data.subset("val")
            model = create_model(self.name, num_classes=1, in_chans=1, image_size=self.size)
            run = tmp / f"run-{label}"
            run.mkdir()
            stamps.clear()
            t_fit = time.perf_counter()
            res = fit(model, cfg, tx, ty, vx, vy, 2, 1, run, progress=False)
            # stamps: epoch 1 start, [epoch 2 start,] end of training
            out[f"{label}_first_s"] = out[f"{label}_load_s"] + stamps[1] - t_fit
            if label == "cold":
                out["steady_s"] = stamps[2] - stamps[1]
                out["epoch_train"], out["epoch_val"] = len(ty), len(vy)
            del data, model, res
        ClassifierModule.on_train_epoch_start, ClassifierModule.on_train_end = start_hook, end_hook
        cache._memory.clear()
        out["precision"] = "bf16-mixed" if self.bf16 else "32-true"
        out["frozen_stages"] = self.cfg.frozen_stages
        return out

    def load_full(self) -> dict:
        """All images through prepare_data (decoded now unless (c) already did): the arrays
        (b) trains on, and the paths the naive pipeline decodes itself."""
        from cxrlab.data import cache
        from cxrlab.data.prepared import prepare_data

        t0 = time.perf_counter()
        data = prepare_data(self.cfg)
        out = {"full_event": cache.last.event, "full_load_s": time.perf_counter() - t0}
        tx, ty, _ = data.subset("train")
        self.train_xy = (tx, ty)
        self.paths_labels = ([r.path for r, s in zip(data.records, data.splits, strict=True)
                              if s == "train"], ty)
        out["n_images"], out["n_train"] = len(data.records), len(ty)
        return out

    # -- (a)/(e) ceiling -------------------------------------------------------------------
    def ceiling(self, bf16: bool, channels_last: bool):
        from cxrlab.training.optim import make_optimizer

        torch = self.torch
        module = self.new_module().to(self.device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        module.model.to(memory_format=fmt)
        opt = make_optimizer(module.model.parameters(), self.cfg, self.device)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(self.bs, 1, self.size, self.size, generator=g).to(self.device)
        x = x.contiguous(memory_format=fmt)
        y = torch.randint(0, 2, (self.bs,), generator=g).to(self.device)
        module.train()

        def run(steps: int) -> float:
            t0 = 0.0
            for i in range(steps + 1):  # the first step is warm-up, not timed
                if i == 1:
                    self.sync()
                    t0 = time.perf_counter()
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = module.loss(module(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.sync()
            return steps * self.bs / (time.perf_counter() - t0)

        return run

    # -- (b) end to end through Lightning ---------------------------------------------------
    def end_to_end(self):
        import lightning as L
        from lightning.pytorch.callbacks import Callback, RichProgressBar

        from cxrlab.training.loop import ArrayDataset, class_weights, make_loader, quiet_lightning

        quiet_lightning()
        tx, ty = self.train_xy
        module = self.new_module(class_weights(np.asarray(ty), 2))
        if self.cfg.channels_last:
            module.model.to(memory_format=self.torch.channels_last)
        loader = make_loader(ArrayDataset(tx, ty), self.bs, train=True, seed=self.cfg.seed)
        bench = self

        class StepTimes(Callback):
            def __init__(self):
                self.t: list[float] = []

            def on_train_batch_end(self, *a, **k):
                bench.sync()
                self.t.append(time.perf_counter())

        devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)

        def run(steps: int) -> float:
            timer = StepTimes()
            bar = RichProgressBar(leave=True, console_kwargs={"file": devnull,
                                                              "force_terminal": True})
            trainer = L.Trainer(
                max_epochs=1, limit_train_batches=steps + 1, limit_val_batches=0,
                accelerator=self.device.type, devices=1,
                precision="bf16-mixed" if self.bf16 else "32-true",
                deterministic=self.cfg.deterministic, callbacks=[timer, bar], logger=False,
                enable_checkpointing=False, enable_model_summary=False,
                num_sanity_val_steps=0, default_root_dir=tempfile.gettempdir(),
            )
            trainer.fit(module, loader)
            done = len(timer.t) - 1  # fewer than asked when the epoch is short
            return done * self.bs / (timer.t[-1] - timer.t[0])  # first step = warm-up

        return run

    # -- (d) naive ---------------------------------------------------------------------------
    def naive(self):
        torch = self.torch
        from torch.utils.data import DataLoader

        paths, labels = self.paths_labels
        module = self.new_module().to(self.device)  # fp32, contiguous
        # torch's default AdamW (a per-parameter loop on CPU): what the usual recipe runs
        opt = torch.optim.AdamW(module.model.parameters(), lr=self.cfg.lr,
                                weight_decay=self.cfg.weight_decay)
        ds = NaiveDataset(paths, labels, self.size)
        module.train()

        def batches():
            while True:  # epochs back to back, as long as asked
                yield from DataLoader(ds, batch_size=self.bs, shuffle=True, num_workers=2,
                                      drop_last=True)

        def run(steps: int) -> float:
            it = batches()
            t0 = 0.0
            for i in range(steps + 2):  # two warm-up steps: worker start, first batches
                if i == 2:
                    self.sync()
                    t0 = time.perf_counter()
                x, y = next(it)
                x, y = x.to(self.device), y.to(self.device)
                loss = module.loss(module(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            self.sync()
            rate = steps * self.bs / (time.perf_counter() - t0)
            it.close()  # stops the workers before the next measurement
            return rate

        return run

    # -- (f) inference -----------------------------------------------------------------------
    def inference(self) -> dict:
        torch = self.torch
        from cxrlab.deploy.inference import predict_probs

        module = self.new_module().to(self.device).eval()
        model = module.model
        x = torch.randint(0, 256, (INFER_BATCH, 1, self.size, self.size), dtype=torch.uint8)
        xn = x.numpy()
        graph = onnx_graph(model, self.size, self.device)
        sess = ort_session(graph, self.device)
        sess8 = ort_session(int8_graph(graph, xn), self.device)

        def torch_run(bf16: bool):
            # cxrlab predicts in fp32 only (predict_probs); bf16 is measured for comparison
            # by autocasting around it.
            def run(reps: int) -> float:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    predict_probs(model, x, batch_size=INFER_BATCH)  # warm-up
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        predict_probs(model, x, batch_size=INFER_BATCH)
                return reps * INFER_BATCH / (time.perf_counter() - t0)

            return run

        def ort_run(session):
            def run(reps: int) -> float:
                session.run(None, {"x": xn.astype(np.float32) / 255.0})
                t0 = time.perf_counter()
                for _ in range(reps):
                    session.run(None, {"x": xn.astype(np.float32) / 255.0})
                return reps * INFER_BATCH / (time.perf_counter() - t0)

            return run

        runs = {"infer_fp32": torch_run(False), "infer_bf16": torch_run(True),
                "infer_onnx": ort_run(sess), "infer_onnx_int8": ort_run(sess8)}
        reps = 1 if self.args.quick else 2
        return interleave(runs, reps, self.args.repeats)


class NaiveDataset:
    """What most PyTorch tutorials do: open the file with PIL, resize, then transform the one
    image in a worker. The augmentation is the notebook policy (Keras ImageDataGenerator
    semantics, as in cxrlab.data.augment) drawn and applied image by image."""

    def __init__(self, paths, labels, size: int):
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        import torch
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            im = im.convert("L")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.Resampling.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]
        return notebook_augment_one(x, np.random.default_rng(torch.initial_seed() % 2**32 + i)), \
            torch.tensor(int(self.labels[i]))


def notebook_params(r) -> list[float]:
    """The 7 draws of the notebook policy for one image, from U[0, 1) numbers r[0..6]."""
    return [(r[0] * 2 - 1) * 30, (r[1] * 2 - 1) * 0.2, (r[2] * 2 - 1) * 0.2,
            (r[3] * 2 - 1) * 0.2, 1 + (r[4] * 2 - 1) * 0.2, 1 + (r[5] * 2 - 1) * 0.2,
            -1.0 if r[6] < 0.5 else 1.0]


def notebook_augment_one(x, rng_or_params):
    """One (C, H, W) image: rotation, shift, shear (degrees), per-axis zoom, flip; bilinear,
    border ("nearest") fill -- the same map cxrlab's batched policy builds, for one image."""
    import torch
    import torch.nn.functional as F

    p = (notebook_params(rng_or_params.random(7)) if hasattr(rng_or_params, "random")
         else rng_or_params)
    rot, sx, sy, shear, zx, zy, flip = p
    _, h, w = x.shape
    t, s = math.radians(rot), math.radians(shear)
    m = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    m = m @ np.array([[1, 0, sx * w], [0, 1, sy * h], [0, 0, 1]])
    m = m @ np.array([[1, -math.sin(s), 0], [0, math.cos(s), 0], [0, 0, 1]])
    m = m @ np.diag([zx, zy, 1.0]) @ np.diag([flip, 1.0, 1.0])
    S = np.diag([w / 2, h / 2, 1.0])
    m = np.linalg.inv(S) @ m @ S
    theta = torch.tensor(m[:2], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, 1, h, w], align_corners=False)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border",
                         align_corners=False)[0]


def onnx_graph(model, size: int, device) -> bytes:
    """Export with torch.onnx.export (the TorchScript exporter: no onnxscript needed)."""
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.cpu().eval(), (torch.rand(2, 1, size, size),), buf,
                          dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    model.to(device)
    return buf.getvalue()


def ort_session(graph: bytes, device):
    """An ONNX Runtime session with as many threads as this process may use."""
    import onnxruntime as ort

    from cxrlab.data.cache import n_workers

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = n_workers()
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(graph, opts, providers=providers)


def int8_graph(graph: bytes, calibration: np.ndarray) -> bytes:
    """The graph quantized as `cxrlab export --int8` does it, for this CPU (7-bit weights
    without VNNI); ranges from the benchmark's own images (speed does not depend on them)."""
    import onnx

    from cxrlab.cpu import cpu_has_vnni
    from cxrlab.deploy.quantize import quantize_graph

    batches = [{"x": calibration[i : i + 32].astype(np.float32) / 255.0}
               for i in range(0, len(calibration), 32)]
    return quantize_graph(onnx.load_from_string(graph), batches,
                          reduce_range=not cpu_has_vnni()).SerializeToString()


def interleave(runs: dict, steps: int, repeats: int) -> dict:
    """Round-robin over the measurements, best of `repeats` each (rates: higher is better)."""
    best = {k: 0.0 for k in runs}
    for r in range(repeats):
        for k, run in runs.items():
            v = run(steps)
            best[k] = max(best[k], v)
            print(f"  round {r + 1}/{repeats} {k}: {v:.1f} img/s  "
                  f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    return best


def measure_one(args) -> dict:
    import torch

    for noise in (".*LeafSpec.*", ".*no `val_dataloader`.*"):  # Lightning's, not ours
        warnings.filterwarnings("ignore", message=noise)

    from cxrlab.data.cache import n_workers

    torch.set_num_threads(n_workers())
    b = Bench(args, args.one)
    res: dict = {"model": args.one, "size": b.size, "batch": b.bs, "steps": args.steps}
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-") as tmp:
        tmp = Path(tmp)
        epoch_data = args.data
        if args.epoch_images:
            epoch_data = subset_folder(args.data, args.epoch_images, tmp / "subset")
        say(f"{args.one}: (c) epochs through train.fit on {epoch_data}, cold then warm cache")
        res.update(b.epochs(epoch_data, tmp))
        say(f"{args.one}: loading {args.data} (cache in {tmp / 'cache'})")
        res.update(b.load_full())
        e2e = b.end_to_end()
        e2e(args.steps)  # alone first: the real training path's peak memory, all images loaded
        res["rss_train_mb"] = peak_rss_mb()
        say(f"{args.one}: (a) (b) (d) (e) interleaved, {args.steps} steps x {args.repeats}")
        runs = {"a": b.ceiling(b.bf16, b.cfg.channels_last), "b": e2e,
                "a_fp32": b.ceiling(False, False), "naive": b.naive()}
        if b.bf16:  # what bf16 adds on top of channels-last
            runs["a_fp32_cl"] = b.ceiling(False, True)
        res.update(interleave(runs, args.steps, args.repeats))
    say(f"{args.one}: (f) inference, batch {INFER_BATCH}")
    res.update(b.inference())
    res["rss_end_mb"] = peak_rss_mb()
    res["rss_workers_mb"] = peak_rss_mb(resource.RUSAGE_CHILDREN)
    say(f"{args.one}: done")
    return res


def read_keras(path: Path) -> dict:
    """keras_baseline.py's figures, refused when they come from another kind of CPU: a ratio
    across machines is not a measurement."""
    try:
        k = json.loads(path.read_text())
        cpu, bf16, results = k["cpu"], k["bf16_cpu"], k["results"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"throughput.py: error: --keras {path}: not keras_baseline.py's JSON ({e})")
    here = cpu_has_bf16()
    if cpu != cpu_name() or bf16 != here:
        sys.exit(f"throughput.py: error: --keras {path}: measured on {cpu} "
                 f"({'with' if bf16 else 'without'} bf16), this is {cpu_name()} "
                 f"({'with' if here else 'without'} bf16)")
    return results


def say(msg: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# the table


def table(results: list[dict], args, load: str, started: datetime, minutes: float):
    from rich.table import Table

    from cxrlab.deploy.inference import use_bf16

    bf16 = "bf16" if use_bf16("auto") else "no bf16 (fp32)"
    t = Table(title=f"cxrlab throughput - {args.data_label}, {args.device}, {cpu_name()}, "
                    f"{bf16}, {os.cpu_count()} cores, {started:%Y-%m-%d %H:%M} UTC",
              caption=f"load average (1 min) during the run: {load}; {minutes:.0f} min; "
                      f"best of {args.repeats} x ("
                      + ", ".join(f"{r['model']} {r['steps']}" for r in results)
                      + ") steps, interleaved"
                      + ("; --quick: NOT representative" if args.quick else ""))
    t.add_column("measure")
    for r in results:
        t.add_column(f"{r['model']} {r['size']} px b{r['batch']}", justify="right")
    t.add_column("target", justify="right")

    def row(label, fmt, target=""):
        t.add_row(label, *[fmt(r) for r in results], target)

    row("(a) ceiling: random tensors, img/s",
        lambda r: f"{r['a']:.1f} ({r['a'] / r['batch']:.2f} steps/s)")
    row("(b) end to end, real data path + augment, img/s", lambda r: f"{r['b']:.1f}")
    row("    b / a", lambda r: f"{r['b'] / r['a']:.2f}", ">= 0.90")
    row("(c) steady epoch (train + val + checkpoints), s",
        lambda r: f"{r['steady_s']:.1f} ({r['epoch_train']}+{r['epoch_val']} img)")
    row("    first epoch, cold cache, s (x steady)",
        lambda r: f"{r['cold_first_s']:.1f} ({r['cold_first_s'] / r['steady_s']:.2f}x)", "<= 1.5x")
    row("      of which decode + cache build, s", lambda r: f"{r['cold_load_s']:.1f}")
    row("    first epoch, warm cache, s (x steady)",
        lambda r: f"{r['warm_first_s']:.1f} ({r['warm_first_s'] / r['steady_s']:.2f}x)",
        "<= 1.05x")
    row("      of which loading the cache, s", lambda r: f"{r['warm_load_s']:.2f}")
    row("    prepare_data, all images, s (how served)",
        lambda r: f"{r['full_load_s']:.1f} ({r['full_event']}, {r['n_images']} img)")
    row("(d) naive: PIL + per-sample aug, 2 workers, fp32, img/s", lambda r: f"{r['naive']:.1f}")
    row("    speedup b / d", lambda r: f"{r['b'] / r['naive']:.2f}x", ">= 2.5x (resnet18)")
    keras = args.keras_figures

    def vs_keras(r) -> str:
        k = keras.get(r["model"])
        return f"{r['b'] / k['img_s']:.2f}x ({k['img_s']:.1f})" if k else "–"

    row("(k) vs notebooks' Keras fit (its img/s), b / keras", vs_keras, ">= 2.5x")
    row("(e) ceiling fp32 contiguous, img/s", lambda r: f"{r['a_fp32']:.1f}")
    row("    speedup a / a_fp32 (channels_last, + bf16 if used)",
        lambda r: f"{r['a'] / r['a_fp32']:.2f}x")
    if any("a_fp32_cl" in r for r in results):
        row("    ceiling fp32 channels-last, img/s; bf16's share a / it",
            lambda r: (f"{r['a_fp32_cl']:.1f}; {r['a'] / r['a_fp32_cl']:.2f}x"
                       if "a_fp32_cl" in r else "–"))
    row(f"(f) inference b{INFER_BATCH}: torch fp32, img/s", lambda r: f"{r['infer_fp32']:.1f}")
    row("    torch bf16, img/s", lambda r: f"{r['infer_bf16']:.1f}",
        ">= 80 (resnet18)")
    row("    ONNX Runtime fp32, img/s", lambda r: f"{r['infer_onnx']:.1f}")
    row("    ONNX Runtime int8 (export --int8), img/s",
        lambda r: f"{r['infer_onnx_int8']:.1f}" if "infer_onnx_int8" in r else "–",
        ">= 60 (resnet18, no bf16)")
    row("(g) peak RSS, training all images, MB", lambda r: f"{r['rss_train_mb']:.0f}", "<= 3000")
    row("    peak RSS at the end / naive worker, MB",
        lambda r: f"{r['rss_end_mb']:.0f} / {r['rss_workers_mb']:.0f}")
    row("precision in (a) (b) (c)", lambda r: r["precision"])
    row("frozen stages in (a) (b) (c)", lambda r: str(r.get("frozen_stages", 0)))
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of class folders")
    ap.add_argument("--models", default="cnn,resnet18,efficientnet_lite0",
                    help="comma-separated: cnn,resnet18,efficientnet_lite0")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds, best kept")
    ap.add_argument("--images", type=int, default=0, help="use only ~N images (smoke checks)")
    ap.add_argument("--epoch-images", type=int, default=0,
                    help="(c) on ~N images (every k-th per class); 0 = all. The ratios hardly "
                         "change (decode and epoch both scale with N); fixed costs weigh more")
    ap.add_argument("--quick", action="store_true", help="few steps, ~200 images: smoke check")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--frozen-stages", type=int, default=None,
                    help="as `cxrlab train`'s; left out: the recipe's (efficientnet_lite0 4)")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--keras", type=Path,
                    help="keras_baseline.py's JSON from this machine: the (k) row")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: measure this model
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.steps = args.steps or 2
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.quick and not args.images:
        args.images = 200

    if args.one:
        args.steps = args.steps or STEPS[args.one]
        res = measure_one(args)
        args.result.write_text(json.dumps(res))
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"throughput.py: error: --models {unknown[0]}: choose from {', '.join(MODELS)}")
    if not args.data.is_dir():
        sys.exit(f"throughput.py: error: --data {args.data}: not a folder")
    args.keras_figures = read_keras(args.keras) if args.keras else {}
    started = datetime.now(UTC)
    load = LoadSampler()
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="cxrlab-bench-") as tmp:
        data = args.data.resolve()
        args.data_label = str(args.data)
        if args.images:
            data = subset_folder(data, args.images, Path(tmp) / "subset")
            args.data_label += f" (~{args.images} images)"
        for m in models:
            out = Path(tmp) / f"{m}.json"
            cmd = [sys.executable, __file__, "--one", m, "--result", str(out), "--data",
                   str(data), "--steps", str(args.steps or STEPS[m]),
                   "--repeats", str(args.repeats),
                   "--device", args.device, "--epoch-images", str(args.epoch_images)]
            cmd += ["--quick"] if args.quick else []
            if args.frozen_stages is not None:
                cmd += ["--frozen-stages", str(args.frozen_stages)]
            subprocess.run(cmd, check=True)
            results.append(json.loads(out.read_text()))
    from rich.console import Console

    Console(width=160).print(table(results, args, load.stop(), started,
                                   (time.perf_counter() - t0) / 60))
    if args.json:
        from cxrlab.deploy.inference import use_bf16

        args.json.write_text(json.dumps({"results": results, "load": load.samples,
                                         "started": started.isoformat(), "cpu": cpu_name(),
                                         "bf16": use_bf16("auto"), "keras": args.keras_figures},
                                        indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
