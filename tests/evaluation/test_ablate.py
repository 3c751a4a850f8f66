"""cxrlab ablate: spec validation, expansion, paired statistics, resume, shards, the CLI."""

from __future__ import annotations

import json
import math
import sys

import pytest
import yaml

from cxrlab.cli import main
from cxrlab.errors import CxrlabError
from cxrlab.evaluation import ablation as ablate
from cxrlab.evaluation.stats import paired_difference, t_interval, verdict
from cxrlab.training import sweep

T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
BASE = {"data": "somewhere", "model": "cnn", "image_size": 32}


def spec(**kw) -> dict:
    return {"base": dict(BASE), "factors": {"dropout": [0.0, 0.5]}, **kw}


# -- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, needle", [
    (spec(factors={"dropout": [0.0]}), "factors.dropout: needs at least 2 levels"),
    (spec(factors={"dropuot": [0.0, 0.5]}), "factors.dropuot: not a configuration key"),
    (spec(factors={"seed": [0, 1]}), "factors.seed: seeds are given by `seeds:`"),
    (spec(factors={}), "factors: give at least one factor"),
    (spec(factors={"augment": ["none", "none"]}), "factors.augment: levels repeat"),
    (spec(factors={"dropout": [0.0, 1.5]}), "factors.dropout: level 1.5"),
    (spec(factors={"augment": ["none", "sideways"]}), "factors.augment: level 'sideways'"),
    (spec(seeds=0), "seeds: must be at least 1"),
    (spec(seeds=[1, 1]), "seeds: must be distinct"),
    (spec(design="random"), "design:"),
    (spec(sedes=3), "sedes:"),
    ({"factors": {"dropout": [0.0, 0.5]}}, "base:"),
    (spec(base={**BASE, "epochs": 0}), "base: epochs:"),
    (spec(base={**BASE, "seed": 4}), "base.seed:"),
    ([1, 2], "expected a mapping"),
])
def test_spec_errors_name_the_key(raw, needle):
    with pytest.raises(CxrlabError) as e:
        ablate.parse_spec(raw, source="s.yaml")
    msg = str(e.value)
    assert msg.startswith("s.yaml: ") and needle in msg and "\n" not in msg, msg


