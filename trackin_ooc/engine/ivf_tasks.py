"""What runs inside the Dask tasks of an index build and an index query: reopen stores by path, call
:mod:`ivf` and the block kernels, read and write whole chunks of the index."""

from __future__ import annotations

import functools
import json
import threading

import numpy as np

from ..store import layout
from ..store.index_store import TopKIndex
from . import ivf, kernels
from .array_module import ArrayBackend
from .tasks import StoreRef

# Rows per GEMM against the centroids inside an assignment task (bounds the rows × lists score tile).
ASSIGN_TILE_BYTES = 32 << 20


@functools.lru_cache(maxsize=8)
def _open_index(path: str, options_json: str, index_id: str) -> TopKIndex:
    idx = TopKIndex(path, storage_options=json.loads(options_json))
    if idx.index_id != index_id:
        raise RuntimeError(f"the index at {path} was replaced while in use; rerun")
    return idx


class IndexRef(tuple):
    """(path, storage-options JSON, index id): a picklable handle for reopening an index in a task."""

    @classmethod
    def of(cls, index: TopKIndex) -> IndexRef:
        return cls((index.path, json.dumps(index.storage_options, sort_keys=True), index.index_id))

    def open(self) -> TopKIndex:
        return _open_index(*self)


# ---- build ---------------------------------------------------------------------------------------
def sample_block(
    ref: StoreRef, start: int, stop: int, n_take: int, seed: int, block: int, learning_rates, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``n_take`` random rows of [start, stop) in the index space, with their train positions."""
    rng = np.random.default_rng([seed, block])
    pick = np.sort(rng.choice(stop - start, size=min(n_take, stop - start), replace=False))
    grads = ref.open().read_grads(start, stop)[:, pick]
    return start + pick, ivf.to_index_space(grads, learning_rates, normalize)


@functools.lru_cache(maxsize=4)
def _quantizer(ref: IndexRef):
    idx = ref.open()
    centroids = idx.centroids()
    half_sq = 0.5 * np.einsum("lw,lw->l", centroids, centroids, dtype=np.float32)
    return centroids, half_sq, idx.bands(), idx.calibration_data()["queries"]


def assign_block(
    train: StoreRef, index: IndexRef, block: int, start: int, stop: int, learning_rates, normalize: bool
) -> int:
    """Pass 1 of a build for one source block: the list of every row, list counts and radii, the
    calibration queries' top-k among these rows, and the rows sorted by list into the staging arrays."""
    idx = index.open()
    centroids, half_sq, bands, queries = _quantizer(index)
    n_lists = centroids.shape[0]
    kc = idx.calibration_k
    grads = train.open().read_grads(start, stop)
    rows = ivf.to_index_space(grads, learning_rates, normalize)
    n = rows.shape[0]
    lists = np.empty(n, dtype=np.int32)
    radius = np.zeros(n_lists, dtype=np.float32)
    parts = []
    tile = max(256, ASSIGN_TILE_BYTES // (4 * (n_lists + len(queries))))
    for t0 in range(0, n, tile):
        t1 = min(n, t0 + tile)
        lists[t0:t1], dist = ivf.assign(rows[t0:t1], centroids, half_sq, bands)
        np.maximum.at(radius, lists[t0:t1], dist)
        if len(queries):
            parts.append(kernels.select_topk(queries @ rows[t0:t1].T, kc, start + t0, np))
    calibration = _padded(kernels.merge_topk(parts, kc), len(queries), kc)
    order = np.argsort(lists, kind="stable")
    idx.write_source_block(
        block,
        start,
        assignment=lists,
        counts=np.bincount(lists, minlength=n_lists),
        radius=radius,
        calibration=calibration,
        sorted_grads=grads[:, order],
        sorted_rows=start + order.astype(np.int64),
    )
    return n


def _padded(t: kernels.TopK | None, n_queries: int, k: int) -> tuple:
    """A block's calibration partial with exactly k columns (blocks smaller than k padded with ∓inf, -1)."""
    if t is None or n_queries == 0:
        z = np.zeros((n_queries, k))
        return (z.astype(np.float32), z.astype(np.int64) - 1, z.astype(np.float32), z.astype(np.int64) - 1)
    out = []
    for values, fill in ((t.best_score, -np.inf), (t.best_index, -1), (t.worst_score, np.inf), (t.worst_index, -1)):
        pad = k - values.shape[1]
        out.append(np.pad(values, ((0, 0), (0, pad)), constant_values=fill) if pad > 0 else values)
    return tuple(out)


def gather_window(
    index: IndexRef,
    window: int,
    start: int,
    stop: int,
    offsets: np.ndarray,
    counts: np.ndarray,
    dest_prefix: np.ndarray,
    within: np.ndarray,
    block_starts: np.ndarray,
) -> int:
    """Pass 2 for one window [start, stop) of the re-ordered rows: from every source block's sorted
    staging run, the rows whose destination falls in the window; written as whole chunks.

    ``offsets`` (n+1,): list offsets of the window's lists L0..L0+n-1 (and the next); per source block b and
    list: ``counts`` its rows, ``dest_prefix`` rows of earlier blocks in that list, ``within`` where the list
    starts inside the block's sorted run. A row's destination is offsets[L] + dest_prefix[b, L] + its rank
    within (b, L), increasing along the run, so each block contributes one contiguous staging range.
    """
    idx = index.open()
    n_lists = counts.shape[1]
    buf = None
    rows = np.full(stop - start, -1, dtype=np.int64)
    for b in range(counts.shape[0]):
        cnt = counts[b]
        total = int(cnt.sum())
        if total == 0:
            continue
        local = np.repeat(np.arange(n_lists), cnt)
        rank = np.arange(total) - (within[b, local] - within[b, 0])
        dest = offsets[local] + dest_prefix[b, local] + rank
        hit = np.flatnonzero((dest >= start) & (dest < stop))
        if not len(hit):
            continue
        r0, r1 = int(hit[0]), int(hit[-1]) + 1
        s0 = int(block_starts[b] + within[b, 0])
        raw, ids = idx.read_staging(s0 + r0, s0 + r1)
        if buf is None:
            buf = np.empty((raw.shape[0], stop - start, raw.shape[2]), dtype=raw.dtype)
        target = dest[r0:r1] - start
        buf[:, target] = raw
        rows[target] = ids
    if buf is None or (rows < 0).any():
        raise RuntimeError(
            f"index {idx.path}: window {window} could not be filled from the staging rows; "
            "rebuild the index with overwrite=True"
        )
    idx.write_window(window, start, buf, rows)
    return stop - start


# ---- query ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _query_side(ref: IndexRef) -> ivf.Quantizer:
    # A fresh handle: one cached while this process built the index predates its lists and its seal.
    path, options_json, index_id = ref
    idx = TopKIndex(path, storage_options=json.loads(options_json)).require_complete()
    if idx.index_id != index_id:
        raise RuntimeError(f"the index at {path} was replaced while in use; rerun")
    return idx.quantizer()


def probe_block(
    test: StoreRef,
    index: IndexRef,
    start: int,
    stop: int,
    learning_rates,
    normalize: bool,
    rules: tuple,
    n_probe: int | None,
    k: int,
) -> np.ndarray:
    """Sorted ids of the lists to read for test rows [start, stop): per end, ``rules`` (the calibrated
    :class:`ivf.EndRule`) with their own n_probe, or ``n_probe`` lists where given."""
    qz = _query_side(index)
    queries = ivf.to_index_space(test.open().read_grads(start, stop), learning_rates, normalize)
    return ivf.probe(queries, qz, tuple(rules), k, n_probe)


def search_block(test_folded, index: IndexRef, rows: np.ndarray, k: int, normalize: bool, backend: str):
    """Exact scores of a test block against the index rows at positions ``rows``: the k best and worst,
    indexed by train position (ties go to the lower train index, as in a streaming top-k).

    The rows come in list order. With fewer test rows than folded features (a query of a few test
    examples) the scores are computed in that order and their columns put in train order, which moves
    far fewer values than putting the rows themselves in train order first.
    """
    idx = index.open()
    raw, ids = idx.read_raw_rows(rows)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    n_ckpt, _, feat = raw.shape
    order_scores = backend == "numpy" and test_folded.shape[0] < n_ckpt * feat
    train = fold_rows(raw, None if order_scores else order, idx.dtype, normalize)
    if order_scores:
        part = kernels.select_topk(np.matmul(test_folded, train.T)[:, order], k, 0, np)
    elif backend == "numpy":
        part = kernels.score_topk(test_folded, train, k, 0, np)
    else:
        be = ArrayBackend(backend)
        scores = kernels.score_block(be.asarray(test_folded), be.asarray(train), be.xp)
        part = kernels.topk_to_host(kernels.select_topk(scores, k, 0, be.xp), be.to_host)
    return kernels.TopK(part.best_score, ids[part.best_index], part.worst_score, ids[part.worst_index])


_fold = threading.local()


def _fold_buffer(shape: tuple[int, int, int]) -> np.ndarray:
    """This thread's reusable float32 array for folded rows: a fresh one per query block spends about a
    fifth of a one-example query in page faults."""
    size = int(np.prod(shape))
    buf = getattr(_fold, "buf", None)
    if buf is None or buf.size < size:
        buf = _fold.buf = None  # release the old one first
        buf = _fold.buf = np.empty(size, dtype=np.float32)
    return buf[:size].reshape(shape)


def fold_rows(raw: np.ndarray, order: np.ndarray | None, dtype: str, normalize: bool) -> np.ndarray:
    """``kernels.fold_checkpoints`` of the stored rows ``raw[:, order]`` (on-disk dtype; ``order=None``: as
    they are) in one pass: each checkpoint's rows are gathered and converted to float32 straight into the
    folded (rows, C·F) array, this thread's buffer (valid until its next call)."""
    n_ckpt, n_rows, feat = raw.shape
    out = _fold_buffer((n_rows, n_ckpt, feat))
    for c in range(n_ckpt):
        picked = raw[c] if order is None else raw[c][order]
        out[:, c, :] = picked if dtype != "bfloat16" else layout.decode(picked, dtype)
        if normalize:
            block = out[:, c, :]
            norms = np.sqrt(np.einsum("rf,rf->r", block, block, dtype=np.float32))
            block /= np.maximum(norms, kernels.NORM_EPS)[:, None]
    return out.reshape(n_rows, n_ckpt * feat)
