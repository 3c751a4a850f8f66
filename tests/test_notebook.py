"""examples/quickstart.ipynb runs top to bottom, headless, on a tiny copy of the real data.

Parameters are injected papermill-style: the cell tagged "parameters" gets new source. Any
cell error fails the test (nbclient raises CellExecutionError with the cell's traceback).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"


def _outputs(cell, kind: str) -> str:
    return "".join(str(o.get("data", {}).get(kind, "")) for o in cell.get("outputs", []))


def test_quickstart_runs_headless(shared_data, tmp_path):
    source = shared_data / "chest_xray" / "train"
    if not source.is_dir():
        pytest.skip(f"{source} is not present")
    data = tmp_path / "xray"
    for cls in ("NORMAL", "PNEUMONIA"):
        (data / cls).mkdir(parents=True)
        for f in sorted((source / cls).iterdir())[:12]:
            shutil.copy(f, data / cls / f.name)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1
    params[0].source = (f"DATA = {str(data)!r}\nSUBSET = None\nEPOCHS = 1\nIMAGE_SIZE = 32\n"
                        "MODEL = 'cnn'\nPROGRESS = True")
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    cells = {c.source.splitlines()[-1]: c for c in nb.cells if c.cell_type == "code"}
    streams = [(o.name, o.text) for c in nb.cells for o in c.get("outputs", [])
               if o.output_type == "stream"]
    assert [text for name, text in streams if name == "stderr"] == []  # no warnings, no logs
    bar = "".join(text for name, text in streams)
    assert "Epoch 0: 100%" in bar and "<00:00" in bar  # tqdm's bar, with its ETA
    assert "95% CI" in _outputs(cells["run.metrics"], "text/html")
    for plot in ("run.plot_history()", "run.plot_roc()", "run.plot_confusion()",
                 "run.show_predictions(wrong_first=True)"):
        assert _outputs(cells[plot], "image/png"), f"{plot} showed no figure"
    assert "B − A" in _outputs(cells["cxrlab.compare(run, other)"], "text/html")
    assert len(list((tmp_path / "runs").iterdir())) == 2  # the two runs, nowhere else
