"""Every run under a folder, one row each: what `cxrlab runs` shows and `cxrlab.runs()` returns.

A run is a folder holding run.json (cross-validation folds are runs too: `cv/fold-1`). Rows
are plain dicts (no pandas); a half-written or corrupt run is a row with state 'unreadable'
and the reason, never an exception, so one broken folder does not hide the others.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from cxrlab.errors import CxrlabError
from cxrlab.run import read_history, read_threshold

# Imported inside the functions that need them: fcntl, rich (heavy or
# optional; importing them here would slow every command that imports this module).

SORTS = ("auc", "date", "name", "time")


def runs(root: Path | str = "runs", sort: str = "date", reverse: bool = False) -> list[dict]:
    """One dict per run under `root` (recursive), sorted by `sort` (auc: best first; date:
    oldest first; name; time: wall time, shortest first); runs without the key go last."""
    root = Path(root)
    if not root.is_dir():
        raise CxrlabError(f"{root}: no such folder")
    if sort not in SORTS:
        raise CxrlabError(f"--sort {sort}: choose from {', '.join(SORTS)}")
    found = sorted({p.parent for p in root.rglob("run.json")})
    rows = [read_run(d, root) for d in found]
    key = {"auc": lambda r: -r["auc"] if r["auc"] is not None else None,
           "date": lambda r: r["date"], "name": lambda r: r["run"],
           "time": lambda r: r["seconds"]}[sort]
    have = [r for r in rows if key(r) is not None]
    have.sort(key=lambda r: (key(r), r["run"]), reverse=reverse)
    return have + sorted((r for r in rows if key(r) is None), key=lambda r: r["run"])


def read_run(run_dir: Path, root: Path | None = None) -> dict[str, Any]:
    """The row of one run; 'unreadable' with `error` when its files cannot be parsed."""
    run_dir = Path(run_dir)
    row: dict[str, Any] = {
        "run": str(run_dir.relative_to(root)) if root is not None else str(run_dir),
        "path": str(run_dir), "state": "unreadable", "model": None, "image_size": None,
        "epochs_done": None, "epochs_planned": None, "auc": None, "auc_ci": None,
        "accuracy": None, "threshold": None, "seconds": None, "date": None, "error": None,
        "ensemble": None,
    }
    try:
        info = _json(run_dir / "run.json")
        state = info["state"]
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        row.update(model=config["model"], image_size=config["image_size"],
                   epochs_planned=config["epochs"])
        history = read_history(run_dir / "history.csv")
        row["epochs_done"] = len(history)
        seconds = [r["seconds"] for r in history if r.get("seconds") is not None]
        row["seconds"] = round(sum(seconds), 1) if seconds else None
        ensemble = info.get("ensemble")
        if ensemble:  # OUT of --seeds / --folds: the members' epochs, all of them
            members = [run_dir / name for name in ensemble["members"]]
            row["ensemble"] = f"{len(members)} {ensemble['kind']}"
            row["epochs_planned"] = len(members) * config["epochs"]
            row["epochs_done"] = sum(len(read_history(d / "history.csv")) for d in members)
        if state == "complete":
            m = _json(run_dir / "metrics.json")
            ci = (m.get("ci") or {}).get("roc_auc")
            row.update(auc=_num(m.get("roc_auc")), auc_ci=ci and [_num(x) for x in ci],
                       accuracy=_num(m.get("accuracy")), threshold=read_threshold(run_dir),
                       epochs_done=m.get("epochs", row["epochs_done"]),
                       seconds=_num(m.get("train_seconds", row["seconds"])))
            if ensemble:  # metrics.json's epochs is the longest member's; time is the sum
                row["epochs_done"] = sum(int(e or 0) for e in m["ensemble"]["member_epochs"])
        elif state == "running" and not _lock_held(run_dir):
            state = "killed"  # run.json says running, but no process holds the run's lock
        row["state"] = state
        row["error"] = info.get("error")
        row["date"] = time.strftime("%Y-%m-%d %H:%M:%S",
                                    time.localtime((run_dir / "run.json").stat().st_mtime))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
        row["state"] = "unreadable"
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def _num(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"expected a number, found {v!r}")
    return float(v)


def _json(path: Path) -> dict:
    d = json.loads(path.read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{path.name}: not a JSON object")
    return d


def _lock_held(run_dir: Path) -> bool:
    """Whether a training process holds RUN_DIR/.lock (cxrlab.run.run_lock); read-only probe."""
    import fcntl

    lock = run_dir / ".lock"
    if not lock.is_file():
        return False
    with lock.open("r") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def render(rows: list[dict], console, title: str = "Runs") -> None:
    """The rows as one Rich table (the CLI's view of `runs`); where it would not fit the
    terminal, the columns that tell runs apart, one line each (`--json` has everything)."""
    from rich.table import Table
    from rich.text import Text

    def f3(v: float | None) -> str:
        return "" if v is None else f"{v:.3f}"

    colour = {"complete": "green", "running": "cyan", "failed": "red", "killed": "yellow",
              "unreadable": "red"}
    table = Table("run", "model", "size", "epochs", "val AUC [95% CI]", "accuracy",
                  "threshold", "time", "state", "date", title=Text(title))
    for r in rows:
        auc = f3(r["auc"])
        if r["auc"] is not None and r["auc_ci"] and None not in r["auc_ci"]:
            auc += f" [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]"
        epochs = "" if r["epochs_planned"] is None else f"{r['epochs_done']}/{r['epochs_planned']}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f} s"
        state = Text(r["state"], style=colour.get(r["state"], ""))
        size = "" if r["image_size"] is None else str(r["image_size"])
        table.add_row(Text(r["run"]), Text(_model(r)), size, epochs, Text(auc),
                      f3(r["accuracy"]), f3(r["threshold"]), secs, state, r["date"] or "")
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    if natural > console.width:  # it would wrap: e.g. at 80 columns
        _render_narrow(rows, console, title)
        return
    console.print(table)
    _notes(rows, console)


def _render_narrow(rows: list[dict], console, title: str) -> None:
    """run, model (px), val AUC [95% CI], state (epochs), date to the minute: fits 80
    columns; long run and model names fold within their cells."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    colour = {"complete": "green", "running": "cyan", "failed": "red", "killed": "yellow",
              "unreadable": "red"}
    table = Table(title=Text(title), box=box.SIMPLE_HEAD, pad_edge=False, expand=False)
    table.add_column("run", overflow="fold")
    table.add_column("model", overflow="fold")
    table.add_column("val AUC [95% CI]", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("date", no_wrap=True)
    for r in rows:
        auc = "" if r["auc"] is None else f"{r['auc']:.3f}"
        if r["auc"] is not None and r["auc_ci"] and None not in r["auc_ci"]:
            auc += f" [{r['auc_ci'][0]:.2f}, {r['auc_ci'][1]:.2f}]"
        model = _model(r)
        if r["image_size"] is not None:
            model += f" {r['image_size']}px"
        state = r["state"]
        if r["epochs_planned"] is not None:
            state += f" {r['epochs_done']}/{r['epochs_planned']}"
        table.add_row(Text(r["run"]), Text(model), Text(auc),
                      Text(state, style=colour.get(r["state"], "")), (r["date"] or "")[:16])
    console.print(table)
    _notes(rows, console)


def _model(row: dict) -> str:
    """The model column: an ensemble says so, with its members ('... x 5 seeds')."""
    model = str(row["model"] or "")
    return f"{model} x {row['ensemble']}" if row.get("ensemble") else model


def _notes(rows: list[dict], console) -> None:
    from rich.text import Text

    for r in rows:
        if r["state"] == "unreadable":
            console.print(Text(f"{r['run']}: unreadable ({r['error']})"))
    if not rows:
        console.print("no runs (folders with run.json) found")
