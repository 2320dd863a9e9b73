"""What every trackin-ooc Zarr group shares: gradient stores, influence outputs, indexes and retraining runs.

Each is a Zarr v3 group with ``trackin_ooc`` attributes; :class:`ZarrGroup` holds the skeleton they have in
common (in the manner of xarray's ``AbstractDataStore``): the path and its storage options, opening read-only
or for writing, the array cache and its lock, checksums verified chunk by chunk, and sealing (attributes
marked complete, metadata consolidated). A subclass says what its attributes must hold
(:meth:`ZarrGroup._check_meta`) and when it is complete (:meth:`ZarrGroup.mark_complete`).
"""

from __future__ import annotations

import os
import threading
import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import zarr

from ..errors import StoreError
from . import backends, layout
from .backends import StorageOptions
from .integrity import BadChunk, verify_group


def open_group(path: str | os.PathLike[str], storage_options: StorageOptions = None, *, read_only: bool) -> zarr.Group:
    """The Zarr group at ``path``, read-only (mode "r") or for writing into (mode "r+"); never consolidated
    metadata, which a writer elsewhere may have made stale."""
    return zarr.open_group(
        store=backends.zarr_store(path, storage_options=storage_options, read_only=read_only),
        mode="r" if read_only else "r+",
        use_consolidated=False,
    )


def create_group(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> zarr.Group:
    """A new, empty Zarr v3 group at ``path`` (whatever was there is gone: the output rule ran first)."""
    return zarr.open_group(store=backends.zarr_store(path, storage_options=storage_options), mode="w", zarr_format=3)


def consolidate(group: zarr.Group) -> None:
    """Consolidate metadata so plain ``xarray.open_zarr(path)`` opens quietly and in one read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        zarr.consolidate_metadata(group.store)


def group_meta(group: zarr.Group) -> dict[str, Any] | None:
    """A group's ``trackin_ooc`` attributes (None when it has none)."""
    meta = dict(group.attrs).get(layout.ATTRS_KEY)
    return dict(meta) if isinstance(meta, dict) else None


def short(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class ZarrGroup(ABC):
    """A trackin-ooc output kept in one Zarr v3 group.

    Parameters
    ----------
    path
        Local path or fsspec URL of the group.
    storage_options
        fsspec options for a remote ``path``.
    group
        An already open group (just laid out, say); else the group at ``path`` is opened.
    read_only
        Open for reading only; writers reopen for writing on their first write (:meth:`_writable`).

    Raises
    ------
    StoreError
        Nothing readable at ``path`` (:meth:`_missing` says what), or attributes that are not this kind's.
    """

    #: Exceptions from opening that mean "nothing of this kind here" (reported as a StoreError).
    _open_errors: ClassVar[tuple[type[BaseException], ...]] = (Exception,)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        storage_options: StorageOptions = None,
        group: zarr.Group | None = None,
        read_only: bool = True,
    ) -> None:
        self.path = backends.normalize_path(path)
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        if group is None:
            try:
                group = open_group(path, storage_options, read_only=read_only)
            except self._open_errors as e:
                raise StoreError(self._missing(e)) from None
        self._group: zarr.Group = group
        self._lock = threading.Lock()
        self._arrays: dict[str, zarr.Array[Any]] = {}
        self._meta: dict[str, Any] = self._check_meta(self._read_meta())

    # ---- what a subclass says ---------------------------------------------------------------------
    @abstractmethod
    def _check_meta(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        """This kind's ``trackin_ooc`` attributes, or a one-line StoreError saying what ``path`` holds instead."""

    def _missing(self, error: BaseException) -> str:
        """The message for a path that holds no group of this kind."""
        return f"nothing readable at {self.path}: {short(error)}"

    @abstractmethod
    def mark_complete(self, *args: Any, **kwargs: Any) -> Any:
        """Seal the output once everything is written (:meth:`_seal`); refuse while anything is missing."""

    # ---- attributes -------------------------------------------------------------------------------
    def _read_meta(self) -> dict[str, Any] | None:
        """The group's ``trackin_ooc`` attributes as stored now (None when there are none)."""
        return group_meta(self._group)

    @property
    def attrs(self) -> dict[str, Any]:
        """The ``trackin_ooc`` attributes (a copy)."""
        return dict(self._meta)

    @property
    def complete(self) -> bool:
        return bool(self._meta.get("complete", False))

    def _set_meta(self, **changes: Any) -> dict[str, Any]:
        """Write ``changes`` into the stored attributes (read afresh first) and keep the result."""
        meta = {**(self._read_meta() or {}), **changes}
        self._writable().attrs[layout.ATTRS_KEY] = meta
        self._meta = meta
        return meta

    def _seal(self, **changes: Any) -> None:
        """Mark the group complete (with ``changes``) and consolidate its metadata: the last write."""
        self._set_meta(**changes, complete=True)
        consolidate(self._group)

    # ---- arrays -----------------------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array[Any]:
        """The array ``name``, opened once and cached (threads of one process share it)."""
        with self._lock:
            arr = self._arrays.get(name)
            if arr is None:
                found = self._group[name]
                if not isinstance(found, zarr.Array):
                    raise StoreError(f"{self.path}: {name} is a group, not an array")
                arr = self._arrays[name] = found
            return arr

    def _array_names(self) -> set[str]:
        """Names of the group's arrays now."""
        return {name for name, _ in self._group.arrays()}

    def _writable(self) -> zarr.Group:
        """The group, reopened for writing the first time a read-only one is written to."""
        with self._lock:
            if self._group.read_only:
                self._group = open_group(self.path, self.storage_options, read_only=False)
                self._arrays.clear()
            return self._group

    def verify(self) -> list[BadChunk]:
        """Read every chunk of every array; return the ones failing their checksum (empty: intact)."""
        return verify_group(self._group)
