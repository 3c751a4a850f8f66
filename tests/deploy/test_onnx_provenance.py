"""An ONNX file is used only with the run it was exported from: a site-calibrated copy of a run
has the same classes and input, but other weights and threshold, so its original's file would
apply the new threshold to uncalibrated scores. Real Kermany X-rays, a tiny frozen run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from cxrlab.deploy.export import OnnxPredictor, export_onnx, make_predictor, weights_sha256
from cxrlab.errors import CxrlabError
from cxrlab.run import load_run, write_threshold
from tests.conftest import SHARED_DATA
from tests.test_cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Run A (12 films a class, 64 px, frozen EfficientNet-Lite0), its fp32 and int8 files,
    and run B: A site-calibrated on 10 other films a class (`cxrlab calibrate`)."""
    from cxrlab.config import RunConfig
    from cxrlab.deploy.quantize import export_int8
    from cxrlab.site.calibration import calibrate_run
    from cxrlab.training.lifecycle import train_run

    train = SHARED_DATA / "chest_xray" / "train"
    if not train.is_dir():
        pytest.skip("../shared/data is not present")
    root = tmp_path_factory.mktemp("provenance")
    for c in ("NORMAL", "PNEUMONIA"):
        files = sorted((train / c).glob("*.jpeg"))
        for name, part in (("data", files[:12]), ("site", files[12:22])):
            (root / name / c).mkdir(parents=True)
            for f in part:
                (root / name / c / f.name).symlink_to(f)
    cfg = RunConfig.build(dict(data=str(root / "data"), model="efficientnet_lite0",
                               image_size=64, batch_size=8, epochs=2, lr=3e-2,
                               freeze_backbone=True, augment="none"), source="option")
    train_run(cfg, root / "a", progress=False)
    calibrate_run(root / "a", root / "site", root / "b", n_boot=50)
    return {"a": root / "a", "b": root / "b", "site": root / "site",
            "film": next((root / "site" / "PNEUMONIA").iterdir()),
            "onnx": export_onnx(root / "a", root / "a.onnx"),
            "int8": export_int8(root / "a", root / "a-int8.onnx", calibration_images=4)[0]}


def meta(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


def test_export_records_the_weights_and_int8_carries_them(runs):
    a, b = load_run(runs["a"]), load_run(runs["b"])
    # B is what the check must catch: the same shape as A, other weights and threshold
    assert (a.classes, a.config.image_size, a.info.in_chans) == \
        (b.classes, b.config.image_size, b.info.in_chans)
    assert weights_sha256(a.model) != weights_sha256(b.model) and a.threshold != b.threshold
    fp32, int8 = meta(runs["onnx"]), meta(runs["int8"])
    assert fp32["weights_sha256"] == weights_sha256(a.model)
    assert len(fp32["weights_sha256"]) == 64
    assert int8["precision"] == "int8"
    assert int8["weights_sha256"] == fp32["weights_sha256"]
    assert float(int8["threshold"]) == a.threshold
    # the weights themselves, not model.pt's bytes: a fresh load hashes the same
    assert weights_sha256(load_run(runs["a"]).model) == fp32["weights_sha256"]


@pytest.mark.parametrize("kind", ["onnx", "int8"])
def test_another_runs_file_is_refused_by_the_api(runs, kind):
    from cxrlab.api import Run
    from cxrlab.deploy.serve import create_app
    from cxrlab.site.assess import evaluate_run

    f, b = runs[kind], runs["b"]
    want = f"--onnx {f}: exported from other weights"
    with pytest.raises(CxrlabError, match="other weights") as e:
        make_predictor(load_run(b), "onnx", f)
    msg = str(e.value)
    assert msg.startswith(want) and str(b / "model.pt") in msg and "\n" not in msg
    assert "'a'" in msg  # the run it came from
    with pytest.raises(CxrlabError, match="other weights"):
        Run(b).predict(runs["film"], backend="onnx", onnx=f)
    with pytest.raises(CxrlabError, match="other weights"):
        evaluate_run(b, runs["site"], onnx=f, n_boot=10)
    with pytest.raises(CxrlabError, match="other weights"):
        create_app(b, onnx=f)


def test_another_runs_file_is_refused_by_the_cli(runs, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # never serve, if not refused
    f, b = runs["onnx"], runs["b"]
    for args in (["predict", b, runs["film"], "--backend", "onnx", "--onnx", f],
                 ["evaluate", b, runs["site"], "--onnx", f],
                 ["serve", b, "--onnx", f],
                 ["predict", b, runs["film"], "--backend", "onnx", "--onnx", runs["int8"]]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert_user_error(code, err, f"--onnx {args[-1]}", str(b / "model.pt"), "cxrlab export")


def test_the_runs_own_files_are_accepted(runs, capsys, monkeypatch):
    a = runs["a"]
    for f in (runs["onnx"], runs["int8"]):
        code, out, err = run_cli(["predict", a, runs["film"], "--backend", "onnx", "--onnx", f,
                                  "--json"], capsys, monkeypatch)
        assert code == 0, err
        assert json.loads(out)["threshold"] == load_run(a).threshold
    # and B's own export with B
    own = export_onnx(runs["b"], runs["b"].parent / "b.onnx", overwrite=True)
    make_predictor(load_run(runs["b"]), "onnx", own)


def test_a_file_without_a_hash_is_refused(runs, tmp_path):
    """Exported before the hash was recorded: nothing tells it from another run's file (the
    very case above), and exporting again takes one command, so it is refused."""
    proto = onnx.load(runs["onnx"])
    keep = [p for p in proto.metadata_props if p.key != "weights_sha256"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    old = tmp_path / "old.onnx"
    onnx.save(proto, old)
    with pytest.raises(CxrlabError, match="records no hash") as e:
        make_predictor(load_run(runs["a"]), "onnx", old)
    assert f"cxrlab export {runs['a']} --onnx" in str(e.value)
    assert str(runs["a"] / "model.pt") in str(e.value)


def test_a_changed_threshold_is_refused(runs, tmp_path):
    """Same weights, threshold file changed since the export: the file's threshold is stale."""
    copy = tmp_path / "a2"
    shutil.copytree(runs["a"], copy)
    write_threshold(copy, 0.25)
    with pytest.raises(CxrlabError, match="records threshold") as e:
        make_predictor(load_run(copy), "onnx", runs["onnx"])
    assert str(copy / "threshold") in str(e.value) and "0.25" in str(e.value)
    assert OnnxPredictor(runs["onnx"]).weights_sha256 == weights_sha256(load_run(copy).model)
