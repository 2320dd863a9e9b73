"""Net influence: which training examples help or hurt a whole test set (or each class of it).

``net_influence(test, train)`` equals ``influence(test, train).sum("test")`` but reads each store
once and never forms the test × train matrix (engine/net_graphs.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .engine import planning, resources
from .engine.execute import compute
from .engine.net_graphs import net_influence_array
from .errors import ArgumentError
from .indexing import require_flat
from .store import GradientStore, StoreLike, open_store
from .store.backends import StorageOptions
from .store.compatibility import check_compatible
from .store.layout import itemsize

Groups = str | Sequence[Any] | np.ndarray | None


def _groups(by: Groups, te: GradientStore) -> tuple[np.ndarray, np.ndarray] | None:
    """(group labels, code per test example), or None for one sum over the whole test set."""
    if by is None:
        return None
    if isinstance(by, str):
        if by != "label":
            raise ArgumentError(f"by must be None, 'label' or one group per test example, got {by!r}")
        if not te.has_labels:
            raise ArgumentError(
                f"by='label' needs test labels, and store {te.path} has none; pass by=[...] "
                "(one group per test example)"
            )
        by = te.labels()
    values = np.asarray(by)
    if values.ndim != 1 or len(values) != te.n_examples:
        raise ArgumentError(f"by has shape {values.shape}; give one group per test example ({te.n_examples},)")
    labels, codes = np.unique(values, return_inverse=True)
    return labels, codes.astype(np.int64)


def net_influence(
    test: StoreLike,
    train: StoreLike,
    *,
    by: Groups = None,
    normalize: bool = False,
    memory_limit: int | str | None = None,
    compute_now: bool = True,
    progress: bool | None = None,
    storage_options: StorageOptions = None,
    client: Any = None,
) -> xr.DataArray:
    """Σ over test examples of influence(test example, train example), for every train example.

    Positive: the train example pushes the test set's losses down (helps), negative: up (hurts). By
    linearity this is one pass over the train store against the summed test features: the influence
    matrix is never built.

    Parameters
    ----------
    test, train : GradientStore, str or path
        Complete, compatible flat stores (not per-layer factor stores).
    by : None, "label" or array-like
        None: one sum over the test set; "label": one per test label; or one group per test example.
    normalize : bool
        Sum cosines instead of raw dot products.
    memory_limit : int or str, optional
        Budget for the blocks in flight.
    compute_now : bool
        False keeps the result lazy.
    progress : bool, optional
        Force the progress bar on or off.
    storage_options : dict, optional
        fsspec options for remote stores.
    client : distributed.Client, optional
        The scheduler to run on.

    Returns
    -------
    xarray.DataArray
        Dims ("train",) without ``by``, else ("group", "train") with the sorted group labels and
        ``n_test`` per group as coordinates; the train labels, where stored, as coordinate ``label``.

    Raises
    ------
    ArgumentError
        ``by`` does not give one group per test example, or the groups do not fit the memory budget.
    IncompatibleStoresError
        The stores were captured differently.
    """
    te = open_store(test, storage_options=storage_options).require_complete()
    tr = open_store(train, storage_options=storage_options).require_complete()
    check_compatible(te, tr)
    require_flat(tr, "net_influence")
    grouping = _groups(by, te)
    labels, codes = grouping if grouping is not None else (np.array([0]), np.zeros(te.n_examples, np.int64))
    width = tr.n_checkpoints * tr.feature_dim
    res = resources.detect(memory_limit, client)
    if len(labels) * width * 8 * 4 > res.memory_limit:
        raise ArgumentError(f"{len(labels)} groups × {width} features do not fit the memory budget; use fewer groups")
    plan = planning.plan_blocks(
        n_test=len(labels),
        n_train=tr.n_examples,
        n_checkpoints=tr.n_checkpoints,
        feature_dim=tr.feature_dim,
        itemsize=itemsize(tr.dtype),
        memory_limit=res.memory_limit,
        threads=res.threads,
        train_align=tr.chunk_rows,
    )
    data = net_influence_array(te, tr, codes, len(labels), normalize, plan.train_rows)
    coords: dict[str, Any] = {"train": tr.example_ids()}
    if tr.has_labels:
        coords["label"] = ("train", tr.labels())
    attrs = {
        "normalize": bool(normalize),
        "test_store": te.path,
        "train_store": tr.path,
        "test_fingerprint": te.fingerprint,
        "train_fingerprint": tr.fingerprint,
        "n_test": te.n_examples,
        "by": "label" if isinstance(by, str) else ("groups" if by is not None else "none"),
    }
    if grouping is None:
        arr = xr.DataArray(data[0], dims=("train",), coords=coords, name="net_influence", attrs=attrs)
    else:
        coords["group"] = labels
        coords["n_test"] = ("group", np.bincount(codes, minlength=len(labels)))
        arr = xr.DataArray(data, dims=("group", "train"), coords=coords, name="net_influence", attrs=attrs)
    if compute_now:
        (values,) = compute(arr.data, desc="net influence", progress=progress, client=client)
        arr = arr.copy(data=values)
    return arr
