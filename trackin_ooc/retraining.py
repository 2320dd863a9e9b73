"""Retrain on random subsets of the training data: the experiment that the linear datamodeling score needs.

    runs = retrain(train_fn, n_train=2000, n_subsets=64, out="runs.zarr")   # Dask tasks, resumable
    lds(test, train, runs)                                                   # how well scores predict them

``train_fn(indices, seed)`` trains a fresh model on the training examples ``indices`` (sorted positions
0..n_train-1, the order the gradient store uses) with ``seed`` and returns its losses on the test examples,
one per test example, in the test store's order. Subset ``s`` and its seed follow from ``(seed, s)`` alone,
so a rerun (or another machine) draws the same subsets.

Each retraining is one Dask task on the active scheduler: ``client=`` if given, else a
``distributed.Client`` if one is active, else dask's local scheduler in this process. Within one process
retrainings run one at a time (a user's ``train_fn`` typically seeds torch's global RNG, which threads
share; one at a time keeps every run reproducible): run them in parallel on worker processes
(``LocalCluster(n_workers=N, threads_per_worker=1)`` or an HPC cluster). With ``out=`` each finished
retraining is written to a Zarr store at once, by the process that called ``retrain``, and a rerun skips
those already written.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable

import numpy as np
import xarray as xr

from .engine.resources import active_client
from .errors import ArgumentError, StoreError
from .progress import progress_bar, progress_enabled
from .store import guard
from .store.backends import StorageOptions
from .store.lock import StoreLock
from .store.runs_store import KIND, OUTPUT, SEED, SUBSET, TEST, TRAIN, RunsStore, job_difference, open_runs_store

log = logging.getLogger("trackin_ooc")

TrainFn = Callable[[np.ndarray, int], object]
# One retraining at a time per process (see the module docstring).
_ONE_AT_A_TIME = threading.Lock()


# ---- the subsets -----------------------------------------------------------------------------------
def subset_size(n_train: int, fraction: float) -> int:
    """Training examples per subset: ``round(fraction · n_train)``, at least 1 and at most n_train − 1."""
    return int(min(max(1, round(fraction * n_train)), max(1, n_train - 1)))


def subset_indices(n_train: int, size: int, seed: int, index: int) -> np.ndarray:
    """Sorted positions of subset ``index``: ``size`` of 0..n_train-1 drawn without replacement from
    ``SeedSequence([seed, index])`` (independent of how many subsets there are)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    return np.sort(rng.choice(n_train, size=size, replace=False)).astype(np.int64)


def run_seed(seed: int, index: int) -> int:
    """The seed retraining ``index`` is given: a 31-bit integer from ``SeedSequence([seed, index, 1])``."""
    return int(np.random.SeedSequence([int(seed), int(index), 1]).generate_state(1, np.uint32)[0] & 0x7FFFFFFF)


def subset_masks(n_train: int, n_subsets: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bool (subset, train) masks, int64 (subset,) seeds) of the job."""
    size = subset_size(n_train, fraction)
    masks = np.zeros((n_subsets, n_train), dtype=bool)
    for s in range(n_subsets):
        masks[s, subset_indices(n_train, size, seed, s)] = True
    return masks, np.array([run_seed(seed, s) for s in range(n_subsets)], dtype=np.int64)


# ---- one retraining (a Dask task) --------------------------------------------------------------------
def as_losses(result, index: int) -> np.ndarray:
    """``train_fn``'s result as float64 (n_test,); a one-line error for anything else."""
    if hasattr(result, "detach"):  # a torch tensor, without importing torch here
        result = result.detach().cpu().numpy()
    try:
        losses = np.asarray(result, dtype=np.float64)
    except (TypeError, ValueError):
        raise ArgumentError(
            f"train_fn returned a {type(result).__name__} for retraining {index}; return the "
            "test losses as a 1-D array (one per test example)"
        ) from None
    if losses.ndim != 1 or losses.size == 0:
        raise ArgumentError(
            f"train_fn returned shape {losses.shape} for retraining {index}; return the test "
            "losses as a 1-D array (one per test example)"
        )
    if not np.isfinite(losses).all():
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        raise ArgumentError(
            f"train_fn returned a non-finite loss (test example {bad}) for retraining {index}; "
            "check the training recipe (learning rate, clipping) before measuring with it"
        )
    return losses


def retrain_one(train_fn: TrainFn, n_train: int, size: int, seed: int, index: int) -> tuple[int, np.ndarray]:
    """Retraining ``index``: its subset redrawn from the seed, ``train_fn`` run on it (one per process at a time)."""
    indices = subset_indices(n_train, size, seed, index)
    with _ONE_AT_A_TIME:
        result = train_fn(indices, run_seed(seed, index))
    return index, as_losses(result, index)


