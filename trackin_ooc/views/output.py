"""Writing a view or report file under the output rule (docs/reliability.md, "Outputs never replace inputs").

An output is never an input store nor inside or around one; an existing file is replaced only with
``overwrite=True``, and then only if this package wrote it (an HTML page carries
``<meta name="generator" content="trackin-ooc ...">``, a PNG a ``Software: trackin-ooc`` text chunk).
The new file is written under a hidden sibling name and renamed into place, so a killed write leaves
the earlier file or the new one, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from ..store import replace
from ..store.guard import check_file_output
from .html import GENERATOR

PNG_SOFTWARE = f"{GENERATOR} view"


def write_text_output(
    path: str | os.PathLike,
    content: str | Callable[[str], None],
    *,
    kind: str,
    overwrite: bool = False,
    inputs: Iterable[Any] = (),
) -> str:
    """Write ``content`` (text, or a function that writes the file at the path it is given) to ``path``."""
    what = "report" if kind == "report" else "view"
    final = check_file_output(path, what=what, overwrite=overwrite, inputs=inputs)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    suffix = os.path.splitext(final)[1]
    tmp = replace.sibling(final, "tmp") + suffix  # keeps the extension: writers pick formats by it
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(content)
        replace.swap_into_place(tmp, final)
    finally:
        replace.remove(tmp)
    return final
