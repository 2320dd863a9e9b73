"""The linear datamodeling score (LDS): how well attribution scores predict what retraining does.

    runs = retrain(train_fn, n_train, n_subsets=64, out="runs.zarr")
    lds(test, train, runs)            # DataArray ("test",), attrs["lds"]: the mean

For each test example z' and each retraining on a subset S of the training data, the scores predict
the effect of S as Σ_{z∈S} τ(z', z); the LDS of z' is the Spearman correlation, over the subsets, between
that prediction and minus the test loss the retrained model actually had (a proponent lowers the loss).
Predictions come from one pass over the train store against subset-summed features (engine/lds.py):
the influence matrix is never formed.
"""

from __future__ import annotations

import os

import numpy as np
import xarray as xr

from .engine import planning, resources
from .engine.array_module import resolve_backend
from .engine.execute import compute
from .engine.lds import MaskSource, factor_predictions_array, row_spearman, subset_predictions_array
from .errors import ArgumentError
from .scores import _open, plan_for
from .store import StoreLike
from .store.backends import StorageOptions
from .store.compatibility import check_compatible
from .store.layout import itemsize
from .store.runs_store import OUTPUT, SUBSET, RunsStore, open_runs_store

RunsLike = xr.Dataset | RunsStore | str | os.PathLike
# Bytes per (subset, feature) of the subset sums while they are reduced: float64, a few partials at once.
SUM_BYTES = 8 * 4


def _runs(runs: RunsLike, storage_options: StorageOptions) -> tuple[MaskSource, np.ndarray, int, str | None]:
    """(mask source, outputs (subset, test), n_train, path) of a retraining Dataset or output."""
    if isinstance(runs, xr.Dataset):
        missing = [v for v in (SUBSET, OUTPUT) if v not in runs.variables]
        if missing:
            raise ArgumentError(f"runs lacks {', '.join(missing)}; pass what to.retrain returns (or its out= path)")
        mask = np.asarray(runs[SUBSET].transpose(SUBSET, ...).values, dtype=bool)
        outputs = np.asarray(runs[OUTPUT].transpose(SUBSET, ...).values, dtype=np.float64)
        return MaskSource.of(mask), outputs, mask.shape[1], runs.attrs.get("path")
    store = runs if isinstance(runs, RunsStore) else open_runs_store(runs, storage_options=storage_options)
    store.require_complete()
    return MaskSource.of(store), store.outputs(), store.n_train, store.path


def lds_from_predictions(predictions, outputs) -> np.ndarray:
    """Per test example, Spearman over subsets between ``predictions`` (test, subset) and −``outputs``
    (subset, test): the LDS of any attribution method that can predict subset outputs.

    Parameters
    ----------
    predictions
        (n_test, n_subsets): Σ_{z∈S} score(test, z) for each subset S.
    outputs
        (n_subsets, n_test): the test losses of the models retrained on those subsets.

    Returns
    -------
    numpy.ndarray
        (n_test,) float64; NaN where the predictions or the outputs of an example do not vary.

    Raises
    ------
    ArgumentError
        Shapes that do not match.
    """
    p = np.asarray(predictions, dtype=np.float64)
    o = np.asarray(outputs, dtype=np.float64)
    if p.ndim != 2 or o.ndim != 2 or p.shape != o.T.shape:
        raise ArgumentError(f"predictions {p.shape} must be (test, subset) and outputs {o.shape} (subset, test)")
    return row_spearman(p, -o.T)


def subset_predictions(
    test: StoreLike,
    train: StoreLike,
    runs: RunsLike,
    *,
    normalize: bool = False,
    device: str = "auto",
    memory_limit=None,
    progress: bool | None = None,
    storage_options: StorageOptions = None,
    client=None,
) -> xr.DataArray:
    """Σ_{z∈S} τ(z', z) for every test example z' and every subset S of ``runs``.

    Parameters
    ----------
    test, train
        Gradient stores (or their paths) captured with the same checkpoints and projection.
    runs
        What :func:`trackin_ooc.retrain` returned, or its ``out=`` path (a finished one).
    normalize
        Cosine scores (each gradient normalised per checkpoint) instead of dot products.
    device, memory_limit, progress, storage_options, client
        As for :func:`trackin_ooc.influence`.

    Returns
    -------
    xarray.DataArray
        (test, subset) float64.

    Raises
    ------
    ArgumentError
        The runs do not match the stores (train size, test size), or the subset sums do not fit memory.
    IncompatibleStoresError
        The stores cannot be combined.
    IncompleteStoreError
        A store or the retraining output is unfinished.
    """
    return _predictions(test, train, runs, normalize, device, memory_limit, progress, storage_options, client)[0]


