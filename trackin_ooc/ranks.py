"""One rank convention for every result: rank 1 is the strongest (Python and CLI alike), labels beside ids.

``to.top_k``, the top-k tables, self-influence tables and net-influence tables all count ranks from 1.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

TOP_K_RANK = "1 = strongest proponent (highest score) / opponent (lowest score)"


def rank_coordinate(k: int) -> np.ndarray:
    """Ranks 1..k."""
    return np.arange(1, int(k) + 1, dtype=np.int64)


def _take(labels: np.ndarray, index):
    """``labels[index]`` for a NumPy or a dask array of positions (lazily for dask)."""
    if isinstance(index, np.ndarray):
        return labels[index]
    return index.map_blocks(labels.__getitem__, dtype=labels.dtype)


def label_top_k(ds: xr.Dataset, test, train) -> xr.Dataset:
    """A top-k Dataset with its ranks described and, where the stores hold labels, ``proponent_label`` and
    ``opponent_label`` (the train labels at ``*_index``) and a ``test_label`` coordinate."""
    ds["rank"].attrs["description"] = TOP_K_RANK
    labels = train.labels()
    if labels is not None:
        for side in ("proponent", "opponent"):
            ds[f"{side}_label"] = (("test", "rank"), _take(labels, ds[f"{side}_index"].data))
    if test.has_labels:
        ds = ds.assign_coords(test_label=("test", test.labels()))
    return ds