def test_cli_bad_spec_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec(factors={"dropout": [0.5]})))
    monkeypatch.setattr(sys, "argv", ["cxrlab", "ablate", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert err.startswith("cxrlab: error: ") and "factors.dropout" in err
    assert not (tmp_path / "o").exists()  # nothing half-written


# -- expansion --------------------------------------------------------------------------------


def test_grid_is_every_combination_in_order():
    s = ablate.parse_spec(spec(factors={"dropout": [0.0, 0.5], "augment": ["none", "flip",
                                                                           "notebook"]}))
    vs = ablate.expand(s)
    assert [v.name for v in vs] == [
        "dropout-0.0+augment-none", "dropout-0.0+augment-flip", "dropout-0.0+augment-notebook",
        "dropout-0.5+augment-none", "dropout-0.5+augment-flip", "dropout-0.5+augment-notebook"]
    assert vs[4].levels == {"dropout": 0.5, "augment": "flip"}
    runs = ablate.plan(s)
    assert len(runs) == 18 and [r.seed for r in runs[:7]] == [0] * 6 + [1]  # seed-major
    assert runs[7].config.dropout == 0.0 and runs[7].config.augment == "flip"
    assert runs[7].name == "dropout-0.0+augment-flip__seed1"


def test_one_at_a_time_varies_each_factor_from_the_base():
    s = ablate.parse_spec(spec(design="one-at-a-time", seeds=[7, 11],
                               base={**BASE, "augment": "flip", "batchnorm": True},
                               factors={"augment": ["none", "flip", "notebook"],
                                        "batchnorm": [True, False], "dropout": [None, 0.3]}))
    vs = {v.name: v.levels for v in ablate.expand(s)}
    # reference levels: the base's own value where listed (augment flip, batchnorm true),
    # else the first level (dropout None = the model's default)
    assert vs == {
        "base": {"augment": "flip", "batchnorm": True, "dropout": None},
        "augment-none": {"augment": "none", "batchnorm": True, "dropout": None},
        "augment-notebook": {"augment": "notebook", "batchnorm": True, "dropout": None},
        "batchnorm-false": {"augment": "flip", "batchnorm": False, "dropout": None},
        "dropout-0.3": {"augment": "flip", "batchnorm": True, "dropout": 0.3},
    }
    assert [r.seed for r in ablate.plan(s)][:6] == [7] * 5 + [11]


def test_shards_partition_the_runs():
    runs = ablate.plan(ablate.parse_spec(spec(seeds=5)))
    parts = [ablate.shard_runs(runs, (i, 3)) for i in (1, 2, 3)]
    names = sorted(r.name for p in parts for r in p)
    assert names == sorted(r.name for r in runs) and len(set(names)) == 10
    assert [r.name for r in parts[1]] == [runs[1].name, runs[4].name, runs[7].name]
    for bad in ("0/3", "4/3", "a/b", "3"):
        with pytest.raises(CxrlabError, match="--shard"):
            ablate.parse_shard(bad)


def _slurm_array_ids(spec: str) -> list[int]:
    """Task ids of `#SBATCH --array=SPEC`: 1-8, 0-15:4, 1,3,5-7, each with an optional %N."""
    ids: list[int] = []
    for part in spec.split("%")[0].split(","):
        lo, _, rest = part.partition("-")
        hi, _, step = rest.partition(":")
        ids += range(int(lo), int(hi or lo) + 1, int(step or 1))
    return ids


def test_docs_slurm_array_runs_every_shard_once():
    # The documented job array (README, now docs/cluster.md) was --array=0-7 with --shard
    # $SLURM_ARRAY_TASK_ID/...: shards count from 1, so task 0 failed, shard 8 never ran and the
    # afterok collect never started.
    import re
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "docs" / "cluster.md").read_text()
    block = next(b for b in readme.split("```bash")[1:] if "--shard" in b.split("```")[0])
    block = block.split("```")[0]
    ids = _slurm_array_ids(re.search(r"#SBATCH --array=(\S+)", block).group(1))
    arg = re.search(r"--shard\s+(\S+)", block).group(1)
    shards = []
    for i in ids:  # what bash makes of the argument in each task, as SLURM sets it up
        env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": str(i),
               "SLURM_ARRAY_TASK_COUNT": str(len(ids)), "SLURM_ARRAY_TASK_MIN": str(min(ids)),
               "SLURM_ARRAY_TASK_MAX": str(max(ids))}
        text = subprocess.run(["bash", "-c", f"printf %s {arg}"], env=env, check=True,
                              capture_output=True, text=True).stdout
        shards.append(ablate.parse_shard(text))  # a task that fails here fails the array
    for n_runs in range(40):
        runs = list(range(n_runs))
        done = [r for shard in shards for r in ablate.shard_runs(runs, shard)]
        assert sorted(done) == runs, (arg, shards)


# -- statistics against hand-computed values --------------------------------------------------


def test_t_interval_by_hand():
    e = t_interval([0.80, 0.84, 0.88])
    half = T_975_2 * 0.04 / math.sqrt(3)
    assert e.n == 3 and e.mean == pytest.approx(0.84) and e.std == pytest.approx(0.04)
    assert (e.ci_low, e.ci_high) == (pytest.approx(0.84 - half), pytest.approx(0.84 + half))
    assert t_interval([0.5]).ci_low is None and t_interval([0.5]).mean == 0.5
    assert t_interval([None, float("nan")]).n == 0
    assert t_interval([0.9, 0.99], bounds=(0, 1)).ci_high == 1  # clipped to what a rate can be


