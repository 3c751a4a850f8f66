"""Ablation studies: many ordinary runs, one question, honest statistics. This module holds
the spec, its plan of runs and the reading of the results (paired by seed, with intervals);
the sweep that trains the runs is cxrlab.training.sweep.

A spec (YAML) names a base configuration (the keys of RUN_DIR/config.yaml), factors with
levels, a design and seeds. Every variant is trained once per seed with the same seeds, so
variants are compared paired by seed (same validation split, same initial weights). Each run
is an ordinary run directory, OUT/runs/<variant>__seed<k>; the sweep is its run directories:

    OUT/ablation.yaml   the spec as validated (a later sweep into OUT must match it)
    OUT/runs/...        one run directory per (variant, seed)
    OUT/ablation.csv    per variant: mean, std and 95% t-interval over seeds
    OUT/effects.csv     per factor level: paired difference to the reference level
    OUT/ablation.json   all of it, plus every run's own numbers
    OUT/ablation.md     the variant table and the effect sentences, as Markdown

A complete run is never trained again, so a killed sweep resumes; a run left half-written is
moved aside (renamed `<name>.failed-<time>`, never deleted) and trained again. `--shard i/n`
trains runs i, i+n, i+2n, ... (1-based), so machines sharing OUT share the sweep; `collect`
merges whatever is there. Runs go seed by seed, so a sweep stopped early still has paired
comparisons. Images are decoded once per process: every variant with the same data and image
size gets the array from `cxrlab.data.cache`'s memory cache.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError
from cxrlab.evaluation.stats import Estimate, paired_difference, t_interval, verdict
from cxrlab.run import atomic_write_text, read_history, write_json

# Imported inside the functions that need them: rich (heavy or
# optional; importing them here would slow every command that imports this module).

log = logging.getLogger("cxrlab")

SPEC_FILE = "ablation.yaml"
TEST_FILE = "ablation_test.json"  # per run: metrics on the spec's `test:` data
# (key in metrics.json, label): the quality metrics the answer is about; higher is better.
METRICS = (("roc_auc", "AUC"), ("accuracy", "accuracy"), ("recall", "recall"),
           ("specificity", "specificity"))
NOT_FACTORS = {"seed": "seeds are given by `seeds:`, not as a factor",
               "time_budget": "a sweep compares runs of a fixed length (give epochs): none"
               " is planned to a time budget"}


# ---------------------------------------------------------------------------------------
# the spec


class AblationSpec(BaseModel):
    """What a user writes; see examples/ablation-regularisation.yaml."""

    model_config = ConfigDict(extra="forbid")

    base: dict[str, Any] = Field(description="a run configuration (keys of config.yaml)")
    factors: dict[str, list[Any]] = Field(description="config key -> levels (2 or more)")
    design: Literal["grid", "one-at-a-time"] = "grid"
    seeds: int | list[int] = Field(3, description="how many (0, 1, ...) or which seeds")
    test: str | None = Field(None, description="labelled data every run is evaluated on")
    name: str | None = None
    description: str | None = None

    @field_validator("factors")
    @classmethod
    def _factors(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not v:
            raise ValueError("give at least one factor")
        fields = RunConfig.model_fields
        for key, levels in v.items():
            if key in NOT_FACTORS:
                raise ValueError(f"{key}: {NOT_FACTORS[key]}")
            if key not in fields:
                raise ValueError(f"{key}: not a configuration key")
            if len(levels) < 2:
                raise ValueError(f"{key}: needs at least 2 levels")
            if len({json.dumps(x) for x in levels}) != len(levels):
                raise ValueError(f"{key}: levels repeat")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1")
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("must be distinct seeds >= 0")
        return v

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


def parse_spec(raw: Any, source: str = "spec") -> AblationSpec:
    """Validate a spec mapping; any problem is one CxrlabError naming the key."""
    if not isinstance(raw, dict):
        raise CxrlabError(f"{source}: expected a mapping with base, factors, design, seeds")
    try:
        spec = AblationSpec(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = err["msg"].removeprefix("Value error, ")
        key, sep, rest = msg.partition(": ")
        if where == "factors" and sep and key in raw.get("factors", {}):
            where, msg = f"factors.{key}", rest  # name the factor, like pydantic's own paths
        raise CxrlabError(f"{source}: {where}: {msg}") from None
    # Every configuration the sweep will train must be valid before the first one starts.
    if "seed" in spec.base:
        raise CxrlabError(f"{source}: base.seed: {NOT_FACTORS['seed']}")
    if str(spec.base.get("time_budget", "none")).lower() != "none":
        raise CxrlabError(f"{source}: base.time_budget: {NOT_FACTORS['time_budget']}")
    RunConfig.build({**spec.base, "seed": 0}, source=f"{source}: base")
    for v in expand(spec):
        for f, level in v.levels.items():
            try:
                RunConfig(**{**spec.base, f: level, "seed": 0})
            except ValidationError as e:
                raise CxrlabError(f"{source}: factors.{f}: level {level!r}: "
                                  f"{e.errors()[0]['msg']}") from None
        RunConfig.build(v.values(spec.base, 0), source=f"{source}: variant {v.name}")
    return spec


def load_spec(path: Path) -> AblationSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise CxrlabError(f"{path}: spec file not found") from None
    except yaml.YAMLError as e:
        raise CxrlabError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(raw, source=str(path))


# ---------------------------------------------------------------------------------------
# variants and runs


def level_name(value: Any) -> str:
    """A level as it appears in directory names and tables: 0.5, true, notebook, default."""
    if value is None:
        text = "default"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = str(value)
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


def reference_level(spec: AblationSpec, factor: str) -> Any:
    """The level effects are measured against: the base's value if listed, else the first."""
    levels = spec.factors[factor]
    if factor in spec.base and spec.base[factor] in levels:
        return spec.base[factor]
    return levels[0]


