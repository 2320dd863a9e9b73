"""Dask task functions for stores with per-layer factors: the same names and signatures as :mod:`.tasks`,
so the graphs of :mod:`.graphs` run either (``graphs.block_tasks`` picks the module per store)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np

from . import factor_kernels as fk
from .array_module import ArrayBackend
from .kernels import topk_to_host
from .resources import thread_pools
from .tasks import StoreRef, _open_output, done, exact_self_influence_block, getitem, merge_topk

__all__ = [
    "read_test_block",
    "score_block",
    "topk_block",
    "write_influence_block",
    "self_influence_block",
    "exact_self_influence_block",
    "merge_topk",
    "done",
    "getitem",
]


_blas: dict[str, Any] = {"users": 0, "limiter": None}
_blas_lock = threading.Lock()


@contextlib.contextmanager
def _one_blas_thread(backend: str):
    """One BLAS thread while any factor task of this process runs on the CPU.

    The factor kernels make many small GEMMs (tiles of TILE_ROWS × TILE_COLS); with several BLAS threads
    per Dask thread each of them waits for cores the other tasks hold (a lazy ``influence(...).values``
    computes outside :func:`~.execute.compute`, which limits BLAS threads itself). Shared by concurrent
    tasks: the first sets the limit, the last restores it.
    """
    if backend != "numpy":
        yield
        return
    with _blas_lock:
        if _blas["users"] == 0:
            _blas["limiter"] = thread_pools().limit(limits=1, user_api="blas")
        _blas["users"] += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas["users"] -= 1
            if _blas["users"] == 0:
                _blas["limiter"].restore_original_limits()
                _blas["limiter"] = None


def _read(ref: StoreRef, start: int, stop: int, scale_by: np.ndarray | None, normalize: bool) -> fk.FactorRows:
    """Rows [start, stop) scaled per checkpoint by ``scale_by`` (C,) and, with ``normalize``, by 1/‖g_c‖
    from the exact squared norms the capture stored."""
    store = ref.open()
    scale = None
    if normalize:
        scale = fk.inverse_norms(store.read_sq_norms(start, stop))
    if scale_by is not None:
        w = np.asarray(scale_by, dtype=np.float32)[:, None]
        scale = w * (scale if scale is not None else np.ones((store.n_checkpoints, stop - start), np.float32))
    return fk.factor_rows(store.read_flat(start, stop), store.read_factors(start, stop), scale)


def read_test_block(ref: StoreRef, start: int, stop: int, weights, normalize: bool) -> fk.FactorRows:
    """Test rows scaled by η_c (and 1/‖g_c‖ with ``normalize``), on the host."""
    return _read(ref, start, stop, weights, normalize)


def _scores(test: fk.FactorRows, ref: StoreRef, start: int, stop: int, normalize: bool, backend: str):
    be = ArrayBackend(backend)
    train = _read(ref, start, stop, None, normalize)
    if backend != "numpy":
        test, train = test.to(be.asarray), train.to(be.asarray)
    return test, train, be


def score_block(test, ref: StoreRef, start: int, stop: int, normalize: bool, backend: str) -> np.ndarray:
    """One (test block × train block) influence block on the host."""
    test, train, be = _scores(test, ref, start, stop, normalize, backend)
    with _one_blas_thread(backend):
        return be.to_host(fk.score_block(test, train, be.xp))


def topk_block(test, ref: StoreRef, start: int, stop: int, k: int, normalize: bool, backend: str):
    """The k best and worst of one (test block × train block) score block, which never leaves the task."""
    test, train, be = _scores(test, ref, start, stop, normalize, backend)
    with _one_blas_thread(backend):
        return topk_to_host(fk.score_topk(test, train, k, start, be.xp), be.to_host)


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
    """Σ_c η_c ‖g_c‖² of rows [start, stop), exactly from the stored factors and flat part."""
    be = ArrayBackend(backend)
    block = _read(ref, start, stop, None, False)
    if backend != "numpy":
        block = block.to(be.asarray)
    with _one_blas_thread(backend):
        return be.to_host(fk.self_influence(block, weights, be.xp))
