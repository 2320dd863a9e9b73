"""The public scoring API: self-influence, influence matrices and exact top-k, as xarray objects."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np
import xarray as xr

from .engine import factor_kernels, graphs, planning, resources
from .engine.array_module import resolve_backend
from .engine.execute import compute
from .errors import ArgumentError, NonFiniteWarning
from .ranks import top_k_result
from .store import GradientStore, StoreLike, open_store
from .store.backends import StorageOptions
from .store.compatibility import check_compatible
from .store.guard import check_output_location
from .store.influence_store import InfluenceStore, open_influence

MemoryLimit = int | str | None


def _open(store: StoreLike, storage_options: StorageOptions = None) -> GradientStore:
    st = open_store(store, storage_options=storage_options).require_complete()
    if st.n_nonfinite:
        warnings.warn(
            f"{st.path}: {st.n_nonfinite} example(s) had NaN/inf gradients or losses and are stored as zeros "
            "(their scores are 0); see GradientStore.nonfinite_examples()",
            NonFiniteWarning,
            stacklevel=3,
        )
    return st


def plan_for(
    test: GradientStore, train: GradientStore, *, memory_limit: MemoryLimit = None, k: int = 0, client: Any = None
) -> planning.BlockPlan:
    """The block plan the engine would use for these stores under ``client`` or the active scheduler.

    Parameters
    ----------
    test, train : GradientStore
        The stores a score would read.
    memory_limit : int or str, optional
        The budget for the blocks in flight (bytes, or e.g. ``"2GiB"``); default: what the scheduler's
        workers (or this machine) have.
    k : int
        For top-k: the per-block result size the plan must leave room for; 0 for influence.
    client : distributed.Client, optional
        The scheduler whose workers the plan is for; default: the active one, or the local threads.

    Returns
    -------
    trackin_ooc.engine.planning.BlockPlan
        Block rows of each side and what they cost.
    """
    res = resources.detect(memory_limit, client)
    from .store.layout import itemsize

    return planning.plan_blocks(
        n_test=test.n_examples,
        n_train=train.n_examples,
        n_checkpoints=train.n_checkpoints,
        feature_dim=max(test.row_width, train.row_width),
        itemsize=itemsize(train.dtype),
        memory_limit=res.memory_limit,
        threads=res.threads,
        k=k,
        train_align=train.chunk_rows,
        test_align=test.chunk_rows,
        scratch=factor_kernels.scratch() if train.has_factors else planning.NO_SCRATCH,
    )


def self_influence(
    store: StoreLike,
    *,
    device: str = "auto",
    compute_now: bool = True,
    progress: bool | None = None,
    storage_options: StorageOptions = None,
    client: Any = None,
    exact_norms: bool = False,
) -> xr.DataArray:
    """Σ_c η_c ‖g_c(z)‖² for every example, in one read pass over the store.

    High values flag mislabelled or unusual training examples. By default ‖g_c‖² is that of the stored
    (projected) features, consistent with ``influence``'s diagonal; ``exact_norms=True`` uses the exact
    gradient norms every capture also stores, so it is exact whatever the projection (and reads C
    numbers per example instead of C × features).

    Parameters
    ----------
    store : GradientStore, str or path
        A complete gradient store (a local path or an ``s3://`` / fsspec URL).
    device : {"auto", "cpu", "cuda"}
        Where the blocks are reduced ("auto": CuPy on a GPU when there is one).
    compute_now : bool
        False keeps the result lazy (dask-backed); nothing is read until it is computed.
    progress : bool, optional
        Force the progress bar on or off; default: on a terminal or in Jupyter.
    storage_options : dict, optional
        fsspec options for remote stores (credentials, endpoint).
    client : distributed.Client, optional
        The scheduler to run on; default: the active one, or local threads.
    exact_norms : bool
        Use the exact per-example gradient norms instead of the projected features' norms.

    Returns
    -------
    xarray.DataArray
        Dims ("example",), the example ids as coordinate (and ``label`` where the store holds labels).

    Raises
    ------
    IncompleteStoreError
        The store's capture has not finished (resume it first).
    StoreError
        ``exact_norms=True`` on a store without exact norms.
    """
    st = _open(store, storage_options)
    if exact_norms:
        st.require_exact_norms()
    backend = resolve_backend(device).name
    data = graphs.self_influence_array(st, backend, exact_norms=exact_norms)
    coords: dict[str, Any] = {"example": st.example_ids()}
    if st.has_labels:
        coords["label"] = ("example", st.labels())
    arr = xr.DataArray(
        data,
        dims=("example",),
        coords=coords,
        name="self_influence",
        attrs={"store": st.path, "fingerprint": st.fingerprint, "exact_norms": bool(exact_norms)},
    )
    if compute_now:
        (values,) = compute(arr.data, desc="self-influence", progress=progress, client=client)
        arr = arr.copy(data=values)
    return arr


def influence(
    test: StoreLike,
    train: StoreLike,
    *,
    out: str | os.PathLike[str] | None = None,
    normalize: bool = False,
    device: str = "auto",
    memory_limit: MemoryLimit = None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: StorageOptions = None,
    client: Any = None,
) -> xr.DataArray:
    """The (test, train) influence matrix Σ_c η_c ⟨g_c(z'), g_c(z)⟩ (cosine with ``normalize``).

    Without ``out`` the result is lazy (nothing is computed until asked). With ``out`` every block is
    written to a Zarr group there, task by task, and the result is lazily opened from it; rerunning
    the same call after an interruption (with or without ``overwrite``) writes only the blocks still
    missing. ``out`` is checked first: never an input store, inside one or around one, and
    ``overwrite`` replaces only an earlier influence output.

    Parameters
    ----------
    test, train : GradientStore, str or path
        Complete, compatible stores (same checkpoints, projection and preconditioner).
    out : str or path, optional
        A Zarr group to write the matrix to, block by block (resumable).
    normalize : bool
        Cosine of the per-checkpoint features instead of their dot product.
    device : {"auto", "cpu", "cuda"}
        Where the blocks are multiplied.
    memory_limit : int or str, optional
        Budget for the blocks in flight (bytes or e.g. ``"2GiB"``).
    overwrite : bool
        Replace an earlier influence output at ``out``.
    progress : bool, optional
        Force the progress bar on or off.
    storage_options : dict, optional
        fsspec options for remote stores and outputs.
    client : distributed.Client, optional
        The scheduler to run on.

    Returns
    -------
    xarray.DataArray
        Dims ("test", "train"), float32; lazy without ``out``, opened from ``out`` with it.

    Raises
    ------
    IncompatibleStoresError
        The stores were captured differently (checkpoints, projection, seed, preconditioner).
    StoreExistsError
        ``out`` exists and ``overwrite`` is False.
    OutputOverlapsInputError
        ``out`` is an input store, inside one or around one.
    """
    checked = None
    if out is not None:  # the output rule, once, before any work
        checked = check_output_location(
            out, (test, train), kind="influence", overwrite=overwrite, resumable=True, storage_options=storage_options
        )
    te, tr = _open(test, storage_options), _open(train, storage_options)
    check_compatible(te, tr)
    backend = resolve_backend(device).name
    plan = plan_for(te, tr, memory_limit=memory_limit, client=client)
    attrs = {
        "normalize": bool(normalize),
        "test_store": te.path,
        "train_store": tr.path,
        "test_fingerprint": te.fingerprint,
        "train_fingerprint": tr.fingerprint,
        "test_store_id": te.store_id,
        "train_store_id": tr.store_id,
        "learning_rates": [float(x) for x in tr.learning_rates],
    }
    if out is None:
        data = graphs.influence_array(te, tr, plan, normalize, backend)
        return xr.DataArray(
            data,
            dims=("test", "train"),
            coords={"test": te.example_ids(), "train": tr.example_ids()},
            name="influence",
            attrs=attrs,
        )
    # An unfinished output of this very job (an interrupted run, or an interrupted overwrite) is
    # resumed; anything else at ``out`` is replaced only with ``overwrite``.
    target = InfluenceStore.resumable(out, attrs, storage_options)
    skip = None
    if target is not None:  # finish only the missing blocks
        rows, cols = target.chunks
        plan = dataclasses.replace(plan, test_rows=rows, train_rows=cols)
        skip = target.tasks_done()
    else:
        target = InfluenceStore.create(
            out,
            test_ids=te.example_ids(),
            train_ids=tr.example_ids(),
            chunks=(plan.test_rows, plan.train_rows),
            n_tasks=(len(plan.test_blocks(te.n_examples)), len(plan.train_blocks(tr.n_examples))),
            attrs=attrs,
            overwrite=overwrite,
            storage_options=storage_options,
            checked=checked,
        )
    compute(
        graphs.influence_write_graph(te, tr, plan, normalize, backend, target, skip=skip),
        desc="influence",
        progress=progress,
        client=client,
    )
    target.mark_complete()
    opened: xr.DataArray = open_influence(out, storage_options=storage_options)
    return opened


def top_k(
    test: StoreLike,
    train: StoreLike,
    *,
    k: int = 10,
    normalize: bool = False,
    index: Any = None,
    n_probe: int | None = None,
    device: str = "auto",
    memory_limit: MemoryLimit = None,
    compute_now: bool = True,
    progress: bool | None = None,
    storage_options: StorageOptions = None,
    client: Any = None,
) -> xr.Dataset:
    """Exact top-k proponents (highest scores) and opponents (lowest) of every test example.

    One streaming pass over the train store per test block; no score block outlives its task.
    Ties go to the lower train index. Dims ("test", "rank"); ranks count from 1 (the strongest), as in
    the CLI's tables. ``proponent_index``/``opponent_index`` are positions in the train store; where
    the train store holds labels, ``proponent_label``/``opponent_label`` are theirs, and where the test
    store does, the ``test_label`` coordinate.

    ``index``: a :class:`TopKIndex` of ``train`` (``build_index``), its path, or True for the train
    store's saved index. Then only the ``n_probe`` lists nearest each test example (per end; default
    calibrated at build time for recall@10 ≥ 0.95) are read and scored exactly; a better example in an
    unprobed list may be missed. ``attrs["approximate"]`` is True and ``attrs["fraction_read"]`` tells
    the fraction of train rows read.

    Parameters
    ----------
    test, train : GradientStore, str or path
        Complete, compatible stores.
    k : int
        Proponents and opponents per test example (at most the train store's size).
    normalize : bool
        Rank by cosine instead of the raw TracIn dot product.
    index : TopKIndex, str, path or True, optional
        Read only the probed lists of this index of ``train``.
    n_probe : int, optional
        Lists probed per test example and end (with ``index``); default: the calibrated value.
    device : {"auto", "cpu", "cuda"}
        Where the blocks are scored.
    memory_limit : int or str, optional
        Budget for the blocks in flight.
    compute_now : bool
        False returns lazy (dask-backed) variables.
    progress : bool, optional
        Force the progress bar on or off.
    storage_options : dict, optional
        fsspec options for remote stores.
    client : distributed.Client, optional
        The scheduler to run on.

    Returns
    -------
    xarray.Dataset
        ``proponent_index``, ``proponent_score``, ``opponent_index``, ``opponent_score`` with dims
        ("test", "rank").

    Raises
    ------
    ArgumentError
        ``k`` is not a positive integer no larger than the train store, or ``n_probe`` without an index.
    IncompatibleStoresError
        The stores were captured differently.
    StaleIndexError
        ``index`` was built on another version of the train store.
    """
    te, tr = _open(test, storage_options), _open(train, storage_options)
    check_compatible(te, tr)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ArgumentError(f"k must be a positive integer, got {k!r}; pass e.g. k=10")
    if k > tr.n_examples:
        raise ArgumentError(
            f"k={k} is larger than the train store's {tr.n_examples} examples; use k <= {tr.n_examples}"
        )
    if index is not None and index is not False:
        from .indexing import index_top_k

        return index_top_k(
            te,
            tr,
            index,
            k=int(k),
            n_probe=n_probe,
            normalize=normalize,
            device=device,
            memory_limit=memory_limit,
            compute_now=compute_now,
            progress=progress,
            client=client,
        )
    if n_probe is not None:
        raise ArgumentError("n_probe needs an index: pass index=build_index(train) (or index=True)")
    backend = resolve_backend(device).name
    plan = plan_for(te, tr, memory_limit=memory_limit, k=int(k), client=client)
    arrays = graphs.topk_arrays(te, tr, plan, int(k), normalize, backend)
    return top_k_result(
        te,
        tr,
        arrays,
        k=int(k),
        normalize=normalize,
        attrs={"approximate": False},
        compute_now=compute_now,
        progress=progress,
        client=client,
    )
