"""Experiment tracking people already use: Lightning's own TensorBoard, CSV and MLflow loggers.

Each writes inside the run directory by default, so a run stays one folder that can be copied:

    tb/         TensorBoard event files: per-epoch curves, the config and final metrics in the
                HParams tab, the run's PNG plots in the Images tab
    csv-logs/   Lightning's metrics.csv and hparams.yaml
    mlruns/     an MLflow file store (experiment "cxrlab"): params, metrics, plots as artifacts

MLflow goes elsewhere when given a tracking URI (`--mlflow-uri`, else MLFLOW_TRACKING_URI).
`tracking.json` remembers that URI and the MLflow run id, so `cxrlab train --resume` keeps
logging to the same run. Lightning logs from rank 0 only under data-parallel training.
"""

from __future__ import annotations

import csv
import importlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from PIL import Image

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError
from cxrlab.run import write_json

log = logging.getLogger("cxrlab")
TRACKING_FILE = "tracking.json"
EXPERIMENT = "cxrlab"
# logger -> (modules any one of which Lightning can use, what to pip install)
NEEDS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow-skinny"),
}


def check_available(names: list[str]) -> None:
    """Refuse a logger whose package is missing before anything is written."""
    for name in names:
        if name not in NEEDS:
            continue
        modules, pip_name = NEEDS[name]
        if not any(_importable(m) for m in modules):
            raise CxrlabError(f"--logger {name}: the {modules[0]} package is not installed "
                              f"(pip install {pip_name}, or pip install 'cxrlab[tracking]')")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def make_loggers(config: RunConfig, run_dir: Path, mlflow_uri: str | None = None,
                 rank0: bool = True) -> list:
    """The run's Lightning loggers; a run directory with tracking.json continues its MLflow run.

    The config is logged as hyper-parameters when the run starts (not again on resume: MLflow
    params cannot change, and the resumed config is the same run).
    """
    if not config.loggers:
        return []
    check_available(config.loggers)
    run_dir = Path(run_dir)
    path = run_dir / TRACKING_FILE
    saved = json.loads(path.read_text()) if path.is_file() else None
    loggers: list = []
    state: dict[str, Any] = {"loggers": list(config.loggers)}
    for name in config.loggers:
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, name="tb", version="",
                                             default_hp_metric=False))
        elif name == "csv":
            loggers.append(_csv_logger(run_dir))
        elif name == "mlflow" and rank0:  # Lightning logs from rank 0 only
            old = (saved or {}).get("mlflow") or {}
            uri = old.get("tracking_uri") if saved else (
                mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None)
            logger = _mlflow_logger(run_dir, uri, old.get("run_id"))
            loggers.append(logger)
            state["mlflow"] = {"tracking_uri": uri, "run_id": logger.run_id}
    if rank0:
        if saved is None:
            params = config.model_dump()
            for logger in loggers:
                logger.log_hyperparams(params)

        write_json(path, state)
    return loggers


def _csv_logger(run_dir: Path):
    """Lightning's CSVLogger in RUN_DIR/csv-logs, appending on resume.

    Lightning deletes an existing metrics.csv when its writer starts; the rows written before
    the resume are put back, and the writer continues under the same header.
    """
    logger = CSVLogger(run_dir, name="csv-logs", version="")
    path = Path(logger.log_dir) / "metrics.csv"
    old = path.read_bytes() if path.is_file() else None
    writer = logger.experiment  # deletes metrics.csv
    if old and getattr(writer, "metrics_file_path", None):
        path.write_bytes(old)
        with path.open(newline="") as f:
            writer.metrics_keys = list(csv.DictReader(f).fieldnames or [])
    return logger


def _mlflow_logger(run_dir: Path, uri: str | None, run_id: str | None):
    """MLflow's file store in RUN_DIR/mlruns unless a tracking URI is given.

    MLflow 3 keeps its file store in maintenance mode behind MLFLOW_ALLOW_FILE_STORE; it is
    what needs no server and no database here (a fresh SQLite store took ~20 s to create).
    """
    if uri is None:
        uri = (run_dir.absolute() / "mlruns").as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # "Experiment with name cxrlab not found. Creating it." is not news
    logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)
    try:
        return MLFlowLogger(experiment_name=EXPERIMENT, run_name=run_dir.name, tracking_uri=uri,
                            run_id=run_id, tags={"cxrlab.run_dir": str(run_dir.absolute())})
    except Exception as e:  # mlflow's own errors: unreachable server, bad URI
        raise CxrlabError(f"--mlflow-uri {uri}: {str(e).splitlines()[0]}") from None


def flat_numbers(d: Any, prefix: str = "") -> dict[str, float]:
    """metrics.json as name -> number ('ci/roc_auc/0'); strings and None left out."""
    out: dict[str, float] = {}
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict | list):
            out.update(flat_numbers(v, key + "/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def log_final(loggers: list, run_dir: Path, metrics: dict, epochs: int) -> None:
    """After the run is written: final metrics ('final/...'), and the plots and metrics.json.

    TensorBoard gets the config with the final metrics as one HParams entry and each PNG as
    an image; MLflow gets the PNGs, metrics.json and config.yaml as artifacts.
    """
    if not loggers:
        return
    final = flat_numbers(metrics, "final/")
    pngs = sorted(Path(run_dir).glob("*.png"))
    for logger in loggers:
        try:
            _log_final_one(logger, run_dir, final, pngs, epochs)
        except Exception as e:  # the run itself is complete and written; say what is missing
            log.warning("--logger %s: final metrics and plots not logged (%s: %s)",
                        type(logger).__name__, type(e).__name__, e)


def _log_final_one(logger, run_dir: Path, final: dict[str, float], pngs: list[Path],
                   epochs: int) -> None:
    if isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(RunConfig.load(run_dir / "config.yaml").model_dump(),
                               metrics=final)
        for png in pngs:
            img = np.asarray(Image.open(png).convert("RGB"))
            logger.experiment.add_image(f"plots/{png.stem}", img, epochs,
                                        dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        logger.log_metrics(final, step=epochs)
        for f in [*pngs, run_dir / "metrics.json", run_dir / "config.yaml"]:
            if f.is_file():
                logger.experiment.log_artifact(logger.run_id, str(f))
    elif isinstance(logger, CSVLogger):
        logger.log_metrics(final, step=epochs)
    logger.finalize("success")
