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

from ..errors import OutputKindError, StoreExistsError
from ..store import replace
from ..store.backends import is_remote
from ..store.guard import check_not_an_input
from .html import GENERATOR

MARK = GENERATOR.encode()
PNG_SOFTWARE = f"{GENERATOR} view"


def written_here(path: str) -> bool:
    """Whether the file at ``path`` is a page or picture this package wrote (its mark in the first 4 KiB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return b"Software\x00" + MARK in head
    return b'name="generator" content="' + MARK in head


def check_file_output(path: str | os.PathLike, *, what: str, overwrite: bool, inputs: Iterable[Any] = ()) -> str:
    """Apply the output rule to a local file output; return its absolute path.

    Raises ``OutputOverlapsInputError`` (an input's place), ``StoreExistsError`` (exists, no overwrite) or
    ``OutputKindError`` (exists and is not an earlier output of this package, or is a folder).
    """
    if is_remote(path):
        raise OutputKindError(
            f"{os.fspath(path)}: the {what} is written to a local file; give a local path and copy it afterwards"
        )
    final = os.path.abspath(os.path.expanduser(os.fspath(path)))
    check_not_an_input(final, inputs)
    if not os.path.lexists(final):
        parent = os.path.dirname(final)
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OutputKindError(f"cannot write {final}: {parent} is a file, not a folder")
        return final
    if os.path.isdir(final):
        raise OutputKindError(f"{final} is a folder; the {what} is one file: give a file name (say report.html)")
    if not overwrite:
        raise StoreExistsError(
            f"{what} {final} already exists; pass overwrite=True (--overwrite) to replace it, or choose another path"
        )
    if not written_here(final):
        raise OutputKindError(
            f"{final} already exists and was not written by trackin-ooc; overwrite replaces only "
            f"an earlier {what}: remove it deliberately first (rm {final}) or choose another path"
        )
    return final


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
