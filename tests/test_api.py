"""The public Python API, used as a notebook user would: `import cxrlab` names only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

import cxrlab
from tests.conftest import make_kermany_folder

TINY = dict(model="cnn", image_size=32, epochs=2, augment="none", batch_size=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    data = make_kermany_folder(root / "xray", size=48)
    run = cxrlab.train(data, root / "a", **TINY)
    return root, data, run


def test_train_returns_the_run_it_wrote(trained, capfd):
    root, data, run = trained
    assert isinstance(run, cxrlab.Run)
    assert run.path == root / "a"
    assert run.classes == ["NORMAL", "PNEUMONIA"]
    assert run.positive_class == "PNEUMONIA"
    assert run.config.image_size == 32 and run.config.model == "cnn"
    assert run.config.epochs == 2 and run.config.optimizer == "adamw"  # the CLI's defaults
    assert 0 < run.threshold < 1
    assert set(run.metrics) >= {"roc_auc", "accuracy", "ci", "n", "confusion_matrix"}
    assert run.metrics["n"] == sum(map(sum, run.metrics["confusion_matrix"]))
    history = run.history
    assert isinstance(history, list) and len(history) == 2  # one row per epoch
    assert all(isinstance(row["val_loss"], float) for row in history)
    try:
        import pandas  # noqa: F401  (optional: not a dependency)
    except ImportError:
        with pytest.raises(cxrlab.CxrlabError, match="pandas is not installed"):
            history.to_pandas()
    else:
        assert len(history.to_pandas()) == 2
    assert "<table" in history._repr_html_()
    again = cxrlab.load(run.path)
    assert again.metrics == run.metrics and again.threshold == run.threshold
    capfd.readouterr()


def test_the_contract_names_are_callables_with_their_signatures():
    import importlib
    import inspect

    assert {"train", "load", "compare", "ablate", "data_summary", "Run", "Metrics",
            "CxrlabError"} <= set(cxrlab.__all__)
    assert list(inspect.signature(cxrlab.train).parameters) == [
        "data", "out", "progress", "resume", "options"]
    assert "spec" in inspect.signature(cxrlab.ablate).parameters
    assert "run_b" in inspect.signature(cxrlab.compare).parameters
    # the modules behind them have other names, so importing one never rebinds a function
    for module in ("evaluation.ablation", "evaluation.comparison", "training", "training.loop"):
        importlib.import_module(f"cxrlab.{module}")

    assert callable(cxrlab.train) and callable(cxrlab.compare) and callable(cxrlab.ablate)
    assert cxrlab.train is cxrlab.api.train


def test_options_are_checked_like_the_cli(trained, tmp_path):
    _, data, _ = trained
    with pytest.raises(cxrlab.CxrlabError, match="imagesize: .*did you mean image_size"):
        cxrlab.train(data, tmp_path / "x", imagesize=32)
    with pytest.raises(cxrlab.CxrlabError, match="image_size"):
        cxrlab.train(data, tmp_path / "x", model="cnn", image_size=8)
    with pytest.raises(cxrlab.CxrlabError, match="pretrained and no_pretrained"):
        cxrlab.train(data, tmp_path / "x", pretrained="w.pt", no_pretrained=True)
    with pytest.raises(cxrlab.CxrlabError, match="not a cxrlab run directory"):
        cxrlab.load(tmp_path)
    with pytest.raises(cxrlab.CxrlabError, match="data: give a dataset"):
        cxrlab.train()
    _, _, run = trained
    with pytest.raises(cxrlab.CxrlabError, match="already complete"):
        cxrlab.train(resume=run.path)
    # fewer epochs than it has trained: refused (more would continue it: test_continue.py)
    with pytest.raises(cxrlab.CxrlabError, match="epochs 1: .* continuing needs more than"):
        cxrlab.train(resume=run.path, epochs=1)
    assert not (tmp_path / "x").exists()


def test_evaluate_returns_metrics_with_intervals(trained):
    root, _, run = trained
    m = run.evaluate(make_kermany_folder(root / "held", size=48, seed=3))  # images not trained on
    assert isinstance(m, cxrlab.Metrics) and isinstance(m, dict)
    assert m["n"] == 24 and m["threshold"] == run.threshold
    lo, hi = m["ci"]["roc_auc"]
    assert lo <= m["roc_auc"] <= hi
    assert "ROC AUC" in repr(m) and "95% CI" in repr(m)
    html = m._repr_html_()
    assert "<table" in html and f"{lo:.3f} – {hi:.3f}" in html


def test_predict_paths_folders_pil_and_arrays_agree(trained, tmp_path):
    _, data, run = trained
    files = sorted((data / "NORMAL").glob("*.png"))
    by_path = run.predict([files[0], str(files[1])])
    assert [r["path"] for r in by_path] == [str(files[0]), str(files[1])]
    folder = run.predict(data / "NORMAL")
    assert [r["path"] for r in folder] == [str(f) for f in files]
    assert folder[0]["probabilities"] == by_path[0]["probabilities"]

    with Image.open(files[0]) as im:
        pil = im.copy()
    grey8 = np.asarray(pil.convert("L"))
    rgb8 = np.asarray(pil.convert("RGB"))
    grey16 = grey8.astype(np.uint16) * 16 + 7  # a 12-bit image
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(rgb8).save(tmp_path / "rgb.png")
    rows = run.predict([pil, grey8, rgb8, grey16, tmp_path / "g16.png", tmp_path / "rgb.png"])
    assert [r["path"] for r in rows[:4]] == ["<PIL 0>", "<array 1>", "<array 2>", "<array 3>"]
    p = [r["probabilities"] for r in rows]
    assert p[0] == p[1] == by_path[0]["probabilities"]
    assert p[3] == p[4]  # uint16 array == its 16-bit PNG
    assert p[2] == p[5]
    assert all(r["class"] in run.classes and r["threshold"] == run.threshold for r in rows)
    one = run.predict(grey8)  # a single image, not a list
    assert one[0]["probabilities"] == p[1]
    with pytest.raises(cxrlab.CxrlabError, match="uint8 or uint16"):
        run.predict(grey8.astype(np.float32))
    with pytest.raises(cxrlab.CxrlabError, match="no such file"):
        run.predict(tmp_path / "missing.png")


def test_gradcam_export_and_report(trained, tmp_path):
    _, data, run = trained
    f = sorted((data / "PNEUMONIA").glob("*.png"))[0]
    heat = run.gradcam(f)
    assert heat.shape == (32, 32) and 0 <= heat.min() and heat.max() <= 1
    with Image.open(f) as im:
        assert np.allclose(run.gradcam(np.asarray(im.convert("L"))), heat, atol=1e-5)
    assert isinstance(run.show_gradcam(f), Figure)
    onnx = run.export_onnx(tmp_path / "m.onnx")
    assert onnx.stat().st_size > 0
    assert run.predict(f, backend="onnx", onnx=onnx)[0]["class"] == run.predict(f)[0]["class"]
    page = run.report(tmp_path / "r.html")
    assert page.read_text().startswith("<!DOCTYPE html>")


def test_figures_and_displays(trained):
    _, _, run = trained
    for fig in (run.plot_history(), run.plot_roc(), run.plot_confusion(),
                run.show_predictions(), run.show_predictions(wrong_first=False)):
        assert isinstance(fig, Figure) and fig.axes
    assert repr(run).startswith(f"Run('{run.path}': cnn, 32 px")
    assert "95% CI" in run._repr_html_()


def test_compare_a_second_run_trained_quietly_into_a_new_folder(trained, monkeypatch, capfd):
    root, data, run = trained
    monkeypatch.chdir(root)
    capfd.readouterr()
    other = cxrlab.train(data, **{**TINY, "epochs": 1, "lr": 3e-3})  # cxrlab.train, again
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # nothing prints unless asked
    assert other.path.parent == Path("runs") and other.path.name.startswith("xray-")
    assert (root / other.path / "model.pt").is_file()
    result = cxrlab.compare(run, other.path, n_boot=200)
    assert isinstance(result, cxrlab.Comparison) and result["n"] == run.metrics["n"]
    auc = next(r for r in result["rows"] if r["metric"] == "roc_auc")
    assert auc["difference"] == pytest.approx(auc["b"] - auc["a"])
    same = cxrlab.compare(run, run, n_boot=200)
    assert all(r["difference"] == 0 and r["verdict"] != "B better" for r in same["rows"])
    assert "B − A" in repr(result) and "95% CI (paired)" in result._repr_html_()


def test_data_summary(trained):
    _, data, _ = trained
    s = cxrlab.data_summary(data)
    assert s.n_images == 24 and s.classes == ["NORMAL", "PNEUMONIA"]
    assert "NORMAL" in repr(s) and "<table" in s._repr_html_()


def test_ablate_from_a_dict(trained):
    root, data, _ = trained
    spec = {"base": {"data": str(data), **{**TINY, "epochs": 1}},
            "factors": {"lr": [1e-3, 3e-3]}, "seeds": 1, "name": "lr"}
    sweep = cxrlab.ablate(spec, root / "sweep")
    assert isinstance(sweep, cxrlab.Sweep) and sweep.path == root / "sweep"
    assert sweep["complete"] == sweep["planned"] == 2
    assert [v["variant"] for v in sweep["variants"]] == ["lr-0.001", "lr-0.003"]
    assert "<table" in sweep._repr_html_() and "lr:" in repr(sweep)
    with pytest.raises(cxrlab.CxrlabError, match="factors"):
        cxrlab.ablate({"base": {"data": str(data)}, "factors": {}}, root / "bad")
