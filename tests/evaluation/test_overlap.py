"""evaluate on images the run has seen: refused (training), labelled (validation, a site
calibration's sample), matched by path, bytes and pixels; and a read-only run folder loses
no --json."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cxrlab.errors import CxrlabError
from cxrlab.run import read_split_csv
from tests.conftest import make_kermany_folder
from tests.test_cli import assert_user_error, run_cli


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """A tiny trained run, its training folder, and a held-out folder of other images."""
    from cxrlab.config import RunConfig
    from cxrlab.training.lifecycle import train_run

    root = tmp_path_factory.mktemp("overlap")
    data = make_kermany_folder(root / "data", 12, 12, size=48)
    cfg = RunConfig.build(dict(data=str(data), model="efficientnet_lite0", image_size=32,
                               batch_size=16, epochs=3, lr=3e-2, freeze_backbone=True,
                               augment="none"), source="option")  # learns (calibrate needs it)
    train_run(cfg, root / "run", progress=False)
    held = make_kermany_folder(root / "held", 6, 6, size=48, seed=5)
    rows = read_split_csv(root / "run" / "split.csv")
    return {"root": root, "run": root / "run", "data": data, "held": held,
            "train": [Path(r["path"]) for r in rows if r["split"] == "train"],
            "val": [Path(r["path"]) for r in rows if r["split"] == "val"]}


def with_copies(seen, folder: Path) -> tuple[Path, list[Path]]:
    """The held-out images plus two training images under new names: a byte copy, and the
    same grey pixels stored as RGB (other bytes; `cxrlab data summary` calls it a
    duplicate too)."""
    shutil.copytree(seen["held"], folder)
    a, b = seen["train"][0], seen["train"][1]
    byte_copy = folder / a.parent.name / "person9000_virus_1.png"
    shutil.copy(a, byte_copy)
    rgb_copy = folder / b.parent.name / "person9001_virus_2.png"
    Image.open(b).convert("RGB").save(rgb_copy)
    assert rgb_copy.read_bytes() != b.read_bytes()
    return folder, [byte_copy, rgb_copy]


def test_training_writes_the_digests_of_what_the_run_saw(seen):
    from cxrlab.evaluation import overlap

    rows = list(csv.DictReader((seen["run"] / overlap.DIGESTS).open()))
    assert sorted((Path(r["path"]), r["split"]) for r in rows) == sorted(
        [(p, "train") for p in seen["train"]] + [(p, "val") for p in seen["val"]])
    assert all(r["file"] == overlap.file_digest(r["path"]) for r in rows)
    assert len({r["pixels"] for r in rows}) == len(rows)


def test_evaluate_on_the_training_folder_is_refused(seen, tmp_path, capsys, monkeypatch,
                                                    caplog):
    out = tmp_path / "m.json"
    code, _, err = run_cli(["evaluate", seen["run"], seen["data"], "--json", out],
                           capsys, monkeypatch)
    n_train, n = len(seen["train"]), len(seen["train"]) + len(seen["val"])
    assert_user_error(code, err, f"{n_train} of {n} images are the run's own training images",
                      "--allow-overlap", f"score the other {n - n_train}")
    assert not out.exists()

    # --allow-overlap: the validation images are scored, and labelled selection-biased
    code, printed, err = run_cli(["evaluate", seen["run"], seen["data"], "--json", out,
                                  "--allow-overlap"], capsys, monkeypatch)
    assert code == 0, err
    m = json.loads(out.read_text())
    assert m["n"] == len(seen["val"])
    assert sorted(m["overlap"]["training_left_out"]) == sorted(map(str, seen["train"]))
    assert sorted(m["overlap"]["validation"]) == sorted(map(str, seen["val"]))
    assert m["selection_biased"] == (f"{n - n_train} of the {n - n_train} images are the "
                                     "run's validation images (its epoch and threshold were "
                                     "chosen on them)")
    assert f"left out {n_train} of {n} images" in caplog.text
    assert "optimistic" in " ".join(printed.split())


def test_a_copy_under_another_name_is_the_same_image(seen, tmp_path, capsys, monkeypatch):
    data, copies = with_copies(seen, tmp_path / "new")
    code, _, err = run_cli(["evaluate", seen["run"], data], capsys, monkeypatch)
    assert_user_error(code, err, "2 of 14 images are the run's own training images")
    out = tmp_path / "m.json"
    code, _, err = run_cli(["evaluate", seen["run"], data, "--allow-overlap", "--json", out],
                           capsys, monkeypatch)
    assert code == 0, err
    m = json.loads(out.read_text())
    assert m["n"] == 12 and sorted(m["overlap"]["training_left_out"]) == sorted(map(str, copies))
    assert "selection_biased" not in m

    # what `cxrlab data summary` calls the same image, evaluate does too
    from cxrlab.data.audit import summarize
    from cxrlab.data.sources import load_source

    both = tmp_path / "both"
    for src in (copies[1], seen["train"][1]):
        (both / src.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, both / src.parent.name / src.name)
    assert len(summarize(load_source(both)).duplicate_sets) == 1


def test_held_out_images_are_scored_as_before(seen, tmp_path):
    from cxrlab.site.assess import evaluate_run

    m = evaluate_run(seen["run"], seen["held"], n_boot=50)
    assert m["n"] == 12 and "selection_biased" not in m
    assert m["overlap"]["training_left_out"] == m["overlap"]["validation"] == []
    assert "pixels" in m["overlap"]["checked"]


def test_a_run_from_before_digests_matches_split_csv_by_path_and_bytes(seen, tmp_path, caplog):
    from cxrlab.evaluation import overlap
    from cxrlab.site.assess import evaluate_run

    old = Path(shutil.copytree(seen["run"], tmp_path / "old"))
    (old / overlap.DIGESTS).unlink()
    data, copies = with_copies(seen, tmp_path / "new")
    with pytest.raises(CxrlabError, match="1 of 14 images are the run's own training images"):
        evaluate_run(old, data, n_boot=50)  # the byte copy; the RGB one needs pixels
    m = evaluate_run(old, data, n_boot=50, allow_overlap=True)
    assert m["overlap"]["training_left_out"] == [str(copies[0])]
    assert "predates" in m["overlap"]["checked"]
    # its training images moved away: path only, and said so
    rows = (old / "split.csv").read_text()
    (old / "split.csv").write_text(rows.replace(str(seen["data"]), str(tmp_path / "gone")))
    caplog.set_level(logging.WARNING, logger="cxrlab")
    m = evaluate_run(old, seen["held"], n_boot=50)
    assert "by path only" in m["overlap"]["checked"] and "cannot be read" in caplog.text


def test_a_calibrated_runs_sample_is_labelled(seen, tmp_path):
    from cxrlab.site.assess import evaluate_run
    from cxrlab.site.calibration import calibrate_run

    sample = make_kermany_folder(tmp_path / "sample", 10, 10, size=48, seed=7)
    calibrate_run(seen["run"], sample, tmp_path / "cal", n_boot=100)
    m = evaluate_run(tmp_path / "cal", sample, n_boot=50)
    assert len(m["overlap"]["calibration_sample"]) == 20 == m["n"]
    assert "refitted on them" in m["selection_biased"]
    assert "selection_biased" not in evaluate_run(tmp_path / "cal", seen["held"], n_boot=50)
    # calibrated before digests.csv held the sample: run.json's data folder stands for it
    rows = (tmp_path / "cal" / "digests.csv").read_text().splitlines()
    assert sum(",calibration," in r for r in rows) == 20
    (tmp_path / "cal" / "digests.csv").write_text(
        "\n".join(r for r in rows if ",calibration," not in r) + "\n")
    m = evaluate_run(tmp_path / "cal", sample, n_boot=50)
    assert len(m["overlap"]["calibration_sample"]) == 20


def test_copies_across_splits_are_counted_at_training(tmp_path, caplog):
    """Leakage training can see: a validation or test image with a training image's content."""
    from cxrlab.config import RunConfig
    from cxrlab.training.lifecycle import train_run

    root = tmp_path / "split"
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        make_kermany_folder(root / split, 6, 6, size=48, seed=seed)
    a = sorted((root / "train" / "NORMAL").iterdir())[0]
    shutil.copy(a, root / "val" / "NORMAL" / "IM-0900-0001.png")
    shutil.copy(a, root / "test" / "NORMAL" / "IM-0901-0001.png")
    Image.open(a).convert("RGB").save(root / "test" / "NORMAL" / "IM-0902-0001.png")
    caplog.set_level(logging.WARNING, logger="cxrlab")
    train_run(RunConfig.build(dict(data=str(root), model="cnn", image_size=32, batch_size=8,
                                   epochs=1, augment="none"), source="option"),
              tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())[
        "copies_of_training"] == 1
    assert json.loads((tmp_path / "run" / "metrics_test.json").read_text())[
        "copies_of_training"] == 2
    assert "2 test image(s) are copies of training images" in caplog.text


