"""--logger tensorboard/csv/mlflow: the numbers read back from each store equal the run's own
files (history.csv, metrics.json, the PNGs), resume keeps logging to the same place, and a
missing package is one line before anything is written."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_kermany_folder
from tests.test_cli import assert_user_error, run_cli

pytest.importorskip("tensorboard", reason="the tracking extra is not installed")
pytest.importorskip("mlflow", reason="the tracking extra is not installed")

FAST = ["--model", "cnn", "--image-size", "32", "--batch-size", "8", "--quiet"]
LOGGERS = ["--logger", "tensorboard", "--logger", "mlflow,csv"]


def history(run: Path, col: str) -> list[float]:
    with (run / "history.csv").open() as f:
        return [float(r[col]) for r in csv.DictReader(f)]


def tb_scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def mlflow_client(run: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run / "mlruns").as_uri())


@pytest.fixture(autouse=True)
def _no_outside_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.timeout(300)
def test_three_loggers_hold_the_runs_numbers(tmp_path, capsys, monkeypatch):
    data = make_kermany_folder(tmp_path / "data", 12, 12, size=32)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", data, "--out", run, *FAST, "--epochs", "2", "--lr", "0.002",
                            *LOGGERS], capsys, monkeypatch)
    assert code == 0, err
    val_auc = history(run, "val_auc")
    assert len(val_auc) == 2
    metrics = json.loads((run / "metrics.json").read_text())

    # TensorBoard: one val_auc per epoch, the history's values; final metrics and the plots
    assert tb_scalars(run, "val_auc") == pytest.approx(val_auc, rel=1e-6)
    assert tb_scalars(run, "train_loss") == pytest.approx(history(run, "train_loss"), rel=1e-6)
    assert tb_scalars(run, "final/roc_auc") == pytest.approx([metrics["roc_auc"]], rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "plots/curves" in acc.Tags()["images"]

    # MLflow: one run, named after the run directory, with params, metrics and artifacts
    client = mlflow_client(run)
    exp = client.get_experiment_by_name("cxrlab")
    (mr,) = client.search_runs([exp.experiment_id])
    tracking = json.loads((run / "tracking.json").read_text())
    assert tracking["mlflow"] == {"tracking_uri": None, "run_id": mr.info.run_id}
    assert mr.info.run_name == "run" and mr.info.status == "FINISHED"
    assert mr.data.params["model"] == "cnn" and float(mr.data.params["lr"]) == 0.002
    steps = client.get_metric_history(mr.info.run_id, "val_auc")
    assert [m.value for m in sorted(steps, key=lambda m: m.step)] == pytest.approx(val_auc,
                                                                                  rel=1e-6)
    assert mr.data.metrics["final/roc_auc"] == pytest.approx(metrics["roc_auc"])
    assert mr.data.metrics["final/ci/roc_auc/0"] == pytest.approx(metrics["ci"]["roc_auc"][0])
    arts = {a.path for a in client.list_artifacts(mr.info.run_id)}
    pngs = {p.name for p in run.glob("*.png")}
    assert "curves.png" in pngs and pngs | {"metrics.json", "config.yaml"} <= arts

    # Lightning's CSV: the same per-epoch values and the config
    with (run / "csv-logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_auc"]) for r in rows if r["val_auc"]] == pytest.approx(val_auc)
    assert "model: cnn" in (run / "csv-logs" / "hparams.yaml").read_text()

    # a sweep continued with other loggers, or over runs saved before `loggers` existed,
    # finds this run complete: tracking does not change a run
    from cxrlab.config import RunConfig
    from cxrlab.run import run_state

    cfg = RunConfig.load(run / "config.yaml")
    assert run_state(run, cfg.model_copy(update={"loggers": []})) == "complete"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["loggers"]
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    assert run_state(run, RunConfig.build({**cfg.model_dump(), "loggers": []})) == "complete"


@pytest.mark.timeout(300)
def test_resume_logs_to_the_same_places(tmp_path, capsys, monkeypatch):
    """A run that failed in its second epoch, resumed: one MLflow run, one TensorBoard
    folder and one metrics.csv hold both epochs, equal to history.csv."""
    from cxrlab.training import loop as train

    data = make_kermany_folder(tmp_path / "data", 12, 12, size=32)
    run = tmp_path / "run"
    step = train.ClassifierModule.training_step

    def failing_step(self, batch, batch_idx):
        if self.current_epoch == 1:
            raise RuntimeError("power cut")
        return step(self, batch, batch_idx)

    monkeypatch.setattr(train.ClassifierModule, "training_step", failing_step)
    with pytest.raises(RuntimeError, match="power cut"):
        run_cli(["train", data, "--out", run, *FAST, "--epochs", "2", *LOGGERS], capsys,
                monkeypatch)
    assert json.loads((run / "run.json").read_text())["state"] == "failed"
    run_id = json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
    monkeypatch.setattr(train.ClassifierModule, "training_step", step)
    code, _, err = run_cli(["train", "--resume", run, "--quiet"], capsys, monkeypatch)
    assert code == 0, err

    val_auc = history(run, "val_auc")
    assert len(val_auc) == 2
    assert tb_scalars(run, "val_auc") == pytest.approx(val_auc, rel=1e-6)
    client = mlflow_client(run)
    (mr,) = client.search_runs([client.get_experiment_by_name("cxrlab").experiment_id])
    assert mr.info.run_id == run_id and mr.info.status == "FINISHED"
    steps = client.get_metric_history(run_id, "val_auc")
    assert [m.value for m in sorted(steps, key=lambda m: m.step)] == pytest.approx(val_auc,
                                                                                  rel=1e-6)
    with (run / "csv-logs" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["val_auc"]) for r in rows if r["val_auc"]] == pytest.approx(val_auc)


def test_missing_package_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    data = make_kermany_folder(tmp_path / "data", 4, 4, size=32)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    run = tmp_path / "run"
    code, _, err = run_cli(["train", data, "--out", run, *FAST, "--logger", "mlflow"],
                           capsys, monkeypatch)
    assert_user_error(code, err, "--logger mlflow", "pip install mlflow-skinny")
    assert not run.exists()


def test_unknown_logger_is_refused(tmp_path, capsys, monkeypatch):
    data = make_kermany_folder(tmp_path / "data", 4, 4, size=32)
    code, _, err = run_cli(["train", data, "--out", tmp_path / "run", *FAST,
                            "--logger", "tensorboard,wandb"], capsys, monkeypatch)
    assert_user_error(code, err, "loggers", "wandb", "tensorboard, csv, mlflow")
    assert not (tmp_path / "run").exists()


def test_mlflow_uri_with_folds_is_refused_not_ignored(tmp_path, capsys, monkeypatch):
    data = make_kermany_folder(tmp_path / "data", 6, 6, size=32)
    code, _, err = run_cli(["train", data, "--out", tmp_path / "cv", *FAST, "--folds", "2",
                            "--logger", "mlflow", "--mlflow-uri", (tmp_path / "m").as_uri()],
                           capsys, monkeypatch)
    assert_user_error(code, err, "--mlflow-uri", "MLFLOW_TRACKING_URI")
    assert not (tmp_path / "cv").exists()
