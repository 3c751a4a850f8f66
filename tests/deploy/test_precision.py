"""One precision from the threshold to the decision: a run trained in bf16 autocast on a machine
with bf16 is evaluated, predicted, served and reported elsewhere exactly as it judged itself."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrlab.config import RunConfig
from cxrlab.data.cache import load_images
from cxrlab.deploy.inference import decide, predict_probs
from cxrlab.deploy.serve import Inference
from cxrlab.reporting.report import recompute_val_predictions
from cxrlab.run import load_run, read_predictions, read_split_csv
from cxrlab.training import loop as train
from cxrlab.training.lifecycle import train_run
from tests.conftest import make_kermany_folder
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> Path:
    """The default recipe's head epoch, `precision: auto` on a (simulated) bf16 machine: it
    trains in bf16 autocast, which torch also runs, in software, on CPUs without bf16."""
    root = tmp_path_factory.mktemp("precision")
    data = make_kermany_folder(root / "data", 20, 20, size=32, images_per_patient=1)
    cfg = RunConfig(data=str(data), image_size=32, epochs=1, batch_size=32, lr=0.01)
    assert cfg.precision == "auto"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "use_bf16", lambda precision, model=None: precision != "fp32")
        res = train_run(cfg, root / "run", progress=False)
    assert res.epochs == 1
    return root / "run"


@pytest.fixture
def other_machine(monkeypatch):
    """A CPU without bf16: `auto` resolves to fp32 here."""
    monkeypatch.setattr(train, "use_bf16", lambda precision, model=None: precision == "bf16")


def val_images(run: Path) -> tuple[list[Path], np.ndarray]:
    rows = [r for r in read_split_csv(run / "split.csv") if r["split"] == "val"]
    paths = [Path(r["path"]) for r in rows]
    images, _ = load_images(paths, 32, 1, cache_dir=None)
    return paths, images


def test_evaluate_on_the_validation_images_reproduces_metrics_json(
        bf16_run, other_machine, tmp_path, capsys, monkeypatch):
    run = bf16_run
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["train_precision"] == "bf16"  # what `auto` resolved to, on record
    loaded = load_run(run)
    _, y, probs = read_predictions(run / "val_predictions.csv", loaded.classes)
    # decisions are rounding-proof: no validation score sits within rounding of the threshold
    assert np.abs(probs[:, 1] - loaded.threshold).min() > 1e-4
    val_csv = tmp_path / "val.csv"
    with val_csv.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([r["path"], r["label"]] for r in read_split_csv(run / "split.csv")
                    if r["split"] == "val")
    code, _, err = run_cli(["evaluate", run, val_csv, "--image-col", "path", "--label-col",
                            "label", "--json", tmp_path / "m.json"], capsys, monkeypatch)
    assert code == 0, err
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["n"] == saved["n"] == len(y)
    assert again["confusion_matrix"] == saved["confusion_matrix"]  # the same decisions
    assert again["threshold"] == saved["threshold"]
    for k in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
        assert again[k] == pytest.approx(saved[k], abs=1e-12), k


def test_predict_serve_and_report_give_the_runs_own_scores(bf16_run, other_machine, capsys,
                                                            monkeypatch):
    run = bf16_run
    loaded = load_run(run)
    paths, y, probs = read_predictions(run / "val_predictions.csv", loaded.classes)
    assert [str(p) for p in val_images(run)[0]] == paths
    code, out, err = run_cli(["predict", run, *paths, "--json"], capsys, monkeypatch)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    predicted = np.array([[r["probabilities"][c] for c in loaded.classes] for r in rows])
    # predict rounds to 6 decimals; bf16 moved these scores by ~1e-3
    assert np.abs(predicted - probs).max() < 2e-6
    expected = decide(probs, loaded.info.positive, loaded.threshold)
    assert [r["class"] for r in rows] == [loaded.classes[k] for k in expected]

    _, images = val_images(run)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what bf16 inference would have said
        assert np.abs(predict_probs(loaded.model, images) - probs).max() > 1e-4
    served = Inference(run)
    assert np.abs(np.stack([served.probabilities(im) for im in images]) - probs).max() < 1e-6
    _, _, reported = recompute_val_predictions(run, read_split_csv(run / "split.csv"))
    assert np.abs(reported - probs).max() < 1e-6


def test_auto_trains_efficientnet_in_fp32_on_a_bf16_cpu_and_resnet_in_bf16(monkeypatch):
    """Measured: EfficientNet-Lite's depthwise steps ran faster in fp32 on a bf16 CPU."""
    from cxrlab.deploy.inference import use_bf16
    from cxrlab.models import create_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    lite, resnet = create_model("efficientnet_lite0", 2), create_model("resnet18", 2)
    assert not use_bf16("auto", lite)
    assert use_bf16("auto", resnet)
    assert use_bf16("auto")  # no model: the CPU decides
    assert use_bf16("bf16", lite) and not use_bf16("fp32", resnet)  # asked for: as asked
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not use_bf16("auto", resnet)
