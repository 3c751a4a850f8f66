"""Load test for `cxrlab serve`: concurrent clients on loopback, with and without batching.

    python benchmarks/serve_load.py                      # untrained resnet18 @ 224 px, 60 s
    python benchmarks/serve_load.py --run runs/r18 --seconds 20 --clients 8

Starts `cxrlab serve` in a subprocess (its own process, so the clients do not share its GIL
and its memory is measured alone), warms it up, then `--clients` threads each POST a real
chest X-ray in a loop for `--seconds`. Prints requests/s, p50/p99 latency, errors (must be 0)
and the server's RSS after the run vs after warm-up (must grow by at most 10%), once with
one-request-at-a-time inference and once with the micro-batcher (`--batch-wait-ms`). The
ratio between the two modes is the number to read; absolute rates depend on the machine and
its load (printed).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

import httpx

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray" / "train"


def untrained_run(out: Path, model: str = "resnet18", size: int = 224) -> Path:
    """A complete run directory holding freshly initialised weights (speed does not care)."""
    import torch

    from cxrlab.config import RunConfig
    from cxrlab.models import create_model
    from cxrlab.run import RunInfo, save_info

    out.mkdir(parents=True)
    RunConfig(data="none", model=model, image_size=size).save(out / "config.yaml")
    torch.manual_seed(0)
    net = create_model(model, num_classes=1, in_chans=1, image_size=size)
    torch.save(net.state_dict(), out / "model.pt")
    (out / "threshold").write_text("0.5\n")
    save_info(out, RunInfo(classes=["NORMAL", "PNEUMONIA"], positive=1, in_chans=1,
                           state="complete"))
    return out


def xray() -> Path:
    if SHARED.is_dir():
        return sorted((SHARED / "PNEUMONIA").glob("*.jpeg"))[0]
    demo = Path(str(resources.files("cxrlab") / "demo_data" / "test" / "PNEUMONIA"))
    return sorted(demo.glob("*.jpeg"))[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(run: Path, port: int, batch_wait_ms: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cxrlab.cli", "serve", str(run), "--port", str(port),
           "--batch-wait-ms", str(batch_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start in 120 s")


def load(url: str, body: bytes, name: str, clients: int, seconds: float) -> dict:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client() -> None:
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                try:
                    r = c.post(url, files={"file": (name, body, "image/jpeg")})
                    ok = r.status_code == 200 and "class" in r.json()
                    why = f"HTTP {r.status_code}"
                except httpx.HTTPError as e:
                    ok, why = False, type(e).__name__
                dt = time.perf_counter() - t0
                with lock:
                    (lat.append(dt) if ok else errors.append(why))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests": len(lat), "errors": len(errors), "rps": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "first_errors": errors[:3],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, help="a run directory (default: untrained resnet18)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0,
                    help="micro-batcher wait for the batched mode")
    ap.add_argument("--modes", default="single,batched", help="single, batched or both")
    args = ap.parse_args()

    image = xray()
    body = image.read_bytes()
    with tempfile.TemporaryDirectory(prefix="cxrlab-load-") as tmp:
        run = args.run or untrained_run(Path(tmp) / "run")
        print(f"run {run}, image {image.name} ({len(body) / 1024:.0f} kB), "
              f"{args.clients} clients x {args.seconds:g} s, {os.cpu_count()} CPUs")
        print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
              f"{os.getloadavg()[2]:.2f} (1/5/15 min)")
        rows = []
        for mode in args.modes.split(","):
            wait = args.batch_wait_ms if mode == "batched" else 0.0
            port = free_port()
            proc = start_server(run, port, wait)
            url = f"http://127.0.0.1:{port}/predict"
            try:
                rss_start = rss_mb(proc.pid)
                load(url, body, image.name, args.clients, min(5.0, args.seconds))  # warm-up
                rss_before = rss_mb(proc.pid)
                res = load(url, body, image.name, args.clients, args.seconds)
                rss_after = rss_mb(proc.pid)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            res.update(mode=f"{mode} ({wait:g} ms)" if wait else mode, rss_start=rss_start,
                       rss_before=rss_before, rss_after=rss_after,
                       growth=rss_after / rss_before - 1)
            rows.append(res)
            print(f"  {res['mode']}: done, load {os.getloadavg()[0]:.2f}", flush=True)
        print()
        print("| mode | requests | req/s | p50 ms | p99 ms | errors | RSS start / warm / after "
              "(MB) | growth |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
        for r in rows:
            print(f"| {r['mode']} | {r['requests']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | "
                  f"{r['p99_ms']:.0f} | {r['errors']} | {r['rss_start']:.0f} / "
                  f"{r['rss_before']:.0f} / {r['rss_after']:.0f} | {100 * r['growth']:+.1f}% |")
        if len(rows) == 2:
            print(f"\nbatched / single throughput: {rows[1]['rps'] / rows[0]['rps']:.2f}x")
        print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        bad = [r for r in rows if r["errors"] or r["growth"] > 0.10]
        for r in bad:
            print(f"FAIL {r['mode']}: {r['errors']} errors {r['first_errors']}, "
                  f"RSS growth {100 * r['growth']:+.1f}%")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
