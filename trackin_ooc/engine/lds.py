"""Predicted subset outputs for the linear datamodeling score, without the influence matrix.

The prediction for test example z' and subset S is Σ_{z∈S} τ(z', z) = Σ_c η_c ⟨g_c(z'), Σ_{z∈S} g_c(z)⟩: by
linearity, the inner product of the test row with the subset-summed train rows. So one pass over the
train store sums its folded rows per subset (each train block: the (subsets × rows) 0/1 mask times the
(rows × C·F) block, partial sums in float64 reduced in a tree), then one pass over the test store with one
small (rows × C·F) · (C·F × subsets) product per block. Cost: O(n_train · subsets · C·F), where the
influence matrix would cost O(n_train · n_test · C·F) and its size in memory or on disk.

A store of per-layer factors (``projection="factors"``) has no flat rows to sum: its predictions are the
exact influence blocks (the factor kernels) times the mask, block by block, reduced over train blocks,
so no more than one (test block × train block) score block exists per task. Slower, and exact.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from dask.base import tokenize

from ..store import GradientStore
from ..store.runs_store import RunsStore
from . import kernels
from .net_graphs import sum_tree
from .planning import BlockPlan, blocks
from .tasks import StoreRef


class MaskSource:
    """Where the train blocks' subset masks come from: a retraining output (read in the task) or an array."""

    def __init__(self, path: str | None = None, options: dict | None = None, array: np.ndarray | None = None):
        self.path, self.options, self.array = path, dict(options or {}), array

    @classmethod
    def of(cls, runs) -> MaskSource:
        if isinstance(runs, RunsStore):
            return cls(path=runs.path, options=runs.storage_options)
        return cls(array=np.asarray(runs, dtype=bool))

    def task_arg(self, start: int, stop: int):
        """What a task needs to get columns [start, stop): the array slice, or (path, options) to read it."""
        if self.array is not None:
            return np.ascontiguousarray(self.array[:, start:stop])
        return (self.path, self.options)

    def __dask_tokenize__(self):
        return (self.path, tuple(sorted(self.options.items())), None if self.array is None else tokenize(self.array))


def _mask(source, start: int, stop: int) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    path, options = source
    return RunsStore(path, storage_options=options, read_only=True).subsets(start, stop)


def subset_sums_block(ref: StoreRef, start: int, stop: int, mask_source, normalize: bool) -> np.ndarray:
    """(subsets, C·F) float64: the folded train rows [start, stop) summed over each subset."""
    rows = kernels.fold_checkpoints(ref.open().read_grads(start, stop), np, normalize=normalize)
    mask = _mask(mask_source, start, stop).astype(np.float32)
    return (mask @ rows).astype(np.float64)


def predict_block(sums: np.ndarray, ref: StoreRef, start: int, stop: int, weights, normalize: bool) -> np.ndarray:
    """(rows, subsets) float64 predictions of test rows [start, stop)."""
    test = kernels.fold_checkpoints(ref.open().read_grads(start, stop), np, weights=weights, normalize=normalize)
    return test.astype(np.float64) @ sums.T


def subset_predictions_array(
    test: GradientStore, train: GradientStore, masks: MaskSource, n_subsets: int, normalize: bool, train_rows: int
) -> da.Array:
    """Lazy (n_test, n_subsets) float64: subset sums reduced in a tree, then one task per test block."""
    tref, ref = StoreRef.of(test), StoreRef.of(train)
    weights = [float(x) for x in train.learning_rates]
    token = tokenize(tref, ref, masks, n_subsets, normalize, train_rows)
    part = f"trackin-lds-sums-{token}"
    dsk: dict = {}
    level = []
    for i, (s, e) in enumerate(blocks(train.n_examples, train_rows)):
        dsk[(part, i)] = (subset_sums_block, ref, s, e, masks.task_arg(s, e), normalize)
        level.append((part, i))
    sums = sum_tree(dsk, level, f"trackin-lds-sum-{token}")
    name = f"trackin-lds-predictions-{token}"
    ranges = blocks(test.n_examples, test.chunk_rows)
    for i, (s, e) in enumerate(ranges):
        dsk[(name, i, 0)] = (predict_block, sums, tref, s, e, weights, normalize)
    chunks = (tuple(e - s for s, e in ranges), (n_subsets,))
    return da.Array(dsk, name, chunks=chunks, dtype=np.float64, meta=np.empty((0, 0), np.float64))


def mask_block(mask_source, start: int, stop: int) -> np.ndarray:
    """(rows, subsets) float32: the transposed mask of train columns [start, stop)."""
    return np.ascontiguousarray(_mask(mask_source, start, stop).T, dtype=np.float32)


def factor_predictions_array(
    test: GradientStore,
    train: GradientStore,
    masks: MaskSource,
    n_subsets: int,
    normalize: bool,
    plan: BlockPlan,
    backend: str,
) -> da.Array:
    """Lazy (n_test, n_subsets) float64 for stores of per-layer factors: exact influence blocks times the mask,
    summed over train blocks by dask's blocked matmul (a tree of partial sums)."""
    from .graphs import influence_array

    scores = influence_array(test, train, plan, normalize, backend)
    ranges = plan.train_blocks(train.n_examples)
    token = tokenize(masks, n_subsets, plan)
    name = f"trackin-lds-mask-{token}"
    dsk = {(name, j, 0): (mask_block, masks.task_arg(s, e), s, e) for j, (s, e) in enumerate(ranges)}
    mask_t = da.Array(
        dsk,
        name,
        chunks=(tuple(e - s for s, e in ranges), (n_subsets,)),
        dtype=np.float32,
        meta=np.empty((0, 0), np.float32),
    )
    return da.matmul(scores, mask_t).astype(np.float64)


def row_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` (average ranks for ties, as
    ``scipy.stats.spearmanr``); NaN where either row is constant."""
    from scipy.stats import rankdata

    ra = rankdata(np.asarray(a, dtype=np.float64), axis=1)
    rb = rankdata(np.asarray(b, dtype=np.float64), axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    num = (ra * rb).sum(axis=1)
    den = np.sqrt((ra * ra).sum(axis=1) * (rb * rb).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
