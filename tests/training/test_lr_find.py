"""The learning-rate finder on the shipped demo images: the curve, the suggestion beside the
recipe's lr, the files, and one-line refusals before any work."""

from __future__ import annotations

import csv
import itertools
import json
import math

import pytest
from PIL import Image

import cxrlab
from cxrlab.cli import main
from cxrlab.config import RunConfig

TINY = dict(model="cnn", image_size=32, batch_size=16, augment="none")
STEPS = 15


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    out = tmp_path_factory.mktemp("lr") / "sweep"
    return out, cxrlab.lr_find(cxrlab.demo_data(), out=out, steps=STEPS, min_lr=1e-5,
                               max_lr=0.3, lr=3e-4, **TINY)


def test_sweep_records_a_growing_rate_and_suggests_one_of_them(swept):
    out, result = swept
    assert result.steps == STEPS  # seeded; the loss does not diverge below max_lr here
    ratios = [b / a for a, b in itertools.pairwise(result.lrs)]
    assert result.lrs[0] == pytest.approx(1e-5)
    # exponential (Lightning's first step is a double one: it records the rate before it)
    assert all(r == pytest.approx(ratios[-1]) for r in ratios[1:]) and ratios[-1] > 1
    assert result.lrs[-1] <= 0.3
    assert all(math.isfinite(v) for v in result.losses[:5])
    assert result.suggestion in result.lrs[10:-1]  # Lightning's rule skips 10 and the last
    assert result.recipe_lr == 3e-4 and result.config.model == "cnn"
    assert f"suggested lr {result.suggestion:.2g}" in result.summary()
    assert "the recipe's lr is 0.0003" in result.summary()


def test_out_holds_the_curve_the_plot_and_the_recipe_swept(swept):
    out, result = swept
    rows = list(csv.DictReader((out / "lr_find.csv").open()))
    assert [float(r["lr"]) for r in rows] == result.lrs
    assert [float(r["loss"]) for r in rows] == result.losses
    meta = json.loads((out / "lr_find.json").read_text())
    assert meta["suggestion"] == result.suggestion and meta["recipe_lr"] == 3e-4
    assert meta["steps"] == result.steps
    with Image.open(out / "lr_find.png") as im:
        assert im.format == "PNG" and im.width > 300
    again = RunConfig.load(out / "config.yaml")  # `cxrlab train --config` takes it
    assert (again.model, again.image_size, again.lr) == ("cnn", 32, 3e-4)
    fig = result.figure()
    assert fig.axes[0].get_xscale() == "log"


def test_cli_prints_suggestion_and_recipe_lr_and_writes_the_plot(tmp_path, capsys,
                                                                  monkeypatch):
    png = tmp_path / "lr.png"
    monkeypatch.setattr("sys.argv", [
        "cxrlab", "lr-find", str(cxrlab.demo_data()), "--plot", str(png), "--steps", "13",
        "--model", "cnn", "--image-size", "32", "--batch-size", "16", "--augment", "none",
        "--quiet"])
    main()
    out = capsys.readouterr().out
    assert "the recipe's lr is 0.001" in out and str(png.name) in out
    assert ("suggested lr" in out) or ("no suggestion" in out)
    assert png.is_file() and not (tmp_path / "lr_find.csv").exists()


@pytest.mark.parametrize("args, needle", [
    (["/no/such/folder"], "/no/such/folder"),
    (["DEMO", "--steps", "5"], "--steps 5"),
    (["DEMO", "--min-lr", "1", "--max-lr", "0.1"], "--min-lr"),
    (["DEMO", "--plot", "x.jpg"], "--plot x.jpg"),
    (["DEMO", "--model", "nope"], "--model nope"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, tmp_path, capsys, monkeypatch):
    args = [str(cxrlab.demo_data()) if a == "DEMO" else a for a in args]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["cxrlab", "lr-find", *args, "-q"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_non_empty_out_is_refused_before_the_sweep(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(cxrlab.CxrlabError, match="not empty"):
        cxrlab.lr_find(cxrlab.demo_data(), out=tmp_path, steps=STEPS, **TINY)
    with pytest.raises(cxrlab.CxrlabError, match="folds: not an option of cxrlab.lr_find"):
        cxrlab.lr_find(cxrlab.demo_data(), folds=3)
