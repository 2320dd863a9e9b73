"""Dask graphs of block tasks: self-influence, influence blocks (lazy or written), streaming top-k.

Each graph is a plain task dictionary over :mod:`tasks` functions; no task holds more than one
test block, one train block and their score block, as :mod:`planning` sized them.
"""

from __future__ import annotations

import json
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed

from ..store import GradientStore
from . import factor_tasks, tasks
from .block_tasks import BlockTasks
from .planning import BlockPlan, blocks
from .tasks import StoreRef

SPLIT_EVERY = 8  # partial top-k results merged per tree-reduction task


def block_tasks(store: GradientStore) -> BlockTasks:
    """The task functions for a store's layout: :mod:`.tasks` (one gradient matrix) or
    :mod:`.factor_tasks` (per-layer factors, ``projection="factors"``); same names and signatures."""
    return factor_tasks if store.has_factors else tasks


def _test_block_tasks(test: GradientStore, plan: BlockPlan, weights, normalize: bool, token: str):
    name = f"trackin-test-block-{token}"
    ref = StoreRef.of(test)
    ranges = plan.test_blocks(test.n_examples)
    dsk = {
        (name, i): (block_tasks(test).read_test_block, ref, s, e, list(map(float, weights)), normalize)
        for i, (s, e) in enumerate(ranges)
    }
    return dsk, name, ranges


def self_influence_array(
    store: GradientStore, backend: str, rows: int | None = None, exact_norms: bool = False
) -> da.Array:
    """(n_examples,) float64, one task per ``rows`` (default: the store's chunk rows).

    ``exact_norms``: from the exact squared gradient norms the capture stored, not the features.
    """
    ranges = blocks(store.n_examples, rows or store.chunk_rows)
    ref = StoreRef.of(store)
    weights = [float(x) for x in store.learning_rates]
    name = f"trackin-self-influence-{tokenize(ref, rows, backend, exact_norms)}"
    dsk: dict[tuple[str, int], tuple[Any, ...]]
    if exact_norms:
        dsk = {(name, i): (tasks.exact_self_influence_block, ref, s, e, weights) for i, (s, e) in enumerate(ranges)}
    else:
        dsk = {
            (name, i): (block_tasks(store).self_influence_block, ref, s, e, weights, backend)
            for i, (s, e) in enumerate(ranges)
        }
    chunks = (tuple(e - s for s, e in ranges),)
    return da.Array(dsk, name, chunks=chunks, dtype=np.float64, meta=np.empty((0,), np.float64))


def influence_array(
    test: GradientStore, train: GradientStore, plan: BlockPlan, normalize: bool, backend: str
) -> da.Array:
    """Lazy (n_test, n_train) float32 matrix, one chunk per (test block, train block) task."""
    token = tokenize(StoreRef.of(test), StoreRef.of(train), plan, normalize, backend)
    dsk, tname, test_ranges = _test_block_tasks(test, plan, train.learning_rates, normalize, token)
    ref = StoreRef.of(train)
    train_ranges = plan.train_blocks(train.n_examples)
    name = f"trackin-influence-{token}"
    for i in range(len(test_ranges)):
        for j, (s, e) in enumerate(train_ranges):
            dsk[(name, i, j)] = (block_tasks(train).score_block, (tname, i), ref, s, e, normalize, backend)
    chunks = (tuple(e - s for s, e in test_ranges), tuple(e - s for s, e in train_ranges))
    return da.Array(dsk, name, chunks=chunks, dtype=np.float32, meta=np.empty((0, 0), np.float32))


