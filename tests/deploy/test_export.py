"""ONNX export and ONNX Runtime inference agree with torch on real chest X-rays."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cxrlab.cli import main
from cxrlab.config import RunConfig
from cxrlab.data.cache import load_images
from cxrlab.deploy.export import OnnxPredictor, export_onnx, make_predictor
from cxrlab.deploy.inference import decide, predict_probs
from cxrlab.deploy.predict import predict_paths
from cxrlab.errors import CxrlabError
from cxrlab.run import load_run, read_predictions
from cxrlab.training.lifecycle import train_run
from tests.conftest import SHARED_DATA


@pytest.fixture(scope="module")
def real_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny resnet18 trained on 16 real Kermany X-rays (symlinked), 64 px, one epoch, in bf16
    autocast (emulated where the CPU has no bf16): inference must still decide in fp32. Each
    image is standardised in the model (intensity="image"): the ONNX file must do it too."""
    train = SHARED_DATA / "chest_xray" / "train"
    if not train.is_dir():
        pytest.skip("../shared/data is not present")
    root = tmp_path_factory.mktemp("export")
    picked = []
    for cls in ("NORMAL", "PNEUMONIA"):
        files = sorted((train / cls).glob("*.jpeg"))[:8]
        (root / "data" / cls).mkdir(parents=True)
        for f in files:
            (root / "data" / cls / f.name).symlink_to(f)
            picked.append(root / "data" / cls / f.name)
    cfg = RunConfig(data=str(root / "data"), model="resnet18", image_size=64, epochs=1,
                    batch_size=8, precision="bf16", intensity="image")
    train_run(cfg, root / "run", progress=False)
    return root / "run", picked


@pytest.fixture(scope="module")
def exported(real_run, tmp_path_factory) -> Path:
    return export_onnx(real_run[0], tmp_path_factory.mktemp("onnx") / "model.onnx")


