"""Where an output may go, checked before any work: the checks the CLI makes, usable directly.

The rule itself lives in ``trackin_ooc.store.guard`` (docs/reliability.md, "Outputs never replace inputs");
these are its entry points for a caller that checks first and writes later (a command that computes for
minutes before its first write fails at once instead), plus what such a caller asks about a location.
"""

from __future__ import annotations

import os

from .store import is_remote, is_unfinished
from .store.backends import StorageOptions
from .store.gradient_store import existing_store
from .store.guard import check_file_output
from .tables import check_output

__all__ = ["check_output", "check_capture_output", "check_file_output", "is_unfinished", "is_remote"]


def check_capture_output(
    path: str | os.PathLike[str], *, overwrite: bool, storage_options: StorageOptions = None
) -> None:
    """Whether a capture may write a gradient store at ``path``, before any model is loaded.

    Parameters
    ----------
    path
        The store's location.
    overwrite
        Replace an earlier gradient store there (and only that).
    storage_options
        fsspec options for a remote ``path``.

    Raises
    ------
    StoreExistsError
        Without ``overwrite``: a complete store, or anything a capture cannot resume, is there.
    OutputKindError
        With ``overwrite``: what is there is not an earlier gradient store.
    StoreError
        The location cannot be written.
    """
    check_output(path, overwrite=overwrite, allowed=None, resumable=True)
    if not overwrite:  # an unfinished store is resumed; anything else is refused
        existing_store(path, storage_options)
