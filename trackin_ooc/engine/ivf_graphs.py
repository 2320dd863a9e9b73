"""Dask task graphs of an index build (sample, assign, gather) and of an index query (probe, search, merge).

Plain task dictionaries over :mod:`ivf_tasks`, as in :mod:`graphs`: no task holds more than one source
block, one window of the index, or one test block with its probed rows.
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed

from ..store import GradientStore
from ..store.index_store import TopKIndex
from . import ivf_tasks, tasks
from .graphs import merge_tree, topk_fields
from .ivf_tasks import IndexRef
from .planning import BlockPlan, blocks
from .tasks import StoreRef

SPLIT_EVERY = 8  # partial top-k results merged per tree-reduction task


def sample_graph(train: GradientStore, block_rows: int, n_sample: int, seed: int, normalize: bool) -> Delayed:
    """A Delayed list of (train positions, rows in the index space): about ``n_sample`` rows, spread
    over every source block in proportion to its size."""
    ref = StoreRef.of(train)
    lrs = [float(x) for x in train.learning_rates]
    ranges = blocks(train.n_examples, block_rows)
    token = tokenize(ref, block_rows, n_sample, seed, normalize)
    name = f"trackin-index-sample-{token}"
    dsk: dict[Any, Any] = {}
    keys = []
    for b, (s, e) in enumerate(ranges):
        take = int(round(n_sample * (e - s) / train.n_examples))
        if take <= 0:
            continue
        dsk[(name, b)] = (ivf_tasks.sample_block, ref, s, e, take, seed, b, lrs, normalize)
        keys.append((name, b))
    final = f"trackin-index-samples-{token}"
    dsk[final] = (list, keys)
    return Delayed(final, dsk)


def assign_graph(train: GradientStore, index: TopKIndex, normalize: bool, done: np.ndarray) -> Delayed:
    """Pass 1 over the source blocks not yet ``done``."""
    ref, iref = StoreRef.of(train), IndexRef.of(index)
    lrs = [float(x) for x in train.learning_rates]
    token = tokenize(ref, iref, normalize)
    name = f"trackin-index-assign-{token}"
    dsk: dict[Any, Any] = {}
    for b, (s, e) in enumerate(blocks(train.n_examples, index.block_rows)):
        if not done[b]:
            dsk[(name, b)] = (ivf_tasks.assign_block, ref, iref, b, s, e, lrs, normalize)
    final = f"trackin-index-assigned-{token}"
    dsk[final] = (tasks.done, *list(dsk))
    return Delayed(final, dsk)


def gather_graph(index: TopKIndex, counts: np.ndarray, offsets: np.ndarray, done: np.ndarray) -> Delayed:
    """Pass 2 over the windows not yet ``done``: each gathers its lists' rows from every source block's
    sorted staging run. ``counts``: (source block, list) rows; ``offsets``: list offsets."""
    iref = IndexRef.of(index)
    n = index.n_examples
    block_starts = np.array([s for s, _ in blocks(n, index.block_rows)], dtype=np.int64)
    within = np.cumsum(counts, axis=1) - counts  # where each list starts in a block's sorted run
    dest_prefix = np.cumsum(counts, axis=0) - counts  # rows of the same list in earlier blocks
    token = tokenize(iref, offsets)
    name = f"trackin-index-gather-{token}"
    dsk: dict[Any, Any] = {}
    for w, (s, e) in enumerate(blocks(n, index.window_rows)):
        if done[w]:
            continue
        first = int(np.searchsorted(offsets, s, side="right") - 1)
        last = int(np.searchsorted(offsets, e - 1, side="right") - 1)
        cols = slice(first, last + 1)
        dsk[(name, w)] = (
            ivf_tasks.gather_window,
            iref,
            w,
            s,
            e,
            offsets[first : last + 2],
            counts[:, cols],
            dest_prefix[:, cols],
            within[:, cols],
            block_starts,
        )
    final = f"trackin-index-gathered-{token}"
    dsk[final] = (tasks.done, *list(dsk))
    return Delayed(final, dsk)


def probe_graph(
    test: GradientStore, index: TopKIndex, plan: BlockPlan, normalize: bool, n_probe: int | None, k: int
) -> Delayed:
    """A Delayed list, per test block, of the sorted ids of the lists to read."""
    ref, iref = StoreRef.of(test), IndexRef.of(index)
    lrs = [float(x) for x in index.attrs["learning_rates"]]
    rules = index.rules()
    token = tokenize(ref, iref, plan, normalize, [r.as_dict() for r in rules], n_probe, k)
    name = f"trackin-index-probe-{token}"
    dsk: dict[Any, Any] = {
        (name, i): (ivf_tasks.probe_block, ref, iref, s, e, lrs, normalize, rules, n_probe, k)
        for i, (s, e) in enumerate(plan.test_blocks(test.n_examples))
    }
    final = f"trackin-index-probes-{token}"
    dsk[final] = (list, list(dsk))
    return Delayed(final, dsk)


def search_arrays(
    test: GradientStore,
    index: TopKIndex,
    plan: BlockPlan,
    rows: list[np.ndarray],
    k: int,
    normalize: bool,
    backend: str,
) -> tuple[da.Array, da.Array, da.Array, da.Array]:
    """Lazy (n_test, k) arrays (proponent index/score, opponent index/score) from the probed ``rows`` of
    each test block, cut into pieces of at most ``plan.train_rows`` rows, merged in a tree."""
    iref = IndexRef.of(index)
    weights = [float(x) for x in index.attrs["learning_rates"]]
    token = tokenize(StoreRef.of(test), iref, plan, k, normalize, backend, [tokenize(r) for r in rows])
    test_ranges = plan.test_blocks(test.n_examples)
    tname = f"trackin-index-test-{token}"
    part = f"trackin-index-part-{token}"
    final = f"trackin-index-topk-{token}"
    dsk: dict[Any, Any] = {}
    ref = StoreRef.of(test)
    for i, (s, e) in enumerate(test_ranges):
        dsk[(tname, i)] = (tasks.read_test_block, ref, s, e, weights, normalize)
        pieces = [rows[i][j : j + plan.train_rows] for j in range(0, len(rows[i]), plan.train_rows)]
        level = []
        for j, piece in enumerate(pieces):
            dsk[(part, i, j)] = (ivf_tasks.search_block, (tname, i), iref, piece, k, normalize, backend)
            level.append((part, i, j))
        dsk[(final, i)] = merge_tree(dsk, level, k, "trackin-index-merge", token, i)
    return topk_fields(dsk, final, test_ranges, k, "trackin-index-field", token)
