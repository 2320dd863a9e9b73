"""Progress bars (tqdm) that stay quiet when output is not a terminal unless asked."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress_enabled(enabled: bool | None) -> bool:
    """None means: show bars when stderr is a terminal and TRACKIN_OOC_QUIET is not set."""
    if enabled is not None:
        return bool(enabled)
    if os.environ.get("TRACKIN_OOC_QUIET"):
        return False
    return sys.stderr.isatty()


def progress_bar(*, total: int, desc: str, unit: str = "it", enabled: bool | None = None) -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not progress_enabled(enabled),
                dynamic_ncols=True, leave=False)
