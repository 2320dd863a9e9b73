"""Net influence over a test set: Σ_{z' in group} Σ_c η_c ⟨g_c(z'), g_c(z)⟩ = ⟨s_group, g(z)⟩.

By linearity the sum over test examples is the inner product with the summed, η-weighted test vectors
s_group = Σ_{z'} (η_c g_c(z'))_c (each g_c(z') normalised first with ``normalize``). So: one pass over the
test store summing its folded rows per group (a tree of partial sums), then one pass over the train
store with one small (groups × C·F) · (C·F × rows) product per block. Sums in float64, the product in
float32 (like ``influence``).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize

from ..store import GradientStore
from . import kernels
from .planning import blocks
from .tasks import StoreRef

SPLIT_EVERY = 8


def group_sums_block(
    ref: StoreRef, start: int, stop: int, weights, normalize: bool, codes: np.ndarray, n_groups: int
) -> np.ndarray:
    """(groups, C·F) float64: the folded, η-weighted test rows [start, stop) summed per group."""
    rows = kernels.fold_checkpoints(ref.open().read_grads(start, stop), np, weights=weights, normalize=normalize)
    onehot = np.zeros((n_groups, len(codes)), dtype=np.float64)
    onehot[codes, np.arange(len(codes))] = 1.0
    return onehot @ rows.astype(np.float64)


def add(*parts: np.ndarray) -> np.ndarray:
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


def sum_tree(dsk: dict, level: list, prefix: str):
    """Add tasks to ``dsk`` that sum the arrays under the keys ``level`` (SPLIT_EVERY at a time, in a tree);
    return the key of the total."""
    depth = 0
    while len(level) > 1:
        depth += 1
        merged = []
        for g in range(0, len(level), SPLIT_EVERY):
            key = (f"{prefix}-{depth}", g // SPLIT_EVERY)
            dsk[key] = (add, *level[g : g + SPLIT_EVERY])
            merged.append(key)
        level = merged
    return level[0]


def net_block(sums: np.ndarray, ref: StoreRef, start: int, stop: int, normalize: bool) -> np.ndarray:
    """(groups, rows) float32 net influence of train rows [start, stop): a float32 GEMM, as ``influence``'s
    blocks (a float64 one needs the block converted, three times the time of the product)."""
    train = kernels.fold_checkpoints(ref.open().read_grads(start, stop), np, normalize=normalize)
    return (train @ sums.T.astype(np.float32)).T


def net_influence_array(
    test: GradientStore, train: GradientStore, codes: np.ndarray, n_groups: int, normalize: bool, train_rows: int
) -> da.Array:
    """Lazy (groups, n_train) float32: test sums reduced in a tree, then one task per train block."""
    tref, ref = StoreRef.of(test), StoreRef.of(train)
    weights = [float(x) for x in train.learning_rates]
    token = tokenize(tref, ref, tokenize(codes), n_groups, normalize, train_rows)
    part = f"trackin-net-sums-{token}"
    dsk: dict[Any, Any] = {}
    level = []
    for i, (s, e) in enumerate(blocks(test.n_examples, test.chunk_rows)):
        dsk[(part, i)] = (group_sums_block, tref, s, e, weights, normalize, codes[s:e], n_groups)
        level.append((part, i))
    sums = sum_tree(dsk, level, f"trackin-net-sum-{token}")
    name = f"trackin-net-influence-{token}"
    ranges = blocks(train.n_examples, train_rows)
    for j, (s, e) in enumerate(ranges):
        dsk[(name, 0, j)] = (net_block, sums, ref, s, e, normalize)
    chunks = ((n_groups,), tuple(e - s for s, e in ranges))
    return da.Array(dsk, name, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0), np.float32))
