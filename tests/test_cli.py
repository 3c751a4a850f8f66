"""The command line end to end, in-process: exit codes, one-line errors, files written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlab.cli import main
from tests.conftest import make_kermany_folder

FAST = ["--image-size", "32", "--epochs", "2", "--batch-size", "8", "--quiet"]


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`main()` as a fresh process would run it: its consoles read COLUMNS now, not when
    cxrlab.cli was first imported (a pytest-xdist worker imports it with COLUMNS=80)."""
    from cxrlab import cli

    monkeypatch.setattr(sys, "argv", ["cxrlab", *map(str, args)])
    for console in (cli.console, cli.err_console):
        monkeypatch.setattr(console, "_width", None)
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cxrlab: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def not_complete(run: Path) -> bool:
    info = run / "run.json"
    return not info.exists() or json.loads(info.read_text())["state"] != "complete"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = make_kermany_folder(root / "data", 16, 16)
    run = root / "run"
    code = 0
    argv = sys.argv
    sys.argv = ["cxrlab", "train", str(data), "--out", str(run), "--model", "cnn", *FAST]
    try:
        main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    assert code in (0, None)
    return data, run


def test_train_writes_a_complete_run(trained_run):
    data, run = trained_run
    for name in ["config.yaml", "split.csv", "history.csv", "model.pt", "threshold",
                 "metrics.json", "curves.png", "confusion_matrix.png", "roc.png",
                 "val_predictions.png", "checkpoints/best.ckpt"]:
        assert (run / name).is_file(), name
    assert json.loads((run / "run.json").read_text())["state"] == "complete"
    m = json.loads((run / "metrics.json").read_text())
    for key in ["accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                "threshold", "confusion_matrix", "classes", "positive_class", "n", "ci"]:
        assert key in m
    assert m["classes"] == ["NORMAL", "PNEUMONIA"] and m["positive_class"] == "PNEUMONIA"
    assert m["threshold"] == pytest.approx(float((run / "threshold").read_text()))


def test_evaluate_and_predict(trained_run, tmp_path, capsys, monkeypatch):
    data, run = trained_run
    out_json = tmp_path / "m.json"
    held = make_kermany_folder(tmp_path / "held", 16, 16, seed=3)  # images not trained on
    code, out, err = run_cli(["evaluate", run, held, "--json", out_json], capsys, monkeypatch)
    assert code == 0, err
    m = json.loads(out_json.read_text())
    assert m["n"] == 32 and sum(map(sum, m["confusion_matrix"])) == 32
    assert "at_0_5" in m
    code, out, err = run_cli(["predict", run, data / "NORMAL", "--json"], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 16
    for r in rows:
        p = r["probabilities"]
        assert set(p) == {"NORMAL", "PNEUMONIA"}
        assert sum(p.values()) == pytest.approx(1, abs=1e-5)
        # the decision comes with its rule: the positive class's exact score against the
        # threshold (the probabilities, at 6 digits, can tie with it)
        assert r["positive_class"] == "PNEUMONIA"
        assert r["positive_score"] == pytest.approx(p["PNEUMONIA"], abs=1e-6)
        expected = "PNEUMONIA" if r["positive_score"] >= r["threshold"] else "NORMAL"
        assert r["class"] == expected
        score, sign, t = r["rule"].removeprefix("p(PNEUMONIA) ").split()
        assert sign == ("≥" if expected == "PNEUMONIA" else "<")
        assert score != t or r["positive_score"] == r["threshold"]  # never "0.410 < 0.410"
        assert float(t) == pytest.approx(r["threshold"], abs=1e-3)


def test_predict_and_evaluate_tables_show_the_rule(trained_run, tmp_path, capsys,
                                                   monkeypatch):
    data, run = trained_run
    monkeypatch.setenv("COLUMNS", "160")  # rows unwrapped
    threshold = float((run / "threshold").read_text())
    f = sorted((data / "NORMAL").glob("*.png"))[0]
    code, out, err = run_cli(["predict", run, f], capsys, monkeypatch)
    assert code == 0, err
    assert "because" in out and "p(PNEUMONIA) " in out
    assert f"PNEUMONIA when p(PNEUMONIA) ≥ {threshold:.3f}" in " ".join(out.split())
    held = make_kermany_folder(tmp_path / "held", 16, 16, seed=3)
    code, out, err = run_cli(["evaluate", run, held], capsys, monkeypatch)
    assert code == 0, err
    assert f"at {threshold:.3g}" in out and "at 0.5" in out  # both thresholds' figures


def test_evaluate_other_positive_keeps_the_decisions(trained_run, tmp_path, capsys,
                                                     monkeypatch):
    # `evaluate --positive NORMAL` of a PNEUMONIA run once applied the run's threshold to
    # P(NORMAL): with threshold t, a case between t and 1 - t changed class.
    import shutil

    _, run = trained_run
    run = Path(shutil.copytree(run, tmp_path / "run"))
    data = make_kermany_folder(tmp_path / "held", 16, 16, seed=3)  # images not trained on
    code, out, err = run_cli(["predict", run, data, "--json"], capsys, monkeypatch)
    assert code == 0, err
    p = np.array(sorted(json.loads(line)["probabilities"]["PNEUMONIA"]
                        for line in out.splitlines()))
    # the threshold (between two scores, or a round one) that the old rule got most wrong
    cuts = np.r_[(p[1:] + p[:-1]) / 2, np.linspace(0.1, 0.9, 9)]
    wrong = [int(((1 - p >= t) != (p < t)).sum()) for t in cuts]
    t = float(cuts[int(np.argmax(wrong))])
    assert max(wrong) > 0  # the case this test is about is present
    (run / "threshold").write_text(f"{t!r}\n")
    metrics = {}
    for positive in ("PNEUMONIA", "NORMAL"):
        out_json = tmp_path / f"{positive}.json"
        code, _, err = run_cli(["evaluate", run, data, "--positive", positive, "--json",
                                out_json], capsys, monkeypatch)
        assert code == 0, err
        metrics[positive] = json.loads(out_json.read_text())
    a, b = metrics["PNEUMONIA"], metrics["NORMAL"]
    assert a["confusion_matrix"] == b["confusion_matrix"]  # every image keeps its class
    assert b["positive_class"] == "NORMAL" and b["threshold"] == pytest.approx(1 - t)
    assert (b["recall"], b["specificity"]) == (a["specificity"], a["recall"])
    assert b["roc_auc"] == pytest.approx(a["roc_auc"])


def test_evaluate_unknown_class_is_named(trained_run, tmp_path, capsys, monkeypatch):
    _, run = trained_run
    other = make_kermany_folder(tmp_path / "other", 2, 2)
    (other / "PNEUMONIA").rename(other / "COVID")
    code, _, err = run_cli(["evaluate", run, other], capsys, monkeypatch)
    assert_user_error(code, err, "COVID")


def test_retrain_from_config_reproduces_metrics(trained_run, tmp_path, capsys, monkeypatch):
    _, run = trained_run
    again = tmp_path / "again"
    code, _, err = run_cli(["train", "--config", run / "config.yaml", "--out", again, "--quiet"],
                           capsys, monkeypatch)
    assert code == 0, err
    a = json.loads((run / "metrics.json").read_text())
    b = json.loads((again / "metrics.json").read_text())
    for k in ["accuracy", "roc_auc", "threshold", "confusion_matrix"]:
        assert a[k] == b[k], k
    assert (run / "history.csv").read_text().split("\n")[1].split(",")[1:3] == \
        (again / "history.csv").read_text().split("\n")[1].split(",")[1:3]


def test_models_lists_registry(capsys, monkeypatch):
    code, out, err = run_cli(["models", "--image-size", "64"], capsys, monkeypatch)
    assert code == 0, err
    for name in ["cnn", "resnet18", "resnet50"]:
        assert name in out
    code, out, _ = run_cli(["models", "cnn", "--summary", "--image-size", "64"], capsys,
                           monkeypatch)
    assert code == 0 and "Conv2d" in out


def test_data_summary_with_grid(kermany_folder, tmp_path, capsys, monkeypatch):
    grid = tmp_path / "grid.png"
    code, out, err = run_cli(["data", "summary", kermany_folder, "--grid", grid,
                              "--augment", "notebook"], capsys, monkeypatch)
    assert code == 0, err
    assert "NORMAL" in out and "PNEUMONIA" in out
    assert Image.open(grid).size[0] > 100


def test_data_summary_grid_shows_the_recipes_augmentation(kermany_folder, tmp_path, capsys,
                                                          monkeypatch):
    import cxrlab.data.audit
    from cxrlab.config import RunConfig

    seen = []
    real = cxrlab.data.audit.write_grid
    monkeypatch.setattr(cxrlab.data.audit, "write_grid",
                        lambda source, path, policy, **kw: (seen.append(policy),
                                                            real(source, path, policy, **kw)))
    code, _, err = run_cli(["data", "summary", kermany_folder, "--grid", tmp_path / "g.png"],
                           capsys, monkeypatch)
    assert code == 0, err
    assert seen == [RunConfig.model_fields["augment"].default] and (tmp_path / "g.png").is_file()


# ---------------------------------------------------------------------------------------
# bad input: one line, exit 2, no complete-looking run


def _train(args, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *args, "--out", run, *FAST], capsys, monkeypatch)
    return code, err, run


def test_missing_path(tmp_path, capsys, monkeypatch):
    code, err, run = _train([tmp_path / "nope"], tmp_path, capsys, monkeypatch)
    assert_user_error(code, err, "nope")
    assert not run.exists()


def test_empty_class_folder(kermany_folder, tmp_path, capsys, monkeypatch):
    (kermany_folder / "COVID").mkdir()
    code, err, run = _train([kermany_folder], tmp_path, capsys, monkeypatch)
    assert_user_error(code, err, "COVID")
    assert not run.exists()


def test_only_one_class(kermany_folder, tmp_path, capsys, monkeypatch):
    for f in (kermany_folder / "NORMAL").iterdir():
        f.unlink()
    (kermany_folder / "NORMAL").rmdir()
    code, err, run = _train([kermany_folder], tmp_path, capsys, monkeypatch)
    assert_user_error(code, err)
    assert "class" in err.lower()
    assert not run.exists()


def test_truncated_image_and_skip_bad(kermany_folder, tmp_path, capsys, monkeypatch, caplog):
    bad = kermany_folder / "NORMAL" / "IM-0900-0001.jpeg"
    buf = tmp_path / "full.jpeg"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(buf)
    bad.write_bytes(buf.read_bytes()[:200])
    code, err, run = _train([kermany_folder], tmp_path, capsys, monkeypatch)
    assert_user_error(code, err, "IM-0900-0001.jpeg", "--skip-bad")  # the way out, named
    assert not run.exists()
    code, _, err = run_cli(["train", kermany_folder, "--out", tmp_path / "ok", "--skip-bad",
                            "--model", "cnn", *FAST], capsys, monkeypatch)
    assert code == 0, err
    assert "IM-0900-0001.jpeg" in err + caplog.text  # listed as skipped
    split = (tmp_path / "ok" / "split.csv").read_text()
    assert "IM-0900-0001.jpeg" not in split


def test_non_image_with_image_extension(kermany_folder, tmp_path, capsys, monkeypatch):
    (kermany_folder / "PNEUMONIA" / "person9999_virus_1.png").write_text("not an image")
    code, err, run = _train([kermany_folder], tmp_path, capsys, monkeypatch)
    assert_user_error(code, err, "person9999_virus_1.png")
    assert not run.exists()


def test_csv_missing_column_and_missing_files(kermany_folder, tmp_path, capsys, monkeypatch):
    csv = kermany_folder / "meta.csv"
    csv.write_text("path,label\nNORMAL/IM-0000-0001.png,NORMAL\n")
    code, err, _ = _train([csv, "--image-col", "file", "--label-col", "label"], tmp_path,
                          capsys, monkeypatch)
    assert_user_error(code, err, "file")
    csv.write_text("path,label\nNORMAL/IM-0000-0001.png,NORMAL\nNORMAL/gone.png,NORMAL\n")
    code, err, run = _train([csv, "--image-col", "path", "--label-col", "label"], tmp_path,
                            capsys, monkeypatch)
    assert_user_error(code, err, "gone.png")
    assert not run.exists()


def test_unknown_model(kermany_folder, tmp_path, capsys, monkeypatch):
    code, err, run = _train([kermany_folder, "--model", "resnet1000"], tmp_path, capsys,
                            monkeypatch)
    assert_user_error(code, err, "resnet1000")
    assert not run.exists()


def test_image_smaller_than_16px(kermany_folder, tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(kermany_folder / "NORMAL" / "IM-0901-0001.png")
    code, err, run = _train([kermany_folder], tmp_path, capsys, monkeypatch)
    assert_user_error(code, err, "IM-0901-0001.png")
    assert not run.exists()


def test_out_dir_not_empty_is_refused(kermany_folder, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    keep = run / "precious.txt"
    keep.write_text("mine")
    code, _, err = run_cli(["train", kermany_folder, "--out", run, *FAST], capsys, monkeypatch)
    assert_user_error(code, err, "--out")
    assert keep.read_text() == "mine" and len(list(run.iterdir())) == 1


def test_bad_option_value(kermany_folder, tmp_path, capsys, monkeypatch):
    code, err, run = _train([kermany_folder, "--augment", "sideways"], tmp_path, capsys,
                            monkeypatch)
    assert_user_error(code, err, "augment")
    assert not run.exists()


# ---------------------------------------------------------------------------------------
# train's options mirror RunConfig

# RunConfig fields that `cxrlab train` deliberately has no flag for, and why.
NO_TRAIN_FLAG = {
    "fold": "set per run by --folds (each fold's run gets its own)",
    "continued": "written by --resume RUN --epochs N (training/continuation.py)",
    "split_seed": "set per member by --seeds: members keep their ensemble's validation split",
}
# Fields whose flag is named otherwise (field: the option's parameter name).
TRAIN_FLAG_NAME = {"loggers": "logger"}  # --logger, repeated, one logger each


def test_every_run_config_field_has_a_train_flag():
    # label_smoothing, channels_last, deterministic and threshold_rule had none: the CLI's
    # options are written out by hand and had drifted from RunConfig.
    from typer.main import get_command

    from cxrlab.cli import app
    from cxrlab.config import RunConfig

    params = {p.name: p for p in get_command(app).commands["train"].params}
    missing = [f for f in RunConfig.model_fields
               if TRAIN_FLAG_NAME.get(f, f) not in params and f not in NO_TRAIN_FLAG]
    assert not missing, f"RunConfig fields without a `cxrlab train` flag: {missing}"
    assert not set(NO_TRAIN_FLAG) & set(params)  # a listed field that got a flag: unlist it
    for name in ("channels_last", "deterministic"):  # booleans turn both ways
        opt = params[name]
        dashed = name.replace("_", "-")
        assert opt.opts == [f"--{dashed}"] and opt.secondary_opts == [f"--no-{dashed}"]


def test_new_train_flags_reach_the_run_config(kermany_folder, tmp_path, capsys, monkeypatch):
    import cxrlab.training.lifecycle

    seen = []
    monkeypatch.setattr(cxrlab.training.lifecycle, "train_run",
                        lambda cfg, *a, **kw: seen.append(cfg))
    monkeypatch.setattr("cxrlab.cli._print_result", lambda result: None)
    code, _, err = run_cli(["train", kermany_folder, "--out", tmp_path / "r",
                            "--label-smoothing", "0.1", "--no-channels-last",
                            "--no-deterministic", "--threshold-rule", "sensitivity"],
                           capsys, monkeypatch)
    assert code == 0, err
    (cfg,) = seen
    assert (cfg.label_smoothing, cfg.channels_last, cfg.deterministic, cfg.threshold_rule) == \
        (0.1, False, False, "sensitivity")
    code, _, err = run_cli(["train", kermany_folder, "--out", tmp_path / "r",
                            "--threshold-rule", "youden", "--target-sensitivity", "0.9"],
                           capsys, monkeypatch)
    assert_user_error(code, err, "--target-sensitivity", "--threshold-rule youden")
    code, _, err = run_cli(["train", kermany_folder, "--out", tmp_path / "r",
                            "--threshold-rule", "f1"], capsys, monkeypatch)
    assert_user_error(code, err, "--threshold-rule f1")


def _every_command(group, path=()):
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _every_command(cmd, (*path, name))
        else:
            yield (*path, name), cmd


def test_help_shows_flags_without_a_type_tag():
    """Typer 0.29 printed `<bool>` beside every flag (--help, --json, --skip-bad...), as if it
    took a value; options that take one keep their type."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from cxrlab.cli import app

    runner = CliRunner()
    flags = 0
    for path, cmd in _every_command(get_command(app)):
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "120", "NO_COLOR": "1"})
        assert result.exit_code == 0, (path, result.output)
        assert "<bool>" not in result.output, (path, result.output)
        flags += sum(getattr(p, "is_flag", False) for p in cmd.params)
    assert flags > 20  # the check saw flags
    result = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "120"})
    line = next(ln for ln in result.output.splitlines() if "--skip-bad" in ln)
    assert "unreadable" in line and "<" not in line
    assert "<path>" in next(ln for ln in result.output.splitlines() if "--cam" in ln)


def test_command_list_gives_each_command_one_line():
    """`cxrlab --help` lists each command by its docstring's first paragraph: a paragraph
    wrapped over two source lines showed as a ragged two- or three-line entry (evaluate,
    export, lr-find did)."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from cxrlab.cli import app

    for group_path in ((), ("data",)):
        result = CliRunner().invoke(app, [*group_path, "--help"],
                                    env={"COLUMNS": "120", "NO_COLOR": "1"})
        assert result.exit_code == 0, result.output
        panel = [line for line in result.output.split("Commands")[1].splitlines()
                 if line.startswith("│")]
        group = get_command(app)
        for name in group_path:
            group = group.commands[name]
        names = [n for n, c in group.commands.items() if not getattr(c, "hidden", False)]
        assert len(panel) == len(names), panel
        assert [line.split()[1] for line in panel] == names
