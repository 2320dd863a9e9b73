"""Functions that run inside Dask tasks: they reopen stores by path (tasks must pickle) and call kernels."""

from __future__ import annotations

import functools
import json

import numpy as np

from ..store import GradientStore
from ..store.backends import is_memory
from ..store.influence_store import InfluenceStore
from . import kernels
from .array_module import ArrayBackend


@functools.lru_cache(maxsize=64)
def _open(path: str, options_json: str, store_id: str) -> GradientStore:
    store = GradientStore(path, storage_options=json.loads(options_json))
    if store_id and store.store_id != store_id:
        raise RuntimeError(f"the store at {path} was replaced while scoring; rerun")
    return store


@functools.lru_cache(maxsize=8)
def _open_output(path: str, options_json: str) -> InfluenceStore:
    return InfluenceStore(path, storage_options=json.loads(options_json))


class StoreRef(tuple):
    """(path, storage-options JSON, store id): a picklable handle for reopening a store in a task."""

    owner: GradientStore | None = None  # set for an in-memory store (below)

    @classmethod
    def of(cls, store: GradientStore) -> StoreRef:
        ref = cls((store.path, json.dumps(store.storage_options, sort_keys=True), store.store_id))
        if is_memory(store.path):
            # An in-memory store is freed with the object that owns it: a lazy result (whose graph holds
            # this ref) keeps it alive, so ``influence(capture(..., None), ...)`` computes later too.
            ref.owner = store
        return ref

    def __reduce__(self) -> tuple[type[StoreRef], tuple[tuple[str, str, str]]]:
        return (StoreRef, (tuple(self),))  # the owner stays in this process

    def open(self) -> GradientStore:
        return _open(*self)


def read_test_block(ref: StoreRef, start: int, stop: int, weights, normalize: bool) -> np.ndarray:
    """Test rows folded over checkpoints and scaled by η_c: (rows, C·F) float32 on the host."""
    grads = ref.open().read_grads(start, stop)
    return kernels.fold_checkpoints(grads, np, weights=weights, normalize=normalize)


def _train_scores(test_folded, ref: StoreRef, start: int, stop: int, normalize: bool, backend: str):
    be = ArrayBackend(backend)
    xp = be.xp
    train = be.asarray(ref.open().read_grads(start, stop))
    b = kernels.fold_checkpoints(train, xp, normalize=normalize)
    return kernels.score_block(be.asarray(test_folded), b, xp), be


def score_block(test, ref: StoreRef, start: int, stop: int, normalize: bool, backend: str) -> np.ndarray:
    """One (test block × train block) influence block on the host."""
    scores, be = _train_scores(test, ref, start, stop, normalize, backend)
    return be.to_host(scores)


def topk_block(test, ref: StoreRef, start: int, stop: int, k: int, normalize: bool, backend: str):
    """The k best and worst of one score block; the block itself never leaves this task.

    On the CPU the GEMM runs in column tiles into a reused per-thread buffer, each tile selected in
    turn (``kernels.score_topk``), so no score block is allocated.
    """
    if backend == "numpy":
        train = kernels.fold_checkpoints(ref.open().read_grads(start, stop), np, normalize=normalize)
        return kernels.score_topk(test, train, k, start, np)
    scores, be = _train_scores(test, ref, start, stop, normalize, backend)
    part = kernels.select_topk(scores, k, start, be.xp)
    del scores
    return kernels.topk_to_host(part, be.to_host)


def merge_topk(parts, k: int):
    return kernels.merge_topk(list(parts), k)


def write_influence_block(
    test,
    ref: StoreRef,
    start: int,
    stop: int,
    normalize: bool,
    backend: str,
    out_path: str,
    out_options: str,
    task: tuple[int, int],
    row0: int,
) -> int:
    """Score one block and write it as whole chunks of the output; returns rows × cols written."""
    block = score_block(test, ref, start, stop, normalize, backend)
    _open_output(out_path, out_options).write_block(task, row0, start, block)
    return int(block.size)


def self_influence_block(ref: StoreRef, start: int, stop: int, weights, backend: str) -> np.ndarray:
    be = ArrayBackend(backend)
    grads = be.asarray(ref.open().read_grads(start, stop))
    return be.to_host(kernels.self_influence_rows(grads, weights, be.xp))


def exact_self_influence_block(ref: StoreRef, start: int, stop: int, weights) -> np.ndarray:
    """Σ_c η_c ‖g_c‖² of rows [start, stop) from the exact squared norms a capture stored (no GEMM)."""
    return np.asarray(weights, dtype=np.float64) @ ref.open().read_sq_norms(start, stop).astype(np.float64)


def done(*counts) -> int:
    return int(sum(counts))


def getitem(obj, i):
    return obj[i]
