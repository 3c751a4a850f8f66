"""The ablation sweep: train (and test) the runs an ablation spec plans
(cxrlab.evaluation.ablation), this shard's share, resuming where a killed sweep stopped."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cxrlab.data import cache
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.ablation import (
    TEST_FILE,
    AblationSpec,
    PlannedRun,
    claim_out_dir,
    plan,
    shard_runs,
)
from cxrlab.run import move_aside, run_state, write_json
from cxrlab.site.assess import evaluate_run
from cxrlab.training.lifecycle import train_run


@dataclass
class SweepEvent:
    """What happened to one run: skipped (complete), moved (broken, set aside), trained,
    tested (evaluated on the spec's test data)."""

    kind: str
    run: PlannedRun
    index: int  # 1-based within this shard
    total: int
    detail: str = ""


@dataclass
class SweepResult:
    out: Path
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cache_events: list[str] = field(default_factory=list)  # how each run got its images


def run_sweep(spec: AblationSpec, out: Path, shard: tuple[int, int] | None = None,
              progress: bool = False,
              on_event: Callable[[SweepEvent], None] | None = None) -> SweepResult:
    """Train this shard's runs that are not complete; evaluate each on `test` if given."""
    out = Path(out)
    if spec.test is not None and not Path(spec.test).exists():
        raise CxrlabError(f"test: {spec.test}: no such file or folder")
    claim_out_dir(spec, out)
    runs = shard_runs(plan(spec), shard)
    result = SweepResult(out)
    t0 = time.perf_counter()
    emit = on_event or (lambda e: None)
    for k, r in enumerate(runs, 1):
        run_dir = out / "runs" / r.name
        state = run_state(run_dir, r.config)
        if state == "broken":
            moved = move_aside(run_dir)
            result.moved.append(moved.name)
            emit(SweepEvent("moved", r, k, len(runs), moved.name))
        if state == "complete":
            result.skipped.append(r.name)
            emit(SweepEvent("skipped", r, k, len(runs)))
        else:
            emit(SweepEvent("training", r, k, len(runs)))
            res = train_run(r.config, run_dir, progress=progress)
            result.cache_events.append(cache.last.event)
            result.trained.append(r.name)
            emit(SweepEvent("trained", r, k, len(runs),
                            f"AUC {_fmt(res.metrics.get('roc_auc'))}, acc "
                            f"{_fmt(res.metrics.get('accuracy'))}, {res.epochs} epochs, "
                            f"{res.seconds:.0f} s"))
        if spec.test is not None and not (run_dir / TEST_FILE).is_file():
            m = evaluate_run(run_dir, Path(spec.test))
            write_json(run_dir / TEST_FILE, m)
            emit(SweepEvent("tested", r, k, len(runs), f"test AUC {_fmt(m.get('roc_auc'))}"))
    result.seconds = time.perf_counter() - t0
    return result


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"
