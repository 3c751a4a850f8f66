from __future__ import annotations

import pytest

from cxrlab.config import RunConfig
from cxrlab.errors import CxrlabError


def test_round_trip(tmp_path):
    c = RunConfig.build({"data": "x", "model": "cnn", "epochs": 3, "augment": "notebook"})
    c.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == c


@pytest.mark.parametrize("bad, needle", [
    ({"epochs": 0}, "epochs"),
    ({"augment": "sideways"}, "augment"),
    ({"optimizer": "lbfgs"}, "optimizer"),
    ({"colour": 3}, "colour"),
    ({"image_col": "path"}, "label-col"),
])
def test_bad_values_name_the_option(bad, needle):
    with pytest.raises(CxrlabError, match=needle):
        RunConfig.build({"data": "x", **bad})


def test_balanced_sampler_turns_class_weights_off():
    c = RunConfig.build({"data": "x", "sampler": "balanced"})
    assert c.class_weights is False


def test_load_errors(tmp_path):
    with pytest.raises(CxrlabError, match="not found"):
        RunConfig.load(tmp_path / "none.yaml")
    p = tmp_path / "c.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(CxrlabError, match="mapping"):
        RunConfig.load(p)
