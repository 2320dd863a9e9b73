"""Build a store from gradient features computed elsewhere (numpy, dask or zarr arrays)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import StoreError
from ..spec import ProjectionSpec
from .backends import StorageOptions
from .gradient_store import GradientStore
from .rows import RowBlock


def from_arrays(
    path: str | os.PathLike[str],
    grads: Any,
    learning_rates: Sequence[float] | np.ndarray,
    *,
    example_ids: Sequence[int] | np.ndarray | None = None,
    labels: Sequence[Any] | np.ndarray | None = None,
    losses: Any = None,
    dtype: str | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    storage_options: StorageOptions = None,
) -> GradientStore:
    """Write ``grads`` of shape (checkpoint, example, feature) as a complete gradient store.

    The array is read one row block at a time, so a dask or zarr array larger than memory works.
    Stores made here combine with each other when their feature widths agree.

    Parameters
    ----------
    path : str or path
        Where the store goes (local or fsspec URL).
    grads : array-like
        Features of shape (checkpoint, example, feature): NumPy, dask or zarr.
    learning_rates : sequence of float
        η_c, one per checkpoint.
    example_ids : sequence of int, optional
        The examples' ids (default 0..n-1).
    labels : sequence, optional
        One label per example, shown beside scores.
    losses : array-like, optional
        Per-checkpoint losses (checkpoint, example).
    dtype : {"float32", "float16", "bfloat16"}, optional
        Storage dtype; default float16 for float16 input, else float32.
    chunk_rows : int, optional
        Rows per chunk; default from the feature width.
    overwrite : bool
        Replace an earlier gradient store at ``path``.
    storage_options : dict, optional
        fsspec options for a remote ``path``.

    Returns
    -------
    GradientStore
        The complete store.

    Raises
    ------
    StoreError
        ``grads`` is not 3-D, or the learning rates, labels or ids do not match its shape.
    StoreExistsError
        A store is at ``path`` and ``overwrite`` is False.
    """
    shape = tuple(getattr(grads, "shape", ()))
    if len(shape) != 3:
        raise StoreError(f"grads must have shape (checkpoint, example, feature), got shape {shape}")
    n_ckpt, n_ex, n_feat = shape
    lrs = np.atleast_1d(np.asarray(learning_rates, dtype=np.float64))
    if lrs.shape != (n_ckpt,):
        raise StoreError(f"{lrs.size} learning rates given for {n_ckpt} checkpoints; give one per checkpoint")
    if dtype is None:
        dtype = "float16" if np.dtype(getattr(grads, "dtype", "float32")) == np.float16 else "float32"
    label_arr = None if labels is None else np.asarray(labels)
    if label_arr is not None and label_arr.shape != (n_ex,):
        raise StoreError(f"labels have shape {label_arr.shape}; expected ({n_ex},)")
    spec = ProjectionSpec(kind="external", dim=int(n_feat))
    store = GradientStore.create(
        path,
        n_checkpoints=n_ckpt,
        n_examples=n_ex,
        spec=spec,
        learning_rates=lrs,
        dtype=dtype,
        label_dtype=None if label_arr is None else label_arr.dtype,
        example_ids=None if example_ids is None else np.asarray(example_ids),
        chunk_rows=chunk_rows,
        overwrite=overwrite,
        storage_options=storage_options,
    )
    for start, stop in store.row_blocks():
        block = np.asarray(grads[:, start:stop, :], dtype=np.float32)
        loss = None if losses is None else np.asarray(losses[:, start:stop], dtype=np.float32)
        store.write_block(start, RowBlock(block, loss, None if label_arr is None else label_arr[start:stop]))
    return store.mark_complete()
