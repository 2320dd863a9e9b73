"""The influence-matrix output: a Zarr v3 group with one (test, train) array and its coordinates."""

from __future__ import annotations

import datetime as _dt
import functools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from .._version import __version__
from ..errors import IncompleteStoreError, StoreError
from . import backends, guard, layout
from .backends import StorageOptions
from .group import ZarrGroup, create_group, group_meta, open_group

if TYPE_CHECKING:
    import xarray as xr

INFLUENCE = "influence"
TEST, TRAIN = "test", "train"
TASK_COMPLETE = "task_complete"  # one flag per (test block, train block) task


class InfluenceStore(ZarrGroup):
    """Where ``influence(test, train, out=...)`` writes, one whole chunk per task."""

    _open_errors = ()  # opened only where a writer just laid one out or found one to resume

    def __init__(
        self, path: str | os.PathLike[str], *, storage_options: StorageOptions = None, group: zarr.Group | None = None
    ) -> None:
        super().__init__(path, storage_options=storage_options, group=group, read_only=False)

    def _check_meta(self, meta: dict[str, Any] | None) -> dict[str, Any]:
        return meta or {}

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        test_ids: np.ndarray,
        train_ids: np.ndarray,
        chunks: tuple[int, int],
        n_tasks: tuple[int, int],
        attrs: dict[str, Any],
        overwrite: bool = False,
        storage_options: StorageOptions = None,
        inputs: Sequence[Any] = (),
        checked: guard.Existing | None = None,
    ) -> InfluenceStore:
        """Lay out an empty, unfinished output at ``path`` (the output rule checked against ``inputs``,
        unless the caller checked it and gives what it found as ``checked``).

        With ``overwrite``, an earlier local influence output is replaced by exchanging it with the new
        layout in one rename, so a kill at any point leaves the old output or the new, resumable one.
        """
        if checked is None:
            checked = guard.check_output_location(
                path, inputs, kind="influence", overwrite=overwrite, storage_options=storage_options
            )
        else:  # checked with resumable=True, but the caller resumes nothing here: another job's output
            guard.require_resumed(path, checked, kind="influence", overwrite=overwrite)
        group = guard.lay_out_output(
            path,
            checked,
            functools.partial(
                _lay_out, test_ids=test_ids, train_ids=train_ids, chunks=chunks, n_tasks=n_tasks, attrs=attrs
            ),
            storage_options,
        )
        return cls(path, storage_options=storage_options, group=group)

    @classmethod
    def resumable(
        cls, path: str | os.PathLike[str], attrs: dict[str, Any], storage_options: StorageOptions = None
    ) -> InfluenceStore | None:
        """The unfinished output at ``path`` if it was started for the same job (same ``attrs``), else None."""
        if not backends.exists(path, storage_options):
            return None
        try:
            group = open_group(path, storage_options, read_only=False)
            meta = group_meta(group) or {}
        except Exception:
            return None
        if meta.get("kind") != "influence" or meta.get("complete"):
            return None
        if any(meta.get(k) != v for k, v in attrs.items()):
            return None
        return cls(path, storage_options=storage_options, group=group)

    @property
    def chunks(self) -> tuple[int, int]:
        rows, cols = self._array(INFLUENCE).chunks
        return int(rows), int(cols)

    def write_block(self, task: tuple[int, int], row0: int, col0: int, block: np.ndarray) -> None:
        rows, cols = block.shape
        self._array(INFLUENCE)[row0 : row0 + rows, col0 : col0 + cols] = block
        self._array(TASK_COMPLETE)[task] = 1

    def tasks_done(self) -> np.ndarray:
        return np.asarray(self._array(TASK_COMPLETE)[:]).astype(bool)

    def mark_complete(self) -> None:
        done = self.tasks_done()
        if not done.all():
            raise IncompleteStoreError(
                f"influence output {self.path}: {int((~done).sum())} blocks unwritten; rerun to finish it"
            )
        self._seal()


def _lay_out(
    path: str | os.PathLike[str],
    storage_options: StorageOptions,
    *,
    test_ids: np.ndarray,
    train_ids: np.ndarray,
    chunks: tuple[int, int],
    n_tasks: tuple[int, int],
    attrs: dict[str, Any],
) -> zarr.Group:
    """The empty output's arrays and attributes (``complete`` false until every task is flagged)."""
    group = create_group(path, storage_options)
    codecs = layout.checksum_codecs()
    n_test, n_train = len(test_ids), len(train_ids)
    group.create_array(
        INFLUENCE,
        shape=(n_test, n_train),
        chunks=chunks,
        dtype="float32",
        compressors=codecs,
        dimension_names=[TEST, TRAIN],
        fill_value=np.nan,
    )
    for name, ids in ((TEST, test_ids), (TRAIN, train_ids)):
        arr = group.create_array(
            name,
            shape=(len(ids),),
            chunks=(max(1, len(ids)),),
            dtype="int64",
            compressors=codecs,
            dimension_names=[name],
        )
        arr[:] = ids
    group.create_array(
        TASK_COMPLETE,
        shape=n_tasks,
        chunks=(1, 1),
        dtype="uint8",
        compressors=codecs,
        dimension_names=["test_block", "train_block"],
        fill_value=0,
    )
    group.attrs[layout.ATTRS_KEY] = {
        "kind": "influence",
        "format_version": layout.FORMAT_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "complete": False,
        **attrs,
    }
    return group


def open_influence(path: str | os.PathLike[str], *, storage_options: StorageOptions = None) -> xr.DataArray:
    """The (test, train) influence matrix at ``path`` as a lazy, dask-backed ``xarray.DataArray``."""
    import xarray as xr

    zstore = backends.zarr_store(path, storage_options=storage_options, read_only=True)
    try:
        group = zarr.open_group(store=zstore, mode="r", use_consolidated=False)
        meta = group_meta(group) or {}
    except Exception as e:
        raise StoreError(f"no influence output at {backends.normalize_path(path)}: {e}") from None
    if meta.get("kind") != "influence":
        raise StoreError(f"{backends.normalize_path(path)} is not an influence output of trackin-ooc")
    ds = xr.open_zarr(zstore, consolidated=False, chunks={})
    da: xr.DataArray = ds[INFLUENCE]
    da.attrs = {k: v for k, v in meta.items() if k != "kind"}
    return da
