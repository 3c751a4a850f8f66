"""One tiny real ablation sweep, shared by the ablate, report and browser tests.

Built the hard way on purpose: sweep A is started as a `cxrlab ablate` process and killed
(SIGKILL) while its second run is being written, then resumed in-process; sweep B is the same
spec run as two shards. Tests then compare what they left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_kermany_folder


@dataclass
class Sweeps:
    spec_path: Path
    a: Path  # killed, then resumed
    b: Path  # two shards
    first_run: str
    killed_run: str
    first_mtime: int  # model.pt of the first run, before the resume
    resume: object  # SweepResult of the resume
    shards: list  # SweepResult per shard
    result_a: dict
    result_b: dict


def _state(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("state")
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Sweeps:
    from cxrlab.evaluation import ablation as ablate
    from cxrlab.training import sweep

    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        cache = str(root / "cache")
        mp.setenv("CXRLAB_CACHE", cache)
        data = make_kermany_folder(root / "data", 12, 12, size=32)
        test = make_kermany_folder(root / "test", 4, 4, size=32, seed=1)
        spec = {
            "name": "tiny", "design": "grid", "seeds": 2, "test": str(test),
            "base": {"data": str(data), "model": "cnn", "image_size": 32, "epochs": 1,
                     "batch_size": 8, "precision": "fp32"},
            "factors": {"dropout": [0.0, 0.5]},
        }
        spec_path = root / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        study = ablate.load_spec(spec_path)
        names = [r.name for r in ablate.plan(study)]

        # A: start a real sweep, kill it hard once the second run has begun, resume.
        a = root / "A"
        env = {**os.environ, "CXRLAB_CACHE": cache}
        proc = subprocess.Popen([sys.executable, "-m", "cxrlab.cli", "ablate", str(spec_path),
                                 "--out", str(a), "-q"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 500  # a loaded machine is slow
        while time.monotonic() < deadline and proc.poll() is None:
            if (a / "runs" / names[1]).exists():
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _state(a / "runs" / names[0]) == "complete", proc.stderr.read().decode()
        assert _state(a / "runs" / names[1]) != "complete"
        first_mtime = (a / "runs" / names[0] / "model.pt").stat().st_mtime_ns
        resume = sweep.run_sweep(study, a)
        result_a = ablate.collect(study, a)

        # B: the same study as two shards, then collected.
        b = root / "B"
        shards = [sweep.run_sweep(study, b, (i, 2)) for i in (1, 2)]
        result_b = ablate.collect(study, b)
        return Sweeps(spec_path, a, b, names[0], names[1], first_mtime, resume, shards,
                      result_a, result_b)