@dataclass
class Variant:
    name: str
    levels: dict[str, Any]  # factor -> level (every factor, reference where not varied)

    def values(self, base: dict[str, Any], seed: int) -> dict[str, Any]:
        return {**base, **self.levels, "seed": seed}


def expand(spec: AblationSpec) -> list[Variant]:
    """grid: every combination; one-at-a-time: the reference variant, then one factor at a
    time moved to each of its other levels."""
    factors = list(spec.factors)
    refs = {f: reference_level(spec, f) for f in factors}
    if spec.design == "grid":
        return [Variant("+".join(f"{f}-{level_name(x)}" for f, x in zip(factors, combo,
                                                                          strict=True)),
                        dict(zip(factors, combo, strict=True)))
                for combo in itertools.product(*(spec.factors[f] for f in factors))]
    out = [Variant("base", dict(refs))]
    for f in factors:
        for x in spec.factors[f]:
            if x != refs[f]:
                out.append(Variant(f"{f}-{level_name(x)}", {**refs, f: x}))
    return out


@dataclass
class PlannedRun:
    variant: Variant
    seed: int
    config: RunConfig

    @property
    def name(self) -> str:
        return f"{self.variant.name}__seed{self.seed}"


def plan(spec: AblationSpec) -> list[PlannedRun]:
    """Seed-major order: all variants for the first seed, then the next seed, ..."""
    base = {**spec.base, "time_budget": "none"}  # not the CPU default's 30 minutes
    if "data" in base:  # runs must find the data from wherever they are read
        base["data"] = str(Path(base["data"]).expanduser().absolute())
    variants = expand(spec)
    return [PlannedRun(v, s, RunConfig(**v.values(base, s)))
            for s in spec.seed_list for v in variants]


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise CxrlabError(f"--shard {text}: expected i/n, e.g. 1/3") from None
    if not 1 <= i <= n:
        raise CxrlabError(f"--shard {text}: need 1 <= i <= n")
    return i, n


def shard_runs(runs: list[PlannedRun], shard: tuple[int, int] | None) -> list[PlannedRun]:
    if shard is None:
        return runs
    i, n = shard
    return runs[i - 1::n]


# ---------------------------------------------------------------------------------------
# the output directory


def _spec_text(spec: AblationSpec) -> str:
    return yaml.safe_dump(spec.model_dump(), sort_keys=False)


