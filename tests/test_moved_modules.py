"""The old module paths users may have imported keep working for one release, with a warning,
and `cxrlab.train` stays the function however the `cxrlab.training` package is imported."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("old, new", [
    ("cxrlab.evaluate", "cxrlab.evaluation.metrics"),
    ("cxrlab.inference", "cxrlab.deploy.inference"),
    ("cxrlab.export", "cxrlab.deploy.export"),
])
def test_old_path_warns_and_is_the_new_module(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)


def test_public_functions_are_not_shadowed_by_the_wings():
    code = ("import cxrlab, cxrlab.training.loop, cxrlab.evaluation.metrics, cxrlab.site.assess; "
            "assert callable(cxrlab.train) and callable(cxrlab.load), cxrlab.train")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