def influence_write_graph(
    test: GradientStore,
    train: GradientStore,
    plan: BlockPlan,
    normalize: bool,
    backend: str,
    out,
    skip: np.ndarray | None = None,
) -> Delayed:
    """A Delayed that writes every not-yet-written (test block, train block) chunk of ``out``."""
    token = tokenize(StoreRef.of(test), StoreRef.of(train), plan, normalize, backend, out.path)
    dsk, tname, test_ranges = _test_block_tasks(test, plan, train.learning_rates, normalize, token)
    ref = StoreRef.of(train)
    train_ranges = plan.train_blocks(train.n_examples)
    out_opts = json.dumps(out.storage_options, sort_keys=True)
    name = f"trackin-influence-write-{token}"
    keys = []
    needed_test = set()
    for i, (row0, _) in enumerate(test_ranges):
        for j, (s, e) in enumerate(train_ranges):
            if skip is not None and skip[i, j]:
                continue
            key = (name, i, j)
            dsk[key] = (
                block_tasks(train).write_influence_block,
                (tname, i),
                ref,
                s,
                e,
                normalize,
                backend,
                out.path,
                out_opts,
                (i, j),
                row0,
            )
            keys.append(key)
            needed_test.add(i)
    for i in range(len(test_ranges)):
        if i not in needed_test:
            dsk.pop((tname, i))
    final = f"trackin-influence-done-{token}"
    dsk[final] = (tasks.done, *keys)
    return Delayed(final, dsk)


def topk_arrays(
    test: GradientStore, train: GradientStore, plan: BlockPlan, k: int, normalize: bool, backend: str
) -> tuple[da.Array, da.Array, da.Array, da.Array]:
    """Lazy (n_test, k) arrays: proponent index/score, opponent index/score.

    One task per (test block, train block) keeps only the block's k best and worst; a tree of merge
    tasks (SPLIT_EVERY wide) combines them along the train axis.
    """
    token = tokenize(StoreRef.of(test), StoreRef.of(train), plan, k, normalize, backend)
    dsk, tname, test_ranges = _test_block_tasks(test, plan, train.learning_rates, normalize, token)
    ref = StoreRef.of(train)
    train_ranges = plan.train_blocks(train.n_examples)
    part = f"trackin-topk-part-{token}"
    final = f"trackin-topk-{token}"
    for i in range(len(test_ranges)):
        level = [(part, i, j) for j in range(len(train_ranges))]
        for j, (s, e) in enumerate(train_ranges):
            dsk[(part, i, j)] = (block_tasks(train).topk_block, (tname, i), ref, s, e, k, normalize, backend)
        dsk[(final, i)] = merge_tree(dsk, level, k, "trackin-topk-merge", token, i)
    return topk_fields(dsk, final, test_ranges, k, "trackin-topk-field", token)


def merge_tree(dsk: dict, parts: list, k: int, prefix: str, token: str, i: int):
    """Add merge tasks (SPLIT_EVERY wide) combining the partial top-k results ``parts`` of test block ``i``;
    return the key of the last one."""
    level, depth = list(parts), 0
    while len(level) > 1:
        depth += 1
        merged = []
        for g in range(0, len(level), SPLIT_EVERY):
            key = (f"{prefix}{depth}-{token}", i, g // SPLIT_EVERY)
            dsk[key] = (tasks.merge_topk, level[g : g + SPLIT_EVERY], k)
            merged.append(key)
        level = merged
    return level[0]


def topk_fields(
    dsk: dict, final: str, test_ranges, k: int, prefix: str, token: str
) -> tuple[da.Array, da.Array, da.Array, da.Array]:
    """(proponent index, proponent score, opponent index, opponent score) as lazy (n_test, k) arrays
    from the per-test-block results under ``(final, i)``."""
    chunks = (tuple(e - s for s, e in test_ranges), (k,))
    out = []
    for field, dtype in ((0, np.float32), (1, np.int64), (2, np.float32), (3, np.int64)):
        fname = f"{prefix}{field}-{token}"
        fdsk = dict(dsk)
        for i in range(len(test_ranges)):
            fdsk[(fname, i, 0)] = (tasks.getitem, (final, i), field)
        out.append(da.Array(fdsk, fname, chunks=chunks, dtype=dtype, meta=np.empty((0, 0), dtype)))
    best_score, best_index, worst_score, worst_index = out
    return best_index, best_score, worst_index, worst_score