def test_paired_difference_by_hand():
    est, diffs = paired_difference({0: 0.90, 1: 0.80, 2: 0.85, 3: 0.7},
                                   {0: 0.85, 1: 0.78, 2: 0.80, 4: 0.1})  # pairs on seeds 0-2
    assert diffs == pytest.approx({0: 0.05, 1: 0.02, 2: 0.05})
    sd = math.sqrt(((0.01) ** 2 + (0.02) ** 2 + (0.01) ** 2) / 2)
    assert est.mean == pytest.approx(0.04) and est.std == pytest.approx(sd)
    assert est.ci_low == pytest.approx(0.04 - T_975_2 * sd / math.sqrt(3))
    assert verdict(est) == "within noise"  # the interval is [-0.3, +8.3] pts
    assert ablate.sentence("dropout", 0.5, 0.0, "", "val", "AUC", est) == \
        "dropout 0.5 vs 0.0: +4.0 pts AUC [-0.3, +8.3], within noise"
    better, _ = paired_difference({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.8, 2: 0.8})
    assert verdict(better) == "better" and better.ci_low > 0
    worse, _ = paired_difference({0: 0.7, 1: 0.71, 2: 0.72}, {0: 0.8, 1: 0.8, 2: 0.8})
    assert verdict(worse) == "worse"
    one, _ = paired_difference({0: 0.9}, {0: 0.8})
    assert "no interval is possible" in ablate.sentence("augment", "flip", "none", "", "val",
                                                          "AUC", one)


def test_grid_effects_pair_by_seed_and_average_over_the_other_factor():
    s = ablate.parse_spec(spec(factors={"dropout": [0.0, 0.5], "augment": ["none", "flip"]}))
    auc = {  # (dropout, augment) -> AUC per seed 0, 1, 2
        (0.0, "none"): [0.80, 0.70, 0.90], (0.5, "none"): [0.82, 0.74, 0.91],
        (0.0, "flip"): [0.81, 0.72, 0.88], (0.5, "flip"): [0.85, 0.72, 0.93],
    }
    runs = []
    for v in ablate.expand(s):
        for seed, value in enumerate(auc[(v.levels["dropout"], v.levels["augment"])]):
            runs.append({"variant": v.name, "seed": seed, "levels": v.levels,
                         "val": {"roc_auc": value}, "test": None})
    rows = [e for e in ablate.effects(s, runs, ["val"]) if e["metric"] == "roc_auc"]
    main_d = next(e for e in rows if e["factor"] == "dropout" and not e["context"])
    # per seed: mean of (0.02, 0.04), (0.04, 0.00), (0.01, 0.05) = 0.03, 0.02, 0.03
    assert main_d["per_seed"] == pytest.approx({"0": 0.03, "1": 0.02, "2": 0.03})
    assert main_d["mean"] == pytest.approx(0.08 / 3) and main_d["n"] == 3
    at_flip = next(e for e in rows if e["factor"] == "dropout" and e["context"] == "augment=flip")
    assert at_flip["per_seed"] == pytest.approx({"0": 0.04, "1": 0.0, "2": 0.05})
    main_a = next(e for e in rows if e["factor"] == "augment" and not e["context"])
    assert main_a["reference"] == "none" and main_a["level"] == "flip"
    assert main_a["per_seed"] == pytest.approx({"0": 0.02, "1": 0.0, "2": -0.0})
    # a missing run drops that seed from the main effect (never an unpaired comparison)
    runs = [r for r in runs if not (r["variant"] == "dropout-0.5+augment-flip" and r["seed"] == 1)]
    main_d = next(e for e in ablate.effects(s, runs, ["val"]) if e["factor"] == "dropout"
                  and not e["context"] and e["metric"] == "roc_auc")
    assert set(main_d["per_seed"]) == {"0", "2"}


# -- a real tiny sweep: kill, resume, shard, collect ------------------------------------------


