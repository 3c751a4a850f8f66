"""Start-up cost of `import cxrlab.models` and `cxrlab models`: this checkout against an older
revision, alternating in one run, so that a busy machine slows both alike; prints the ratios.

    python benchmarks/startup.py --before 0779e24 --repeats 2

The older revision's src/cxrlab is unpacked (git archive) into a temporary folder and put first
on PYTHONPATH; each case is a fresh interpreter. Wall-clock seconds on a shared machine are
noise; the ratio of medians is the figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "import cxrlab.models": "import cxrlab.models",
    "cxrlab models": "import sys; sys.argv = ['cxrlab', 'models']; "
                     "from cxrlab.cli import main; main()",
    "cxrlab models resnet18": "import sys; sys.argv = ['cxrlab', 'models', 'resnet18']; "
                              "from cxrlab.cli import main; main()",
}


def unpack(rev: str, into: Path) -> Path:
    archive = into / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "archive", rev, "src/cxrlab"], cwd=ROOT, stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare against")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": unpack(args.before, Path(tmp)), "after": ROOT / "src"}
        times: dict[tuple[str, str], list[float]] = {(c, v): [] for c in CASES for v in trees}
        for rep in range(args.repeats):
            order = list(trees.items()) if rep % 2 == 0 else list(reversed(trees.items()))
            for case, code in CASES.items():
                for which, src in order:
                    env = dict(os.environ, PYTHONPATH=str(src), COLUMNS="100")
                    t0 = time.perf_counter()
                    subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                   capture_output=True)
                    times[(case, which)].append(time.perf_counter() - t0)
    for case in CASES:
        before = statistics.median(times[(case, "before")])
        after = statistics.median(times[(case, "after")])
        print(f"{case:24s} before/after {before / after:.2f}x")


if __name__ == "__main__":
    main()