def claim_out_dir(spec: AblationSpec, out: Path) -> None:
    """OUT holds this spec's sweep, or nothing: never mix two studies in one directory."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CxrlabError(f"--out {out}: exists and is not a directory")
    saved = out / SPEC_FILE
    text = _spec_text(spec)
    if saved.is_file():
        if yaml.safe_load(saved.read_text()) != yaml.safe_load(text):
            raise CxrlabError(f"--out {out}: holds a different ablation ({saved} differs from "
                              "this spec); choose a new --out")
        return
    if out.is_dir() and any(p.name != "runs" for p in out.iterdir()):
        raise CxrlabError(f"--out {out}: directory exists and is not an ablation of this spec "
                          "(choose a new one)")
    (out / "runs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, text)


# ---------------------------------------------------------------------------------------
# collecting: the answer


def best_epoch(history: list[dict]) -> int | None:
    """The epoch with the lowest validation loss: the one whose weights were kept."""
    rows = [r for r in history if r.get("val_loss") is not None
            and math.isfinite(r["val_loss"])]
    return int(min(rows, key=lambda r: r["val_loss"])["epoch"]) if rows else None


def read_run(run_dir: Path) -> dict | None:
    """One complete run's numbers, or None when it is not complete."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("state") != "complete":
        return None
    test = None
    for name in (TEST_FILE, "metrics_test.json"):
        if (run_dir / name).is_file():
            test = json.loads((run_dir / name).read_text())
            break
    history = read_history(run_dir / "history.csv")
    return {
        "val": {k: metrics.get(k) for k, _ in METRICS},
        "test": None if test is None else {k: test.get(k) for k, _ in METRICS},
        "epochs_run": metrics.get("epochs"),
        "best_epoch": best_epoch(history),
        "train_seconds": metrics.get("train_seconds"),
    }


def _est(values: list, bounds: tuple[float, float] | None = None) -> dict:
    return t_interval(values, bounds=bounds).to_dict()


def collect(spec: AblationSpec, out: Path) -> dict:
    """Merge the runs under OUT (any shard's) into the answer and write it beside them."""
    out = Path(out)
    if not (out / SPEC_FILE).is_file():
        raise CxrlabError(f"--out {out}: no ablation here (no {SPEC_FILE})")
    claim_out_dir(spec, out)
    planned = plan(spec)
    runs, missing = [], []
    for r in planned:
        d = read_run(out / "runs" / r.name)
        if d is None:
            missing.append(r.name)
            continue
        runs.append({"name": r.name, "variant": r.variant.name, "seed": r.seed,
                     "levels": r.variant.levels, **d})
    has_test = any(r["test"] for r in runs)
    splits = ["val", "test"] if has_test else ["val"]
    variants = []
    for v in expand(spec):
        mine = [r for r in runs if r["variant"] == v.name]
        row = {"variant": v.name, "levels": v.levels, "seeds": [r["seed"] for r in mine],
               "n": len(mine)}
        for split in splits:
            for key, _ in METRICS:
                row[f"{split}_{key}"] = _est([(r[split] or {}).get(key) for r in mine], (0, 1))
        for key in ("best_epoch", "epochs_run", "train_seconds"):
            row[key] = _est([r[key] for r in mine])
        variants.append(row)
    result = {
        "name": spec.name, "description": spec.description, "design": spec.design,
        "factors": spec.factors,
        "reference": {f: reference_level(spec, f) for f in spec.factors},
        "seeds": spec.seed_list, "planned": len(planned), "complete": len(runs),
        "missing": missing, "variants": variants,
        "effects": effects(spec, runs, splits), "runs": runs,
    }
    write_json(out / "ablation.json", result)
    atomic_write_text(out / "ablation.csv", variants_csv(result))
    atomic_write_text(out / "effects.csv", effects_csv(result))
    atomic_write_text(out / "ablation.md", markdown(result))
    return result


