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
from cxrlab.errors import CxrlabError
from cxrlab.export import OnnxPredictor, export_onnx, make_predictor
from cxrlab.inference import decide, predict_probs
from cxrlab.lifecycle import train_run
from cxrlab.run import load_run, read_predictions
from cxrlab.scoring import predict_paths
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
        assert np.abs(p - probs).max() < 1e-5, backend  # the CSV keeps 6 digits
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
