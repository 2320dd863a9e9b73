"""The notebooks are committed with their outputs (`make notebooks`), and still run top to bottom (with small
parameters) in a kernel of this virtualenv's Python."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PARAMS = {
    "01_mislabel_detection": {"N_TRAIN": 600, "EPOCHS": 20, "EVERY": 5, "PROJECTION_DIM": 256},
    "02_proponents_opponents": {"N_TRAIN": 1000, "EPOCHS": 20, "EVERY": 5, "PROJECTION_DIM": 128, "K": 4},
    "03_out_of_core": {"N_TEST": 128, "N_WORKERS": 1, "STORE_FACTOR": 1.1},
    "04_data_cleaning": {"SEEDS": [0, 1, 2]},  # its defaults: ~30 s on two cores
}
# What each notebook must have shown (text outputs), beyond running without an error.
EXPECTED = {
    "01_mislabel_detection": [
        "TracIn self-influence",
        "influence functions",
        "last-checkpoint loss",
        "random",
        "recall_at_10pct",
        "influence functions on ['fc']",
        "CapturePlan",
    ],
    "02_proponents_opponents": ["proponent has test label", "opponent flipped", "proponent_label"],
    "03_out_of_core": ["dashboard: http://127.0.0.1:", "peak", "limit", "train store", "influence matrix"],
    "04_data_cleaning": [
        "net influence of 1200 training examples on 300 validation examples",
        "most harmful",
        "removed: random",
        "relabelled",
        "validation accuracy",
        "test accuracy",
    ],
}


def test_every_notebook_is_tested():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_committed_with_outputs(name):
    """Committed as `make notebooks` leaves them: every code cell run in order, its figures and tables there."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), "run it with `make notebooks`"
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []) and "TRACKIN_NB_PARAMS" in first.source
    outputs = [o for c in code for o in c.outputs]
    assert not any(o.output_type == "error" for o in outputs)
    assert sum(1 for c in code if c.outputs) >= len(code) // 2, "most cells show something"
    text = _text(nb)
    for fragment in EXPECTED[name]:
        assert fragment in text, f"{fragment!r} not in the committed outputs of {name}"
    assert any("text/html" in o.get("data", {}) for o in outputs), "tables are shown"
    if name != "03_out_of_core":
        assert any("image/png" in o.get("data", {}) for o in outputs), "figures are shown"
    assert "TRACKIN_NB_PARAMS" not in text and "KERNEL " not in text  # the defaults ran, not the test's values


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif "data" in out:
                parts.append(out.data.get("text/plain", ""))
                parts.append(out.data.get("text/html", ""))
    return "\n".join(parts)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(PARAMS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIN_NB_PARAMS", json.dumps(PARAMS[name]))
    monkeypatch.setenv("TRACKIN_OOC_QUIET", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    # Which Python ran it: the kernel must be this virtualenv's interpreter.
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    text = _text(nb)
    kernel = [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("KERNEL ")]
    assert kernel and os.path.realpath(kernel[0]) == os.path.realpath(sys.executable)
    for fragment in EXPECTED[name]:
        assert fragment in text, f"{fragment!r} not shown by {name}"
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    if name != "03_out_of_core":
        assert images, "plots are displayed"
    assert not any(o.output_type == "error" for c in nb.cells for o in c.get("outputs", []))
    shutil.rmtree(tmp_path, ignore_errors=True)  # the out-of-core store is hundreds of MB