def test_killed_sweep_resumes_without_repeating_a_run(tiny_sweep):
    t = tiny_sweep
    runs = t.a / "runs"
    # the complete run was skipped and left untouched
    assert t.first_run in t.resume.skipped and t.first_run not in t.resume.trained
    assert (runs / t.first_run / "model.pt").stat().st_mtime_ns == t.first_mtime
    # the half-written one was moved aside (kept, not deleted) and trained again
    assert len(t.resume.moved) == 1 and t.resume.moved[0].startswith(t.killed_run + ".failed-")
    assert (runs / t.resume.moved[0]).is_dir()
    assert sorted(t.resume.trained) == sorted(n for n in (r.name for r in ablate.plan(
        ablate.load_spec(t.spec_path))) if n != t.first_run)
    # images were decoded at most once for all the runs of the process
    assert t.resume.cache_events.count("decoded") <= 1
    # a further run trains nothing
    again = sweep.run_sweep(ablate.load_spec(t.spec_path), t.a)
    assert not again.trained and not again.moved and len(again.skipped) == 4


def test_shards_collect_equal_to_one_sweep(tiny_sweep):
    t = tiny_sweep
    assert [len(s.trained) for s in t.shards] == [2, 2]
    assert not set(t.shards[0].trained) & set(t.shards[1].trained)
    a, b = t.result_a, t.result_b
    assert a["complete"] == b["complete"] == 4 and not a["missing"] and not b["missing"]

    def numbers(result):
        return {r["name"]: (r["val"], r["test"], r["best_epoch"]) for r in result["runs"]}

    assert numbers(a) == numbers(b)  # deterministic training: the same runs, the same numbers
    strip = ("train_seconds",)
    va = [{k: v for k, v in row.items() if k not in strip} for row in a["variants"]]
    vb = [{k: v for k, v in row.items() if k not in strip} for row in b["variants"]]
    assert va == vb


def test_collect_writes_csv_json_and_test_metrics(tiny_sweep):
    t = tiny_sweep
    res = json.loads((t.a / "ablation.json").read_text())
    assert res["planned"] == 4 and [v["n"] for v in res["variants"]] == [2, 2]
    assert all(r["test"] and r["test"]["roc_auc"] is not None for r in res["runs"])
    rows = (t.a / "ablation.csv").read_text().splitlines()
    assert rows[0].startswith("variant,dropout,n_seeds,val_roc_auc_mean,val_roc_auc_std")
    assert "test_roc_auc_mean" in rows[0] and len(rows) == 3
    # the variant mean is the mean of its runs
    v0 = res["variants"][0]
    mine = [r["val"]["accuracy"] for r in res["runs"] if r["variant"] == v0["variant"]]
    assert v0["val_accuracy"]["mean"] == pytest.approx(sum(mine) / 2)
    eff = (t.a / "effects.csv").read_text().splitlines()
    assert eff[0].startswith("factor,level,reference,context,split,metric,n,mean")
    assert any(line.startswith("dropout,0.5,0.0,,val,roc_auc,2,") for line in eff)
    assert any(",test,roc_auc," in line for line in eff)


def test_changed_spec_into_the_same_dir_is_refused(tiny_sweep, tmp_path):
    t = tiny_sweep
    raw = yaml.safe_load(t.spec_path.read_text())
    raw["base"]["epochs"] = 2
    with pytest.raises(CxrlabError, match="holds a different ablation"):
        sweep.run_sweep(ablate.parse_spec(raw), t.a)


def test_cli_collect_prints_the_table(tiny_sweep, capsys, monkeypatch):
    t = tiny_sweep
    monkeypatch.setattr(sys, "argv", ["cxrlab", "ablate", str(t.spec_path), "--out", str(t.b),
                                      "--collect"])
    main()
    out = capsys.readouterr().out
    assert "4 of 4 runs" in out and "ablation.csv" in out  # (the table's layout follows the
    assert "dropout 0.5 vs 0.0:" in out and "pts AUC" in out  # terminal's width)
