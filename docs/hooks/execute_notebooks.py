"""Execute the notebooks for the documentation site: ``python docs/hooks/execute_notebooks.py [OUT]``.

Each notebook in notebooks/ runs top to bottom with its own parameters (a kernel of this Python, in a
temporary working folder, progress bars off) and is written with its outputs to OUT (default
build/notebooks), stamped with the hash of the source it ran from. A notebook whose stamped copy is
already there is not run again; docs/hooks/gen_pages.py shows a copy only while its stamp matches the
committed notebook. A failing cell fails the whole run (exit 1), naming the notebook.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[2]
CELL_TIMEOUT = 1800  # seconds for one cell


def stamp(source: Path) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def up_to_date(source: Path, done: Path) -> bool:
    if not done.is_file():
        return False
    meta = nbformat.read(done, as_version=4).metadata.get("trackin_ooc_docs", {})
    return meta.get("source_sha256") == stamp(source)


def execute(source: Path, done: Path) -> float:
    nb = nbformat.read(source, as_version=4)
    os.environ["TRACKIN_OOC_QUIET"] = "1"  # no progress bars in the rendered outputs
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"docs-{source.stem}-") as work:
        NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                       resources={"metadata": {"path": work}}).execute()
    nb.metadata["trackin_ooc_docs"] = {"source_sha256": stamp(source)}
    done.parent.mkdir(parents=True, exist_ok=True)
    partial = done.with_suffix(".partial")
    nbformat.write(nb, partial)
    partial.replace(done)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "build" / "notebooks"
    for source in sorted((ROOT / "notebooks").glob("*.ipynb")):
        done = out / source.name
        if up_to_date(source, done):
            print(f"{source.name}: up to date", flush=True)
            continue
        print(f"{source.name}: running ...", flush=True)
        try:
            seconds = execute(source, done)
        except CellExecutionError as e:
            print(f"{source.name}: a cell failed:\n{e}", file=sys.stderr)
            return 1
        print(f"{source.name}: ran in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
