"""Execute the notebooks in place (``make notebooks``), so that they are committed with current outputs.

    python scripts/run_notebooks.py [NOTEBOOK ...] [--workdir DIR] [--timeout S]

Each notebook runs top to bottom with its own defaults in a kernel of this Python (nbclient); what it writes
(checkpoints, stores, figures) goes under DIR (default: trackin-ooc-notebooks in the temporary folder), so
the repository only gets the notebooks' outputs. A failing cell stops with its error and leaves that
notebook unchanged.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(path: Path, workdir: Path, timeout: int) -> float:
    """Run one notebook in ``workdir`` and write it back with its outputs; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(workdir)}}).execute()
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "trackin-ooc-notebooks")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--keep", action="store_true", help="keep what the notebooks wrote under --workdir")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    try:
        for path in paths:
            seconds = execute(path, args.workdir / path.stem, args.timeout)
            print(f"{path.name}: executed in {seconds:.0f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
