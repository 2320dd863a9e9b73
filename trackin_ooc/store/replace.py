"""Put a new local output in place of an old one so that, killed at any instant, one of them is there.

Writers build the new output (or lay it out, for outputs filled in afterwards) under a hidden sibling
name, then call :func:`swap_into_place`. Files are replaced with one ``rename``; folders are exchanged
with ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it (Linux), else moved aside and replaced
with two renames. The old output is deleted only once the new one is at its name: a kill during that
deletion leaves a hidden sibling (``.NAME.tmp-*``, ``.NAME.replacing-*`` or ``.NAME.old-*``), never a
half-deleted output under the real name.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from collections.abc import Callable

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def sibling(path: str, tag: str) -> str:
    """A hidden, unique name next to ``path``: ``.NAME.TAG-xxxxxxxx`` (same file system, so renames work)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{tag}-{uuid.uuid4().hex[:8]}")


def exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths; False where the platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return bool(renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0)


def remove(path: str) -> None:
    """Delete a file, link or folder tree (a missing one is fine)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=False)
    elif os.path.lexists(path):
        os.remove(path)


def swap_into_place(new: str, final: str) -> None:
    """Move the finished ``new`` to ``final``, replacing whatever ``final`` holds, then delete the old one."""
    if not os.path.lexists(final):
        os.replace(new, final)
        return
    both_files = not os.path.isdir(new) and (os.path.islink(final) or not os.path.isdir(final))
    if both_files:
        os.replace(new, final)  # atomic for files
        return
    if exchange(new, final):
        remove(new)  # now the old output
        return
    old = sibling(final, "old")
    os.replace(final, old)
    os.replace(new, final)
    remove(old)


def lay_out_replacing(final: str, lay_out: Callable[[str], object]) -> None:
    """Lay out a new output with ``lay_out(staging path)`` next to ``final``, then swap it in: killed at
    any point, the old output or the new (resumable) one is at ``final``."""
    staging = sibling(final, "replacing")
    try:
        lay_out(staging)
        swap_into_place(staging, final)
    finally:
        remove(staging)