# ---- the job -----------------------------------------------------------------------------------------
def _fn_name(fn) -> str:
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    return f"{mod}:{name}" if mod else str(name)


def _check_args(train_fn, n_train, n_subsets, fraction, seed) -> None:
    if not callable(train_fn):
        raise ArgumentError(
            f"train_fn must be a callable (indices, seed) -> test losses, got {type(train_fn).__name__}"
        )
    for name, value, low in (("n_train", n_train, 2), ("n_subsets", n_subsets, 2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ArgumentError(f"{name} must be an integer of at least {low}, got {value!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0 < fraction < 1:
        raise ArgumentError(f"fraction must be a number between 0 and 1 (exclusive), got {fraction!r}; e.g. 0.5")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ArgumentError(f"seed must be a non-negative integer, got {seed!r}")


def _open_or_create(
    out, job: dict, masks, seeds, name: str, overwrite: bool, storage_options: StorageOptions
) -> RunsStore:
    """The store to write into: an earlier, unfinished (or finished) one of the same job, else a new one.

    A retraining output of another job is refused unless ``overwrite``; anything that is not a retraining
    output follows the output rule (store.guard).
    """
    existing = guard.inspect(out, storage_options)
    if existing.exists and existing.kind == KIND and not overwrite:
        store = RunsStore(out, storage_options=storage_options)
        diff = job_difference(store.job, job)
        if diff:
            raise StoreError(
                f"retraining output {store.path} was made with other parameters: {diff}; pass the same ones to "
                "resume it, overwrite=True (--overwrite) to start over, or choose another path"
            )
        return store
    return RunsStore.create(
        out, job=job, subsets=masks, seeds=seeds, train_fn=name, overwrite=overwrite, storage_options=storage_options
    )


def _dataset(masks: np.ndarray, seeds: np.ndarray, outputs: np.ndarray, attrs: dict) -> xr.Dataset:
    ds = xr.Dataset(
        {SUBSET: ((SUBSET, TRAIN), masks), OUTPUT: ((SUBSET, TEST), outputs), SEED: ((SUBSET,), seeds)}, attrs=attrs
    )
    ds[OUTPUT].attrs["description"] = "test losses of the model retrained on that subset"
    return ds


def retrain(
    train_fn: TrainFn,
    n_train: int,
    *,
    n_subsets: int = 64,
    fraction: float = 0.5,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    client=None,
    overwrite: bool = False,
    progress: bool | None = None,
    storage_options: StorageOptions = None,
) -> xr.Dataset:
    """Retrain ``n_subsets`` times on random subsets of the training data and collect the test losses.

    Parameters
    ----------
    train_fn
        ``train_fn(indices, seed) -> losses``: train a fresh model on the training examples at ``indices``
        (sorted int64 positions 0..n_train-1) with ``seed``, and return its loss on every test example
        (1-D, the test store's order; a NumPy array, a list or a CPU tensor). It must pickle to run on a
        cluster (a module-level function, or ``trackin-ooc retrain --train-fn MOD:FN``).
    n_train
        Number of training examples (rows of the train gradient store).
    n_subsets
        Retrainings (the linear datamodeling score wants tens to hundreds).
    fraction
        Share of the training examples in each subset (``round(fraction · n_train)`` of them).
    seed
        Fixes every subset and every retraining's seed (subset ``s`` depends only on ``seed`` and ``s``).
    out
        A Zarr store (local path or fsspec URL) that receives each retraining as soon as it finishes;
        rerunning the same call skips those already written and returns the whole job once every one is.
    client
        A ``distributed.Client`` to run the retrainings on; default: the active one, else dask's local
        scheduler in this process.
    overwrite
        Replace an earlier retraining output at ``out`` (never anything else).
    progress
        A progress bar (None: only on a terminal).
    storage_options
        fsspec options for a remote ``out``.

    Returns
    -------
    xarray.Dataset
        ``subset`` (bool, dims ("subset", "train")), ``output`` (float64 test losses, ("subset", "test")) and
        ``seed`` (("subset",)); attributes ``n_train``, ``n_subsets``, ``fraction``, ``seed``, ``subset_size``.

    Raises
    ------
    ArgumentError
        Bad parameters, or ``train_fn`` returned something that is not one finite loss per test example.
    StoreError
        ``out`` holds a retraining output of other parameters (without ``overwrite``), or something that
        is not a retraining output.
    StoreLockedError
        Another process is writing ``out``.
    """
    _check_args(train_fn, n_train, n_subsets, fraction, seed)
    n_train, n_subsets, fraction, seed = int(n_train), int(n_subsets), float(fraction), int(seed)
    size = subset_size(n_train, fraction)
    job = {"n_train": n_train, "n_subsets": n_subsets, "fraction": fraction, "seed": seed, "subset_size": size}
    masks, seeds = subset_masks(n_train, n_subsets, fraction, seed)
    name = _fn_name(train_fn)
    attrs = {**job, "train_fn": name}
    if out is None:
        outputs = np.full((n_subsets, 0), np.nan)
        results = _run(train_fn, job, list(range(n_subsets)), client, progress, on_result=None)
        if results:
            outputs = np.stack([results[s] for s in range(n_subsets)])
        return _dataset(masks, seeds, outputs, {**attrs, "complete": True})

    guard.check_location(out)
    with StoreLock(out, storage_options):
        store = _open_or_create(out, job, masks, seeds, name, overwrite, storage_options)
        todo = [int(s) for s in np.flatnonzero(~store.done())]
        if len(todo) < n_subsets:
            log.info(
                "retrain: %d of %d retrainings already in %s; running the other %d",
                n_subsets - len(todo),
                n_subsets,
                store.path,
                len(todo),
            )
        if todo:
            _run(train_fn, job, todo, client, progress, on_result=store.write_output)
        store.mark_complete()
        return store.to_xarray()


def _run(train_fn: TrainFn, job: dict, todo: list[int], client, progress, on_result) -> dict[int, np.ndarray]:
    """Run retrainings ``todo`` as Dask tasks; ``on_result(index, losses)`` as each one finishes."""
    client = client if client is not None else active_client()
    args = (job["n_train"], job["subset_size"], job["seed"])
    results: dict[int, np.ndarray] = {}
    n_test: list[int] = []

    def take(index: int, losses: np.ndarray) -> None:
        if n_test and len(losses) != n_test[0]:
            raise ArgumentError(
                f"retraining {index} returned {len(losses)} test losses and an earlier one "
                f"{n_test[0]}; train_fn must return one loss per test example, the same test set"
            )
        n_test.append(len(losses))
        if on_result is not None:
            on_result(index, losses)
        results[index] = losses
        bar.update(1)

    with progress_bar(total=len(todo), desc="retrain", unit="run", enabled=progress_enabled(progress)) as bar:
        if client is not None:
            _run_distributed(client, train_fn, args, todo, take)
        else:
            _run_local(train_fn, args, todo, take)
    return results


def _run_distributed(client, train_fn, args, todo, take) -> None:
    import cloudpickle
    from distributed import as_completed

    token = uuid.uuid4().hex
    # train_fn (and whatever it closes over) reaches the workers once, as the result of a task. cloudpickle,
    # so that a function registered to be pickled by value (a file the CLI loaded) is.
    shared = client.submit(
        cloudpickle.loads, cloudpickle.dumps(train_fn), key=f"trackin-retrain-fn-{token}", pure=False
    )
    futures = [
        client.submit(retrain_one, shared, *args, s, key=f"trackin-retrain-{s}-{token}", pure=False, retries=1)
        for s in todo
    ]
    try:
        for future in as_completed(futures):
            take(*future.result())
    finally:
        client.cancel([*futures, shared])


def _run_local(train_fn, args, todo, take) -> None:
    import dask
    from dask.callbacks import Callback
    from dask.delayed import Delayed

    name = f"trackin-retrain-{uuid.uuid4().hex}"
    dsk = {(name, s): (retrain_one, train_fn, *args, s) for s in todo}

    class _Collect(Callback):
        # Runs in the calling thread as each task finishes: the result is written before the next one.
        def _posttask(self, key, result, dsk, state, worker_id):
            if isinstance(key, tuple) and key[0] == name:
                take(*result)

    with _Collect():
        dask.compute(*[Delayed((name, s), dsk) for s in todo])


def open_runs(path: str | os.PathLike, *, storage_options: StorageOptions = None) -> xr.Dataset:
    """The retraining output ``to.retrain(..., out=path)`` wrote, as the Dataset ``retrain`` returns.

    Parameters
    ----------
    path
        The retraining output (local path or fsspec URL).
    storage_options
        fsspec options for a remote path.

    Returns
    -------
    xarray.Dataset
        As :func:`retrain` returns it (in memory); an unfinished output has NaN ``output`` rows for the
        retrainings not yet done and ``attrs["complete"]`` False.

    Raises
    ------
    StoreError
        Nothing at ``path``, or not a retraining output.
    """
    return open_runs_store(path, storage_options=storage_options).to_xarray()
