"""Top-k on big stores without reading them whole: build an out-of-core IVF index once, then query it.

    idx = build_index(train)                      # saved in the train store's folder
    top_k(test, train, k=10, index=idx)           # reads only the probed lists; exact scores

The scores returned are exact for the rows returned; what may be missed is a better row in a list
that was not probed (docs/queries.md).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import xarray as xr

from .engine import ivf, ivf_build, ivf_graphs, planning, resources
from .engine.array_module import resolve_backend
from .engine.execute import compute
from .errors import ArgumentError, StoreError
from .ranks import top_k_result
from .store import GradientStore, StoreLike, backends, open_store
from .store.backends import StorageOptions
from .store.guard import check_output_location, location
from .store.index_store import TopKIndex, default_index_path, find_index, index_meta
from .store.index_store import open_index as _open_index_path
from .store.lock import StoreLock

log = logging.getLogger("trackin_ooc")

IndexLike = TopKIndex | str | os.PathLike[str] | bool

# At the default n_probe, a query whose probed lists hold more than this fraction of the rows streams the
# train store instead (exact, and cheaper than reading most rows scattered).
STREAM_FRACTION = 0.3


def require_flat(store: GradientStore, what: str) -> GradientStore:
    """Refuse a store of per-layer factors (layout version 2): ``what`` works on flat gradient features."""
    if getattr(store, "has_factors", False):
        raise ArgumentError(
            f"{what} needs flat gradient features, and {store.path} stores per-layer factors "
            "(projection='factors'); use the exact top_k/influence, or capture with a projection (projection_dim=...)"
        )
    return store


def _params(train: GradientStore, n_lists: int, normalize: bool, seed: int, target_recall: float) -> dict[str, Any]:
    """What makes two builds the same job (a killed build resumes only the same job)."""
    return {
        "n_lists": int(n_lists),
        "normalize": bool(normalize),
        "seed": int(seed),
        "target_recall": float(target_recall),
        "train_fingerprint": train.fingerprint,
    }


def build_index(
    train: StoreLike,
    *,
    path: str | os.PathLike[str] | None = None,
    n_lists: int | None = None,
    normalize: bool = False,
    target_recall: float = ivf.TARGET_RECALL,
    seed: int = 0,
    overwrite: bool = False,
    memory_limit: int | str | None = None,
    progress: bool | None = None,
    storage_options: StorageOptions = None,
    client: Any = None,
) -> TopKIndex:
    """An out-of-core inverted-file index of ``train`` for ``top_k(..., index=...)``.

    Four steps, each in bounded memory under the active Dask scheduler: a sample pass (k-means
    quantizer of ``n_lists`` centroids, default ≈ √N, with no list above twice the mean size), an
    assignment pass (each row's list; rows sorted by list within each source block into a staging
    copy), a calibration of the default ``n_probe`` for ``target_recall`` (recall@10 at both ends on
    sampled rows held out of the quantizer's fit), and a gather pass (each list one contiguous run of
    rows). Saved in the store's folder unless ``path`` is given (``normalize=True``: an index for
    cosine queries, saved apart). A killed build resumes when the same call is repeated;
    ``overwrite=True`` replaces a finished index (or an unfinished one of another build).

    Where the calibration finds that the target recall needs more than a quarter of the rows per test
    example, the store has no structure an index can use: the build says so in one line (logged, and
    ``TopKIndex.verdict``) and ``top_k(index=...)`` at the default ``n_probe`` streams exact top-k.

    Parameters
    ----------
    train : GradientStore or path
        A complete store of flat features (not per-layer factors), non-negative learning rates.
    n_lists : int, optional
        Number of inverted lists (default about √N).
    normalize : bool
        Build for cosine (``top_k(normalize=True)``) queries instead of dot products.
    target_recall : float
        Recall@10 the default ``n_probe`` is calibrated for (a margin of 0.02 is added).
    path : str or path, optional
        Where the index goes; default: inside the train store's folder.
    seed : int
        Seed of the k-means sample and the held-out calibration queries.
    overwrite : bool
        Replace a finished index (or an unfinished one of another build) at the location.
    memory_limit : int or str, optional
        Budget for the blocks in flight.
    progress : bool, optional
        Force the progress bars on or off.
    storage_options : dict, optional
        fsspec options for remote stores.
    client : distributed.Client, optional
        The scheduler to run on.

    Returns
    -------
    TopKIndex
        The complete index; ``structured`` says whether queries use its lists.

    Raises
    ------
    ArgumentError
        Bad ``n_lists`` or ``target_recall``, a factor store, negative learning rates.
    StoreError
        An unfinished index of another build at ``path`` (pass ``overwrite=True``).
    """
    tr = require_flat(open_store(train, storage_options=storage_options).require_complete(), "an index")
    if n_lists is not None and (
        isinstance(n_lists, bool) or not isinstance(n_lists, (int, np.integer)) or not 1 <= n_lists <= tr.n_examples
    ):
        raise ArgumentError(
            f"n_lists must be an integer from 1 to the store's {tr.n_examples} examples, got {n_lists!r}"
        )
    if not 0 < target_recall <= 1:
        raise ArgumentError(f"target_recall must be in (0, 1], got {target_recall!r}")
    ivf.index_weights(tr.learning_rates)  # refuses negative learning rates before any work
    default_path = default_index_path(tr, normalize)
    out = default_path if path is None else path
    here, there = location(out), location(default_path)
    inside = (here.scheme, here.path) == (there.scheme, there.path)
    # The default location belongs to the store; anywhere else must not touch an input store.
    check_output_location(
        out, () if inside else (tr,), kind="index", overwrite=overwrite, resumable=True, storage_options=storage_options
    )
    res = resources.detect(memory_limit, client)
    n_lists = int(n_lists or ivf.default_n_lists(tr.n_examples))
    params = _params(tr, n_lists, normalize, seed, target_recall)
    with StoreLock(out, storage_options):
        idx = TopKIndex.resumable(out, tr, params, storage_options)
        if idx is None:
            meta = index_meta(out, storage_options)
            ours = meta is not None and meta.get("train_store_id") == tr.store_id and meta.get("params") == params
            if meta is not None and not meta.get("complete") and not overwrite and not ours:
                raise StoreError(
                    f"{backends.normalize_path(out)} holds an unfinished index of another build (other store "
                    "version or parameters); pass overwrite=True (--overwrite) to start over"
                )
            # Nothing there, a finished index that overwrite replaces, or this very build killed while laying
            # out (too early to resume): start over.
            if backends.exists(out, storage_options):
                backends.remove(out, storage_options)
            idx = ivf_build.lay_out_index(
                tr, out, n_lists, normalize, seed, params, res.memory_limit, progress, client, storage_options
            )
        ivf_build.fill_index(tr, idx, normalize, target_recall, progress, client)
    return TopKIndex(out, storage_options=storage_options)


def open_index(
    store: StoreLike | TopKIndex, *, normalize: bool = False, storage_options: StorageOptions = None
) -> TopKIndex:
    """The index saved for ``store`` (a gradient store or its path), or the index at an index's own path.

    Parameters
    ----------
    store : GradientStore, TopKIndex, str or path
        A train store whose index to open, or an index's own location.
    normalize : bool
        The cosine index instead of the dot-product one.
    storage_options : dict, optional
        fsspec options for remote stores.

    Returns
    -------
    TopKIndex

    Raises
    ------
    StoreError
        The store has no such index (build one with ``build_index``).
    """
    if isinstance(store, TopKIndex):
        return store
    if not isinstance(store, GradientStore) and index_meta(store, storage_options) is not None:
        return _open_index_path(store, storage_options=storage_options)
    st = open_store(store, storage_options=storage_options)
    idx = find_index(st, normalize)
    if idx is None:
        what = "cosine " if normalize else ""
        raise StoreError(
            f"store {st.path} has no {what}index; build one with trackin_ooc.build_index(store"
            f"{', normalize=True' if normalize else ''}) (trackin-ooc index {st.path})"
        )
    return idx


def resolve_index(index: IndexLike, train: GradientStore, normalize: bool) -> TopKIndex:
    """The index to use for ``top_k``: checked complete, made for this very train store and for ``normalize``."""
    if index is True:
        idx = open_index(train, normalize=normalize)
    elif isinstance(index, (TopKIndex, str, os.PathLike)):
        idx = index if isinstance(index, TopKIndex) else _open_index_path(index, storage_options=train.storage_options)
    else:
        raise ArgumentError(f"index must be a TopKIndex, an index path or True (the train store's own), got {index!r}")
    idx.check_for(train)
    if idx.normalize != bool(normalize):
        want = "normalize=True (cosine)" if normalize else "normalize=False (dot products)"
        raise ArgumentError(
            f"index {idx.path} was built for normalize={idx.normalize}; for {want} queries build "
            f"one with build_index(train, normalize={bool(normalize)})"
        )
    return idx


def index_top_k(
    te: GradientStore,
    tr: GradientStore,
    index: IndexLike,
    *,
    k: int,
    n_probe: int | None,
    normalize: bool,
    device: str,
    memory_limit: int | str | None,
    compute_now: bool,
    progress: bool | None,
    client: Any,
) -> xr.Dataset:
    """``top_k`` through an index (called by :func:`trackin_ooc.top_k`; stores already checked compatible)."""
    require_flat(tr, "an index")
    require_flat(te, "an index query")
    idx = resolve_index(index, tr, normalize)
    stream = dict(
        te=te,
        tr=tr,
        idx=idx,
        k=k,
        normalize=normalize,
        device=device,
        memory_limit=memory_limit,
        compute_now=compute_now,
        progress=progress,
        client=client,
    )
    by_default = n_probe is None
    if by_default and not idx.structured:
        return _streamed(**stream, why="no structure")
    if n_probe is None:
        pass  # each end's own calibrated n_probe
    elif isinstance(n_probe, bool) or not isinstance(n_probe, (int, np.integer)) or n_probe < 1:
        raise ArgumentError(f"n_probe must be a positive integer (lists read per test example), got {n_probe!r}")
    n_probe = int(min(n_probe, idx.n_lists)) if n_probe is not None else None
    backend = resolve_backend(device).name
    res = resources.detect(memory_limit, client)
    from .store.layout import itemsize

    plan = planning.plan_blocks(
        n_test=te.n_examples,
        n_train=tr.n_examples,
        n_checkpoints=tr.n_checkpoints,
        feature_dim=tr.feature_dim,
        itemsize=itemsize(tr.dtype),
        memory_limit=res.memory_limit,
        threads=res.threads,
        k=int(k),
        test_align=te.chunk_rows,
    )
    (probed,) = compute(
        ivf_graphs.probe_graph(te, idx, plan, normalize, n_probe, int(k)),
        desc="top-k: probe",
        progress=False,
        client=client,
    )
    sizes = idx.list_sizes()
    read = int(sum(sizes[lists].sum() for lists in probed))
    if by_default and read > STREAM_FRACTION * tr.n_examples * max(1, len(probed)):
        # The test examples' lists together cover most rows: one streaming pass is cheaper, and exact.
        return _streamed(**stream, why="lists cover most rows")
    offsets = idx.list_offsets()
    rows = [ivf.rows_of_lists(lists, offsets) for lists in probed]
    arrays = ivf_graphs.search_arrays(te, idx, plan, rows, int(k), normalize, backend)
    return top_k_result(
        te,
        tr,
        arrays,
        k=int(k),
        normalize=normalize,
        compute_now=compute_now,
        progress=progress,
        client=client,
        attrs={
            "approximate": True,
            "index": idx.path,
            "n_probe": idx.n_probe if n_probe is None else n_probe,
            "n_lists": idx.n_lists,
            "rows_read": int(read),
            "fraction_read": float(read / (tr.n_examples * max(1, len(rows)))),
            "bytes_read": int(read * tr.n_checkpoints * tr.feature_dim * itemsize(tr.dtype)),
        },
    )


def _streamed(
    *,
    te: GradientStore,
    tr: GradientStore,
    idx: TopKIndex,
    k: int,
    normalize: bool,
    device: str,
    memory_limit: int | str | None,
    compute_now: bool,
    progress: bool | None,
    client: Any,
    why: str,
) -> xr.Dataset:
    """Exact streaming top-k in place of an indexed query, saying so in its attributes."""
    from .scores import top_k

    ds = top_k(
        te,
        tr,
        k=k,
        normalize=normalize,
        device=device,
        memory_limit=memory_limit,
        compute_now=compute_now,
        progress=progress,
        client=client,
    )
    ds.attrs.update(
        {
            "index": idx.path,
            "n_probe": idx.n_lists,
            "n_lists": idx.n_lists,
            "streamed": why,
            "rows_read": int(tr.n_examples),
            "fraction_read": 1.0,
            "bytes_read": int(tr.nbytes),
        }
    )
    return ds