def effects(spec: AblationSpec, runs: list[dict], splits: list[str]) -> list[dict]:
    """Each factor level against the reference level, paired by seed.

    one-at-a-time: the variant against the base variant. grid: the main effect (per seed,
    the difference averaged over every combination of the other factors, then a t-interval
    over seeds: seeds are the independent units) and, with more than one factor, the effect
    at each combination of the others (interactions show there).
    """
    by = {(r["variant"], r["seed"]): r for r in runs}
    variants = expand(spec)
    seeds = spec.seed_list
    rows = []

    def find(levels: dict) -> Variant | None:
        return next((v for v in variants if v.levels == levels), None)

    for f in spec.factors:
        ref = reference_level(spec, f)
        for level in spec.factors[f]:
            if level == ref:
                continue
            pairs = []  # (context, treatment variant, reference variant)
            for v in variants:
                if v.levels[f] != level:
                    continue
                r = find({**v.levels, f: ref})
                if r is None:
                    continue
                ctx = ", ".join(f"{g}={level_name(x)}" for g, x in v.levels.items() if g != f)
                pairs.append((ctx, v, r))
            for split in splits:
                for key, label in METRICS:
                    def value(vname: str, s: int, _split=split, _key=key):
                        run = by.get((vname, s))
                        return None if run is None else (run[_split] or {}).get(_key)

                    per_ctx = {ctx: ({s: value(t.name, s) for s in seeds},
                                     {s: value(r.name, s) for s in seeds})
                               for ctx, t, r in pairs}
                    contexts = [("", None)]
                    if len(pairs) > 1:
                        contexts += [(ctx, ctx) for ctx, _, _ in pairs]
                    for shown, ctx in contexts:
                        if ctx is None:  # main effect: mean over contexts, per seed
                            diffs = {}
                            for s in seeds:
                                d = [t[s] - r[s] for t, r in per_ctx.values()
                                     if t[s] is not None and r[s] is not None]
                                if len(d) == len(per_ctx):
                                    diffs[s] = sum(d) / len(d)
                            est, diffs = paired_difference(diffs, dict.fromkeys(diffs, 0.0),
                                                           bounds=(-1, 1))
                        else:
                            est, diffs = paired_difference(*per_ctx[ctx], bounds=(-1, 1))
                        rows.append({
                            "factor": f, "level": level, "reference": ref,
                            "context": shown, "split": split, "metric": key,
                            **est.to_dict(), "per_seed": {str(s): d for s, d in diffs.items()},
                            "verdict": verdict(est),
                            "sentence": sentence(f, level, ref, shown, split, label, est),
                        })
    return rows


def sentence(factor: str, level: Any, ref: Any, context: str, split: str, label: str,
             est: Estimate) -> str:
    """"dropout 0.5 vs 0.0: +1.2 pts AUC [-0.4, +2.8], within noise" (pts = 0.01)."""
    head = f"{factor} {level_name(level)} vs {level_name(ref)}"
    if context:
        head += f" (at {context})"
    what = f"{label}" if split == "val" else f"test {label}"
    if est.n == 0:
        return f"{head}: {what}: no paired runs yet"
    if not est.has_interval:
        return (f"{head}: {100 * est.mean:+.1f} pts {what} from 1 seed; no interval is "
                "possible, so no conclusion")
    v = verdict(est)
    return (f"{head}: {100 * est.mean:+.1f} pts {what} [{100 * est.ci_low:+.1f}, "
            f"{100 * est.ci_high:+.1f}], {v}")


# -- files ------------------------------------------------------------------------------


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def variants_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    factors = list(result["factors"])
    stat_keys = [k for k in result["variants"][0] if isinstance(result["variants"][0][k], dict)
                 and k != "levels"] if result["variants"] else []
    w.writerow(["variant", *factors, "n_seeds",
                *[f"{k}_{s}" for k in stat_keys for s in ("mean", "std", "ci_low", "ci_high")]])
    for v in result["variants"]:
        w.writerow([v["variant"], *[level_name(v["levels"][f]) for f in factors], v["n"],
                    *[_num(v[k][s]) for k in stat_keys
                      for s in ("mean", "std", "ci_low", "ci_high")]])
    return buf.getvalue()


