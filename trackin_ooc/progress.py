"""Progress bars (tqdm): on in a terminal and in Jupyter, quiet elsewhere unless asked; integer counts, named units.

In a Jupyter kernel ``tqdm.auto`` draws notebook bars when ipywidgets is installed (the ``notebooks`` extra),
else text bars in the cell's output.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

# Short unit names callers use → the plural word a bar shows.
UNIT_NAMES = {
    "ex": "examples",
    "example": "examples",
    "task": "tasks",
    "part": "arrays",
    "block": "blocks",
    "it": "items",
}
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_fmt}]"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (ipykernel's shell), where stderr is no terminal."""
    if "IPython" not in sys.modules:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython half-imported
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress_enabled(enabled: bool | None) -> bool:
    """Whether to draw bars: ``enabled`` when given; for None, on a terminal or in a Jupyter kernel, and
    not when the environment variable TRACKIN_OOC_QUIET is set.

    Parameters
    ----------
    enabled : bool or None
        True or False forces the answer; None decides from where the output goes.

    Returns
    -------
    bool
    """
    if enabled is not None:
        return bool(enabled)
    if os.environ.get("TRACKIN_OOC_QUIET"):
        return False
    return sys.stderr.isatty() or in_notebook()


def unit_name(unit: str) -> str:
    """The plural word a bar shows for ``unit`` ("ex" → "examples"; other words as given)."""
    return UNIT_NAMES.get(unit, unit)


def progress_bar(*, total: int, desc: str, unit: str = "it", enabled: bool | None = None) -> tqdm:
    """A tqdm bar counting whole ``unit`` s (no 2.00/13.0 scaling), off unless :func:`progress_enabled`.

    Parameters
    ----------
    total : int
        How many units the work has.
    desc : str
        What the bar counts for ("capture", "top-k").
    unit : str
        The unit, e.g. "ex" (shown as "examples") or "blocks".
    enabled : bool or None
        See :func:`progress_enabled`.

    Returns
    -------
    tqdm
        Use as a context manager and call ``update(n)``.
    """
    word = unit_name(unit)
    return tqdm(
        total=int(total),
        desc=desc,
        unit=f" {word}",
        unit_scale=False,
        bar_format=BAR_FORMAT,
        disable=not progress_enabled(enabled),
        dynamic_ncols=True,
        leave=False,
    )