def _predictions(
    test, train, runs, normalize, device, memory_limit, progress, storage_options, client
) -> tuple[xr.DataArray, np.ndarray]:
    """(predictions (test, subset), outputs (subset, test))."""
    te, tr = _open(test, storage_options), _open(train, storage_options)
    check_compatible(te, tr)
    masks, outputs, n_train, runs_path = _runs(runs, storage_options)
    n_subsets, n_test = outputs.shape
    if n_train != tr.n_examples:
        raise ArgumentError(
            f"the retrainings drew subsets of {n_train:,} training examples and the train store "
            f"{tr.path} has {tr.n_examples:,}; retrain with n_train={tr.n_examples}"
        )
    if n_test != te.n_examples:
        raise ArgumentError(
            f"the retrainings report {n_test:,} test losses and the test store {te.path} has "
            f"{te.n_examples:,} examples; train_fn must return one loss per test store example"
        )
    if tr.has_factors:
        plan = plan_for(te, tr, memory_limit=memory_limit, client=client)
        data = factor_predictions_array(te, tr, masks, n_subsets, normalize, plan, resolve_backend(device).name)
    else:
        width = tr.n_checkpoints * tr.feature_dim
        res = resources.detect(memory_limit, client)
        if n_subsets * width * SUM_BYTES > res.memory_limit:
            raise ArgumentError(
                f"{n_subsets} subset sums × {width:,} features do not fit the memory budget "
                f"({res.memory_limit / 2**30:.1f} GiB); use fewer subsets, a larger memory_limit, or stores "
                "captured with a projection (projection_dim=...)"
            )
        plan = planning.plan_blocks(
            n_test=n_subsets,
            n_train=tr.n_examples,
            n_checkpoints=tr.n_checkpoints,
            feature_dim=tr.feature_dim,
            itemsize=itemsize(tr.dtype),
            memory_limit=res.memory_limit,
            threads=res.threads,
            train_align=tr.chunk_rows,
        )
        data = subset_predictions_array(te, tr, masks, n_subsets, normalize, plan.train_rows)
    (values,) = compute(data, desc="LDS predictions", progress=progress, client=client)
    pred = xr.DataArray(
        np.asarray(values, dtype=np.float64),
        dims=("test", "subset"),
        coords={"test": te.example_ids(), "subset": np.arange(n_subsets)},
        name="predicted",
        attrs={
            "normalize": bool(normalize),
            "test_store": te.path,
            "train_store": tr.path,
            "test_fingerprint": te.fingerprint,
            "train_fingerprint": tr.fingerprint,
            **({"runs": runs_path} if runs_path else {}),
        },
    )
    return pred, outputs


def lds(
    test: StoreLike,
    train: StoreLike,
    runs: RunsLike,
    *,
    normalize: bool = False,
    device: str = "auto",
    memory_limit=None,
    progress: bool | None = None,
    storage_options: StorageOptions = None,
    client=None,
) -> xr.DataArray:
    """The linear datamodeling score of the TracIn scores of ``test`` against ``train``, per test example.

    Parameters
    ----------
    test, train
        Gradient stores (or their paths) captured with the same checkpoints and projection; flat stores
        and stores of per-layer factors (``projection="factors"``, by a slower exact path) both work.
    runs
        What :func:`trackin_ooc.retrain` returned, or its ``out=`` path (a finished one): subsets of the
        train store's examples and the test losses each retraining produced, in the test store's order.
    normalize
        Score with cosine TracIn (``normalize=True`` of :func:`trackin_ooc.influence`).
    device, memory_limit, progress, storage_options, client
        As for :func:`trackin_ooc.influence`.

    Returns
    -------
    xarray.DataArray
        dims ("test",): Spearman correlation over the subsets between Σ_{z∈S} τ(z', z) and −output;
        ``attrs["lds"]`` is its mean over the test examples where it is defined (``attrs["n_undefined"]``
        counts those whose predictions or outputs do not vary), ``attrs["n_subsets"]`` the subsets used.

    Raises
    ------
    ArgumentError
        The runs do not match the stores, or the subset sums do not fit the memory budget.
    IncompatibleStoresError
        The stores cannot be combined.
    IncompleteStoreError
        A store or the retraining output is unfinished.
    """
    pred, outputs = _predictions(test, train, runs, normalize, device, memory_limit, progress, storage_options, client)
    per_test = lds_from_predictions(pred.values, outputs)
    defined = np.isfinite(per_test)
    mean = float(per_test[defined].mean()) if defined.any() else float("nan")
    return xr.DataArray(
        per_test,
        dims=("test",),
        coords={"test": pred["test"].values},
        name="lds",
        attrs={**pred.attrs, "lds": mean, "n_subsets": int(outputs.shape[0]), "n_undefined": int((~defined).sum())},
    )