def effects_csv(result: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["factor", "level", "reference", "context", "split", "metric", "n", "mean", "std",
            "ci_low", "ci_high", "verdict", "sentence"]
    w.writerow(cols)
    for e in result["effects"]:
        w.writerow([level_name(e[c]) if c in ("level", "reference")
                    else _num(e[c]) if c in ("mean", "std", "ci_low", "ci_high")
                    else e[c] for c in cols])
    return buf.getvalue()


def markdown(result: dict) -> str:
    """The variant table and the main-effect sentences as Markdown (for a README)."""
    def cell(e: dict, scale: float = 1.0, digits: int = 3) -> str:
        return _cell(e, scale, digits, sep=" ")

    splits = ["val", "test"] if any(r.get("test") for r in result["runs"]) else ["val"]
    head = ["variant", "seeds", *[(lab if s == "val" else f"test {lab}") for s in splits
                                  for _, lab in METRICS], "best epoch", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in result["variants"]:
        lines.append("| " + " | ".join([
            v["variant"], str(v["n"]), *[cell(v[f"{s}_{k}"]) for s in splits for k, _ in METRICS],
            cell(v["best_epoch"], digits=1), cell(v["train_seconds"], digits=0)]) + " |")
    lines.append("")
    lines += [f"- {e['sentence']}" for e in result["effects"]
              if not e["context"] and e["metric"] == "roc_auc"]
    if result["missing"]:
        lines.append(f"- {len(result['missing'])} of {result['planned']} planned runs are not "
                     "complete yet.")
    return "\n".join(lines) + "\n"


def load_result(out: Path) -> dict:
    path = Path(out) / "ablation.json"
    if not path.is_file():
        raise CxrlabError(f"{out}: no ablation.json (run `cxrlab ablate SPEC --out {out} "
                          "--collect` first)")
    return json.loads(path.read_text())


# -- the Rich tables ----------------------------------------------------------------------


def _cell(e: dict, scale: float = 1.0, digits: int = 3, sep: str = "\n",
          ci: str = "[{}]") -> str:
    """mean ± std, then the CI after `sep`: its own line (Rich), a space (Markdown) or a
    <br> (the HTML report, which styles it through `ci`)."""
    if not e or e.get("mean") is None:
        return "—"
    text = f"{e['mean'] * scale:.{digits}f}"
    if e.get("std") is not None:
        text += f" ± {e['std'] * scale:.{digits}f}"
    if e.get("ci_low") is not None:
        bounds = f"{e['ci_low'] * scale:.{digits}f}, {e['ci_high'] * scale:.{digits}f}"
        text += sep + ci.format(bounds)
    return text


def render(result: dict, console) -> None:
    """The variant table (mean ± std, 95% CI below) and the main-effect sentences."""
    from rich.table import Table

    splits = ["val", "test"] if any(k.startswith("test_") for v in result["variants"]
                                    for k in v) else ["val"]
    title = (f"{result.get('name') or 'Ablation'}: {result['complete']} of {result['planned']} "
             "runs, mean ± std over seeds [95% t-interval]")
    table = Table(title=title, show_lines=True)
    table.add_column("variant", overflow="fold")
    table.add_column("n", justify="right")
    for split in splits:
        for _, label in METRICS:
            table.add_column(label if split == "val" else f"test {label}", justify="right",
                             min_width=13)
    table.add_column("best epoch", justify="right", min_width=9)
    table.add_column("train s", justify="right", min_width=7)
    for v in result["variants"]:
        table.add_row(v["variant"], str(v["n"]),
                      *[_cell(v[f"{s}_{k}"]) for s in splits for k, _ in METRICS],
                      _cell(v["best_epoch"], digits=1), _cell(v["train_seconds"], digits=0))
    console.print(table)
    main = [e for e in result["effects"] if not e["context"] and e["metric"] == "roc_auc"]
    if main:
        console.print("[bold]Effects on ROC AUC against the reference level, paired by seed "
                      "(pts = percentage points; every metric in effects.csv):[/]")
        for e in main:
            colour = {"better": "green", "worse": "red"}.get(e["verdict"], "")
            console.print(f"  [{colour}]{e['sentence']}[/]" if colour else f"  {e['sentence']}",
                          highlight=False)
    if result["missing"]:
        console.print(f"[yellow]{len(result['missing'])} run(s) not complete yet, e.g. "
                      f"{result['missing'][0]}[/]")
