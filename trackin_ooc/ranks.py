"""One rank convention for every result: rank 1 is the strongest (Python and CLI alike), labels beside ids.

``to.top_k``, the top-k tables, self-influence tables and net-influence tables all count ranks from 1.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import xarray as xr

TOP_K_RANK = "1 = strongest proponent (highest score) / opponent (lowest score)"


def rank_coordinate(k: int) -> np.ndarray:
    """Ranks 1..k."""
    return np.arange(1, int(k) + 1, dtype=np.int64)


def _pick(index: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return labels[index]


def label_top_k(ds: xr.Dataset, test, train) -> xr.Dataset:
    """A top-k Dataset with its ranks described and, where the stores hold labels, ``proponent_label`` and
    ``opponent_label`` (the train labels at ``*_index``) and a ``test_label`` coordinate.

    On a lazy result (``compute_now=False``) the labels are read when it is computed, not before.
    """
    ds["rank"].attrs["description"] = TOP_K_RANK
    if train.has_labels:
        lazy = not isinstance(ds["proponent_index"].data, np.ndarray)
        labels = dask.delayed(train.labels, pure=True)() if lazy else None
        dtype = train.label_dtype
        for side in ("proponent", "opponent"):
            index = ds[f"{side}_index"].data
            picked = (
                index.map_blocks(_pick, labels, dtype=dtype, meta=np.empty((0, 0), dtype=dtype))
                if lazy
                else train.labels(index)  # the chunks holding those rows only: a few for a small query
            )
            ds[f"{side}_label"] = (("test", "rank"), picked)
    if test.has_labels:
        ds = ds.assign_coords(test_label=("test", test.labels()))
    return ds


def top_k_result(
    test: Any,
    train: Any,
    arrays: tuple[Any, Any, Any, Any],
    *,
    k: int,
    normalize: bool,
    attrs: dict[str, Any],
    compute_now: bool,
    progress: bool | None,
    client: Any,
) -> xr.Dataset:
    """The one place a top-k result is assembled, streamed or indexed: the four (test, rank) arrays
    (proponent index and score, opponent index and score) with the stores' ids and fingerprints, computed
    when ``compute_now``, then ranked and labelled (:func:`label_top_k`)."""
    from .engine.execute import compute

    pi, ps, oi, os_ = arrays
    dims = ("test", "rank")
    ds = xr.Dataset(
        {
            "proponent_index": (dims, pi),
            "proponent_score": (dims, ps),
            "opponent_index": (dims, oi),
            "opponent_score": (dims, os_),
        },
        coords={"test": test.example_ids(), "rank": rank_coordinate(k)},
        attrs={
            "k": int(k),
            "normalize": bool(normalize),
            "test_store": test.path,
            "train_store": train.path,
            "test_fingerprint": test.fingerprint,
            "train_fingerprint": train.fingerprint,
            **attrs,
        },
    )
    if compute_now:
        names = list(ds.data_vars)
        values = compute(*(ds[n].data for n in names), desc="top-k", progress=progress, client=client)
        ds = ds.copy(data={n: v for n, v in zip(names, values)})
    return label_top_k(ds, test, train)