def cli(args, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["cxrlab", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_export_writes_metadata(real_run, tmp_path, monkeypatch, capsys):
    run, _ = real_run
    out = tmp_path / "m.onnx"
    code, stdout, err = cli(["export", run, "--onnx", out], monkeypatch, capsys)
    assert code == 0, err
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    loaded = load_run(run)
    assert json.loads(meta["classes"]) == ["NORMAL", "PNEUMONIA"]
    assert meta["positive_class"] == "PNEUMONIA"
    assert float(meta["threshold"]) == loaded.threshold
    assert meta["image_size"] == "64" and meta["in_chans"] == "1" and meta["model"] == "resnet18"
    assert "uint8" in meta["input_spec"] and "resize" in meta["preprocessing"]
    inp = proto.graph.input[0]
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    # never overwrites: a second export to the same file is refused, the file kept
    before = out.read_bytes()
    code, _, err = cli(["export", run, "--onnx", out], monkeypatch, capsys)
    assert code == 2 and "file exists" in err and out.read_bytes() == before


def test_onnx_runtime_equals_torch_fp32(real_run, exported):
    run, files = real_run
    loaded = load_run(run)
    images, _ = load_images(files, 64, 1, cache_dir=None)
    torch_p = predict_probs(loaded.model, images)
    ort = OnnxPredictor(exported)
    onnx_p = ort(images)
    assert onnx_p.shape == (16, 2)
    assert np.abs(onnx_p - torch_p).max() < 1e-4
    assert np.abs(ort(images[:1]) - torch_p[:1]).max() < 1e-4  # any batch size
    assert np.allclose(onnx_p.sum(1), 1, atol=1e-5)
    assert ort.threshold == loaded.threshold and ort.positive == 1


def test_predict_backend_onnx(real_run, exported, monkeypatch, capsys):
    run, files = real_run
    torch_rows = predict_paths(run, files[:4] + files[-4:])
    onnx_rows = predict_paths(run, files[:4] + files[-4:], backend="onnx")  # exports to a temp
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a["path"] == b["path"] and a["class"] == b["class"]
        for c in a["probabilities"]:
            assert abs(a["probabilities"][c] - b["probabilities"][c]) < 1e-4
    code, out, err = cli(["predict", run, files[0], "--backend", "onnx", "--onnx", exported,
                          "--json"], monkeypatch, capsys)
    assert code == 0, err
    row = json.loads(out)
    assert abs(row["probabilities"]["PNEUMONIA"]
               - torch_rows[0]["probabilities"]["PNEUMONIA"]) < 1e-4


def test_torch_and_onnx_decide_as_the_run_on_its_validation_images(real_run, exported):
    # The run trained in bf16; its threshold and val_predictions.csv, torch and ONNX all come
    # from fp32, so both backends reproduce the run's own scores and decisions.
    run, _ = real_run
    loaded = load_run(run)
    paths, y, probs = read_predictions(run / "val_predictions.csv", loaded.classes)
    assert len(paths) >= 3 and loaded.config.precision == "bf16"
    images, _ = load_images([Path(p) for p in paths], 64, 1, cache_dir=None)
    expected = decide(probs, loaded.info.positive, loaded.threshold)
    # no validation score within rounding of the threshold (the midpoint rule keeps them apart)
    assert np.abs(probs[:, 1] - loaded.threshold).min() > 1e-4
    for backend in ("torch", "onnx"):
        p = make_predictor(loaded, backend, exported if backend == "onnx" else None)(images)
        assert np.abs(p - probs).max() < 1e-5, backend  # float32 scores
        assert (decide(p, loaded.info.positive, loaded.threshold) == expected).all(), backend


def test_onnx_errors(real_run, exported, tmp_path, monkeypatch, capsys):
    run, files = real_run
    code, _, err = cli(["predict", run, files[0], "--backend", "tf"], monkeypatch, capsys)
    assert code == 2 and "--backend tf" in err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    code, _, err = cli(["predict", run, files[0], "--backend", "onnx", "--onnx", junk],
                       monkeypatch, capsys)
    assert code == 2 and "junk.onnx" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["export", run, "--onnx", tmp_path / "nowhere" / "m.onnx"],
                       monkeypatch, capsys)
    assert code == 2 and "does not exist" in err
    # a file exported from another run (other image size) is refused
    proto = onnx.load(exported)
    for p in proto.metadata_props:
        if p.key == "image_size":
            p.value = "32"
    onnx.save(proto, tmp_path / "foreign.onnx")
    with pytest.raises(CxrlabError, match="exported for"):
        make_predictor(load_run(run), "onnx", tmp_path / "foreign.onnx")


# -- int8 ---------------------------------------------------------------------------------


def int8_weights(proto) -> list[np.ndarray]:
    """The quantized weights: int8 initializers feeding a DequantizeLinear."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    names = {n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    return [numpy_helper.to_array(inits[n]) for n in names
            if n in inits and inits[n].data_type == onnx.TensorProto.INT8]


@pytest.fixture(scope="module")
def int8_file(real_run, tmp_path_factory) -> Path:
    from cxrlab.deploy.quantize import export_int8

    return export_int8(real_run[0], tmp_path_factory.mktemp("int8") / "q.onnx")[0]


def test_int8_export_is_quantized_and_its_check_is_true(real_run, int8_file):
    run, _ = real_run
    proto = onnx.load(int8_file)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = int8_weights(proto)
    assert len(weights) >= 20  # every conv of resnet18 and its head
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and meta["model"] == "resnet18"
    check = json.loads(meta["int8_check"])
    # the check is what the file does to the run's own validation scores
    loaded = load_run(run)
    paths, y, fp32 = read_predictions(run / "val_predictions.csv", loaded.classes)
    images, _ = load_images([Path(p) for p in paths], 64, 1, cache_dir=None)
    q = OnnxPredictor(int8_file)
    int8 = q(images)
    assert q.precision == "int8" and q.int8_check == check
    assert check["images"] == len(paths)
    changed = (decide(int8, 1, loaded.threshold) != decide(fp32, 1, loaded.threshold)).sum()
    assert check["changed_decisions"] == changed
    assert check["max_probability_change"] == pytest.approx(np.abs(int8 - fp32).max(), abs=1e-6)
    assert 0 < check["max_probability_change"] < 0.1  # changed, but not by much
    assert check["accuracy"]["fp32"] == pytest.approx((decide(fp32, 1, loaded.threshold) == y)
                                                      .mean())
    assert check["calibration_images"] == sum(
        1 for r in csv_rows(run / "split.csv") if r["split"] == "train")
    speed = check["images_per_second"]
    assert speed["fp32"] > 0 and speed["int8"] > 0  # which is faster depends on the CPU
    # the same run, images and ranges: the same graph (only the timings may differ)
    from cxrlab.deploy.quantize import export_int8

    again = export_int8(run, int8_file.parent / "again.onnx")[0]
    assert onnx.load(again).graph == proto.graph


def csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def test_int8_weights_have_7_bits_where_the_cpu_has_no_vnni(real_run, int8_file, tmp_path,
                                                            monkeypatch):
    import cxrlab.deploy.export
    import cxrlab.deploy.quantize

    monkeypatch.setattr(cxrlab.deploy.quantize, "cpu_has_vnni", lambda: False)
    path, check = cxrlab.deploy.quantize.export_int8(real_run[0], tmp_path / "novnni.onnx")
    assert check["reduce_range"] and not check["vnni"]
    assert max(np.abs(w).max() for w in int8_weights(onnx.load(path))) <= 64
    # with VNNI each output channel's largest weight uses the full 8 bits
    assert max(np.abs(w).max() for w in int8_weights(onnx.load(int8_file))) == 127
    # a file made for VNNI is refused where there is none (its decisions change there)
    monkeypatch.setattr(cxrlab.deploy.export, "cpu_has_vnni", lambda: False)
    with pytest.raises(CxrlabError, match="--portable"):
        OnnxPredictor(int8_file)
    OnnxPredictor(path)  # the 7-bit one is fine


def test_int8_portable_has_7_bits_even_with_vnni(real_run, int8_file, tmp_path, monkeypatch,
                                                  capsys):
    import warnings

    import cxrlab.deploy.export
    import cxrlab.deploy.quantize

    run, files = real_run
    monkeypatch.setattr(cxrlab.deploy.quantize, "cpu_has_vnni", lambda: True)
    out = tmp_path / "portable.onnx"
    code, stdout, err = cli(["export", run, "--onnx", out, "--int8", "--portable",
                             "--calibration-images", 8], monkeypatch, capsys)
    assert code == 0, err
    assert "7-bit weights: the same scores on any x86 CPU" in " ".join(stdout.split())
    check = OnnxPredictor(out).int8_check
    assert check["reduce_range"] and not check["vnni"] and check["cpu_vnni"]
    assert max(np.abs(w).max() for w in int8_weights(onnx.load(out))) <= 64
    # made for any CPU: served where there is no VNNI, without a word
    monkeypatch.setattr(cxrlab.deploy.export, "cpu_has_vnni", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OnnxPredictor(out)
    code, _, err = cli(["predict", run, files[0], "--backend", "onnx", "--onnx", out],
                       monkeypatch, capsys)
    assert code == 0, err
    # where the 8-bit file (made for VNNI) is refused, in one line that says what to do
    code, _, err = cli(["predict", run, files[0], "--backend", "onnx", "--onnx", int8_file],
                       monkeypatch, capsys)
    assert code == 2 and "--portable" in err and len(err.strip().splitlines()) == 1
    # --portable means nothing for an fp32 file: refused, nothing written
    other = tmp_path / "fp32.onnx"
    code, _, err = cli(["export", run, "--onnx", other, "--portable"], monkeypatch, capsys)
    assert code == 2 and "--portable" in err and "--int8" in err and not other.exists()
    from cxrlab.api import Run

    with pytest.raises(CxrlabError, match="int8=True"):
        Run(run).export_onnx(other, portable=True)
    assert not other.exists()


def test_int8_cli_and_predict(real_run, int8_file, tmp_path, monkeypatch, capsys, caplog):
    run, files = real_run
    out = tmp_path / "cli.onnx"
    code, stdout, err = cli(["export", run, "--onnx", out, "--int8", "--calibration-images", 4],
                            monkeypatch, capsys)
    assert code == 0, err
    check = OnnxPredictor(out).int8_check
    assert check["calibration_images"] == 4
    said = " ".join(stdout.split())
    assert f"{check['changed_decisions']} of {check['images']} decisions changed" in said
    assert "int8 ONNX model written" in said and "Increased scale" not in stdout + err
    caplog.set_level("INFO", logger="cxrlab")
    code, stdout, err = cli(["predict", run, files[0], "--backend", "onnx", "--onnx", int8_file,
                             "--json"], monkeypatch, capsys)
    assert code == 0, err
    theirs = OnnxPredictor(int8_file).int8_check
    assert (f"{int8_file.name} is int8: on the run's validation images it changed "
            f"{theirs['changed_decisions']} of {theirs['images']}") in caplog.text
    row = json.loads(stdout)
    want = OnnxPredictor(int8_file)(load_images(files[:1], 64, 1, cache_dir=None)[0])[0]
    assert row["probabilities"]["PNEUMONIA"] == pytest.approx(float(want[1]), abs=1e-6)


def test_int8_errors_leave_nothing(real_run, tmp_path, monkeypatch, capsys):
    import shutil

    run, _ = real_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    split = (moved / "split.csv").read_text()
    first_train = next(r["path"] for r in csv_rows(moved / "split.csv") if r["split"] == "train")
    (moved / "split.csv").write_text(split.replace(first_train, "/nowhere/x.jpeg"))
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    code, _, err = cli(["export", moved, "--onnx", out, "--int8"], monkeypatch, capsys)
    assert code == 2 and "/nowhere/x.jpeg" in err and "calibration" in err
    assert len(err.strip().splitlines()) == 1 and not any(out.parent.iterdir())
    code, _, err = cli(["export", run, "--onnx", out, "--int8", "--calibration-images", 0],
                       monkeypatch, capsys)
    assert code == 2 and "--calibration-images" in err and not any(out.parent.iterdir())


def test_int8_agreement_for_three_classes():
    from types import SimpleNamespace

    from cxrlab.deploy.quantize import agreement

    run = SimpleNamespace(info=SimpleNamespace(positive=None), threshold=None)
    y = np.array([0, 1, 2, 2])
    fp32 = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .2, .7], [.5, .45, .05]])
    # int8 rows need not sum to exactly 1 (sklearn's multiclass AUC would refuse them)
    int8 = np.array([[.7, .2, .1], [.2, .7, .1], [.1, .2, .7], [.3, .3, .4]]) * 0.99
    check = agreement(run, y, fp32, int8)
    assert check["changed_decisions"] == 1  # the last case: class 0 -> 2
    assert check["accuracy"] == {"fp32": 0.75, "int8": 1.0}
    assert check["max_probability_change"] == pytest.approx(0.4 * 0.99 - 0.05)
    assert check["auc"]["int8"] == 1.0 and check["auc"]["fp32"] < 1.0  # one-vs-rest, macro


def test_serve_answers_with_the_int8_file(real_run, int8_file):
    from fastapi.testclient import TestClient

    from cxrlab.deploy.serve import create_app

    run, files = real_run
    want = OnnxPredictor(int8_file)(load_images(files[-1:], 64, 1, cache_dir=None)[0])[0]
    with TestClient(create_app(run, onnx=int8_file)) as client:
        assert client.get("/health").json()["backend"] == "onnx int8"
        r = client.post("/predict", files={"file": (files[-1].name, files[-1].read_bytes(),
                                                    "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["probabilities"]["PNEUMONIA"] == pytest.approx(float(want[1]), abs=1e-6)
    with TestClient(create_app(run)) as client:
        assert client.get("/health").json()["backend"] == "torch fp32"


def held_out(root: Path) -> list[Path]:
    """8 more real X-rays per class, after the 8 `real_run` trained on (symlinked)."""
    picked = []
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for f in sorted((SHARED_DATA / "chest_xray" / "train" / cls).glob("*.jpeg"))[8:16]:
            (root / cls / f.name).symlink_to(f)
            picked.append(root / cls / f.name)
    return picked


def test_evaluate_scores_with_the_int8_file(real_run, int8_file, tmp_path, monkeypatch, capsys):
    from sklearn.metrics import roc_auc_score

    run, _ = real_run
    files = held_out(tmp_path / "held")
    out = tmp_path / "m.json"
    code, stdout, err = cli(["evaluate", run, files[0].parent.parent, "--onnx", int8_file,
                             "--json", out], monkeypatch, capsys)
    assert code == 0, err
    assert "int8 file q.onnx" in " ".join(stdout.split())
    m = json.loads(out.read_text())
    assert m["onnx"] == {"file": str(int8_file), "precision": "int8"} and m["n"] == 16
    images, _ = load_images(files, 64, 1, cache_dir=None)
    p = OnnxPredictor(int8_file)(images)
    y = np.array([f.parent.name == "PNEUMONIA" for f in files])
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    assert m["accuracy"] == pytest.approx((decide(p, 1, load_run(run).threshold) == y).mean())
    # the stress test is the run's own (fp32): not with another file
    code, _, err = cli(["evaluate", run, files[0].parent.parent, "--onnx", int8_file, "--shift"],
                       monkeypatch, capsys)
    assert code == 2 and "--shift with --onnx" in err and not (run / "shift.json").exists()