# ---------------------------------------------------------------------------------------
# a run folder that cannot be written


@pytest.fixture
def read_only_run(seen, monkeypatch):
    """Writes into the run folder fail as on a read-only mount (tests run as root, where
    chmod stops nothing): cxrlab's atomic writer and the figure raise PermissionError."""
    import cxrlab.reporting.plots
    import cxrlab.reporting.report
    import cxrlab.run

    run = seen["run"].resolve()
    write = cxrlab.run.atomic_write_text

    def guarded(path, text):
        if Path(path).resolve().is_relative_to(run):
            raise PermissionError(13, "Permission denied")
        return write(path, text)

    def no_figure(result, path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cxrlab.run, "atomic_write_text", guarded)
    monkeypatch.setattr(cxrlab.reporting.report, "atomic_write_text", guarded)  # imported by name
    monkeypatch.setattr(cxrlab.reporting.plots, "plot_shift", no_figure)
    return seen["run"]


def test_shift_on_a_read_only_run_keeps_the_metrics(read_only_run, seen, tmp_path, capsys,
                                                    monkeypatch, caplog):
    out = tmp_path / "m.json"
    code, printed, err = run_cli(["evaluate", read_only_run, seen["held"], "--shift",
                                  "--json", out], capsys, monkeypatch)
    assert code == 0, err
    m = json.loads(out.read_text())
    assert m["n"] == 12 and len(m["shift"]["rows"]) == 30
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
              and "cannot write the stress test" in r.getMessage()]
    assert len(warned) == 1 and "Permission denied" in warned[0]
    assert "Stress test written" not in printed and "Metrics written" in printed
    assert not (read_only_run / "shift.json").exists()


def test_a_report_the_run_cannot_take_is_one_line_naming_out(read_only_run, tmp_path):
    from cxrlab.reporting.report import write_report

    with pytest.raises(CxrlabError, match=r"cannot write the report there \(Permission denied"
                                          r"\); give --out"):
        write_report(read_only_run)
    assert write_report(read_only_run, tmp_path / "r.html").stat().st_size > 0


def test_a_stress_test_the_run_cannot_take_is_a_warning(read_only_run, caplog):
    """What `Run.evaluate(shift=True)` does after scoring: warn, never raise."""
    from cxrlab.site import shift

    caplog.set_level(logging.WARNING, logger="cxrlab")
    result = {"n": 1, "threshold": 0.5, "seed": 0, "baseline": {}, "rows": []}
    assert shift.save(read_only_run, result) is None
    assert "cannot write the stress test there (Permission denied)" in caplog.text
    assert not (read_only_run / shift.RESULT_JSON).exists()
