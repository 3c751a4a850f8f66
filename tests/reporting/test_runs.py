"""cxrlab runs: every run under a folder, read from its own files; broken runs are rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cxrlab.reporting.run_table import runs
from tests.conftest import make_kermany_folder
from tests.test_cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    """Two tiny real runs (one nested, as ablations and folds are), a corrupt one, a
    half-written one and one whose process died."""
    from cxrlab.config import RunConfig
    from cxrlab.training.lifecycle import train_run

    root = tmp_path_factory.mktemp("runs")
    data = make_kermany_folder(root.parent / "runs-data", 10, 10, size=32)
    for name, lr in (("a", 3e-3), ("sweep/b", 1e-6)):
        cfg = RunConfig.build(dict(data=str(data), model="cnn", image_size=32, epochs=2,
                                   batch_size=4, lr=lr, augment="none", dropout=0.0))
        train_run(cfg, root / name, progress=False)
    # Runs this small learn nothing: their scores tie to 1e-6, so their AUCs are 0.5 or
    # whatever float rounding makes of a tie. The sort is under test, not the runs: b's AUC
    # is set apart from a's.
    b = root / "sweep" / "b" / "metrics.json"
    metrics = json.loads(b.read_text())
    b.write_text(json.dumps({**metrics, "roc_auc": auc_of(root / "a") + 0.25}))
    (root / "corrupt").mkdir()
    (root / "corrupt" / "run.json").write_text('{"classes": ["A", "B"], "sta')
    half = root / "half"
    shutil.copytree(root / "a", half)
    (half / "metrics.json").unlink()
    dead = root / "dead"
    shutil.copytree(root / "a", dead)
    info = json.loads((dead / "run.json").read_text())
    (dead / "run.json").write_text(json.dumps({**info, "state": "running"}))
    return root


def auc_of(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["roc_auc"]


def test_rows_hold_each_runs_files(runs_root):
    rows = {r["run"]: r for r in runs(runs_root)}
    assert set(rows) == {"a", "sweep/b", "corrupt", "half", "dead"}
    a = rows["a"]
    m = json.loads((runs_root / "a" / "metrics.json").read_text())
    assert a["state"] == "complete" and a["model"] == "cnn" and a["image_size"] == 32
    assert (a["epochs_done"], a["epochs_planned"]) == (2, 2)
    assert a["auc"] == m["roc_auc"] and a["auc_ci"] == m["ci"]["roc_auc"]
    assert a["accuracy"] == m["accuracy"] and a["threshold"] == m["threshold"]
    assert a["seconds"] == m["train_seconds"] and a["date"]
    corrupt = rows["corrupt"]
    assert corrupt["state"] == "unreadable" and "JSONDecodeError" in corrupt["error"]
    assert rows["half"]["state"] == "unreadable" and "metrics.json" in rows["half"]["error"]
    assert rows["dead"]["state"] == "killed"  # says running; no process holds its lock
    from cxrlab.run import run_lock

    with run_lock(runs_root / "dead"):  # as the training process holds it
        assert {r["run"]: r["state"] for r in runs(runs_root)}["dead"] == "running"


def test_sorted_by_auc_best_first_unsortable_last(runs_root):
    names = [r["run"] for r in runs(runs_root, sort="auc")]
    complete = sorted(["a", "sweep/b"], key=lambda n: (-auc_of(runs_root / n), n))
    assert auc_of(runs_root / "a") != auc_of(runs_root / "sweep/b")  # the order means something
    assert names[:2] == complete
    assert set(names[2:]) == {"corrupt", "half", "dead"}
    assert [r["run"] for r in runs(runs_root, sort="auc", reverse=True)][:2] == complete[::-1]
    assert [r["run"] for r in runs(runs_root, sort="name")] == sorted(names)


def test_cli_table_fits_80_columns(runs_root, capsys, monkeypatch):
    """At 80 columns the table keeps one line per run and no cut-off cells: the columns
    that tell runs apart (run, model, val AUC [95% CI], state, date)."""
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(["runs", runs_root, "--sort", "auc"], capsys, monkeypatch)
    assert code == 0, err
    lines = out.splitlines()
    assert max(map(len, lines)) <= 80, out
    assert "…" not in out, out  # nothing truncated
    best = runs(runs_root, sort="auc")[0]
    row = next(ln for ln in lines if ln.split() and ln.split()[0] == best["run"])
    assert f"{best['auc']:.3f} [{best['auc_ci'][0]:.2f}, {best['auc_ci'][1]:.2f}]" in row
    assert f"complete {best['epochs_done']}/{best['epochs_planned']}" in row
    assert best["date"][:16] in row and "cnn 32px" in row
    assert "corrupt: unreadable" in out


def test_cli_table_and_json(runs_root, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table unwrapped
    code, out, err = run_cli(["runs", runs_root, "--sort", "auc", "--json"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out) == runs(runs_root, sort="auc")
    code, out, err = run_cli(["runs", runs_root, "--sort", "auc"], capsys, monkeypatch)
    assert code == 0, err
    best = runs(runs_root, sort="auc")[0]
    assert f"{best['auc']:.3f} [{best['auc_ci'][0]:.3f}" in out
    assert "corrupt: unreadable" in out and "Traceback" not in out + err
    code, _, err = run_cli(["runs", runs_root, "--sort", "loss"], capsys, monkeypatch)
    assert_user_error(code, err, "--sort loss", "auc, date, name, time")
    code, _, err = run_cli(["runs", runs_root / "nowhere"], capsys, monkeypatch)
    assert_user_error(code, err, "nowhere: no such folder")


def test_an_ensemble_is_one_row_that_says_so_with_all_its_members_epochs(tmp_path, capsys,
                                                                        monkeypatch):
    """`--seeds 2`: OUT is a row marked '2 seeds', its epochs are both members' (2 x 2) and
    its time their sum; the members stay rows of their own."""
    from cxrlab.config import RunConfig
    from cxrlab.training.ensemble import run_seeds

    data = make_kermany_folder(tmp_path / "data", 6, 6, size=32)
    cfg = RunConfig.build(dict(data=str(data), model="cnn", image_size=32, epochs=2,
                               batch_size=4, augment="none", dropout=0.0, seeds=2))
    run_seeds(cfg, tmp_path / "runs" / "ens", progress=False)
    rows = {r["run"]: r for r in runs(tmp_path / "runs")}
    assert set(rows) == {"ens", "ens/seed-1", "ens/seed-2"}
    ens, members = rows["ens"], [rows["ens/seed-1"], rows["ens/seed-2"]]
    assert ens["state"] == "complete" and ens["ensemble"] == "2 seeds"
    assert (ens["epochs_done"], ens["epochs_planned"]) == (4, 4)
    assert ens["seconds"] == pytest.approx(sum(m["seconds"] for m in members), abs=0.2)
    assert all(m["ensemble"] is None for m in members)
    code, out, err = run_cli(["runs", tmp_path / "runs"], capsys, monkeypatch)
    assert code == 0, err
    words = " ".join(out.split())  # 80 columns: the model cell may fold after "x 2"
    assert "cnn x 2" in words and "seeds" in words
