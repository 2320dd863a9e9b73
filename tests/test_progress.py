"""Progress bars: off when nobody watches, on in a terminal and in a real Jupyter kernel, whole counts with
named units; and the package lists its lazy names."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import nbformat
from nbclient import NotebookClient

import trackin_ooc
from trackin_ooc.progress import progress_bar, progress_enabled, unit_name


def test_bars_count_whole_named_units():
    bar = progress_bar(total=13, desc="top-k", unit="task", enabled=True)
    try:
        bar.update(2)
        text = str(bar)
    finally:
        bar.close()
    assert "2/13 tasks" in text and "2.00" not in text and "13.0" not in text
    assert unit_name("ex") == "examples" and unit_name("blocks") == "blocks"
    big = progress_bar(total=1_500_000, desc="capture", unit="ex", enabled=True)
    try:
        big.update(1234)
        assert "1234/1500000 examples" in str(big)
    finally:
        big.close()


def test_off_when_stderr_is_a_pipe_and_no_kernel_runs():
    code = "from trackin_ooc.progress import progress_enabled as p; print(p(None), p(True), p(False))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "False"]
    assert progress_enabled(False) is False and progress_enabled(True) is True


def _run_cells(*sources: str) -> list[str]:
    """Run code cells in a real kernel of this Python; each cell's text output."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(textwrap.dedent(s)) for s in sources]
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    texts = []
    for cell in nb.cells:
        parts = []
        for o in cell.outputs:
            assert o.output_type != "error", o
            parts.append(o.get("text") or o.get("data", {}).get("text/plain", ""))
        texts.append("".join(parts))
    return texts


def test_on_in_a_jupyter_kernel():
    enabled, scoring = _run_cells(
        """
        import os
        os.environ.pop("TRACKIN_OOC_QUIET", None)
        from trackin_ooc.progress import in_notebook, progress_enabled
        print(in_notebook(), progress_enabled(None))
        """,
        """
        import numpy as np
        import trackin_ooc as to
        rng = np.random.default_rng(0)
        train = to.from_arrays("memory://progress/train.zarr", rng.normal(size=(2, 40, 8)), [0.1, 0.2])
        si = to.self_influence(train)  # progress=None: the kernel decides
        """,
    )
    assert enabled.split() == ["True", "True"]
    assert "self-influence" in scoring and " tasks" in scoring  # a bar was drawn, in named units


def test_quiet_environment_wins_in_a_kernel():
    (enabled,) = _run_cells(
        """
        import os
        os.environ["TRACKIN_OOC_QUIET"] = "1"
        from trackin_ooc.progress import progress_enabled
        print(progress_enabled(None))
        """
    )
    assert enabled.split() == ["False"]


def test_dir_lists_the_lazy_names():
    names = dir(trackin_ooc)
    for name in ("capture", "capture_like", "plan_capture", "top_k", "open_store"):
        assert name in names
    assert set(trackin_ooc.__all__) <= set(names)
