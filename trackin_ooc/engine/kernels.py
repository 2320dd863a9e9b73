"""Block kernels: arrays in, arrays out, written once for numpy and cupy (``xp``).

Score block for a test row block A and a train row block B over checkpoints c:
    S = Σ_c η_c · A_c B_cᵀ  =  [η_c A_c]_c · [B_c]_cᵀ
The checkpoints are folded into the feature axis so the whole block is one GEMM.
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

NORM_EPS = 1e-30


class TopK(NamedTuple):
    """Per test row: the k highest and k lowest (score, train index), best first."""

    best_score: np.ndarray  # (rows, k) descending
    best_index: np.ndarray  # (rows, k) int64
    worst_score: np.ndarray  # (rows, k) ascending
    worst_index: np.ndarray


def fold_checkpoints(grads, xp, *, weights=None, normalize: bool = False):
    """(C, rows, F) → (rows, C·F) float32, each checkpoint scaled by ``weights[c]``.

    With ``normalize`` each checkpoint's rows are divided by their L2 norm first (cosine).
    """
    n_ckpt, rows, feat = grads.shape
    out = xp.empty((rows, n_ckpt, feat), dtype=xp.float32)
    for c in range(n_ckpt):
        g = grads[c]
        if normalize:
            norms = xp.sqrt(xp.einsum("rf,rf->r", g, g, dtype=xp.float32))
            out[:, c, :] = g / xp.maximum(norms, NORM_EPS)[:, None]
        else:
            out[:, c, :] = g
        if weights is not None:
            out[:, c, :] *= xp.float32(weights[c])
    return out.reshape(rows, n_ckpt * feat)


def score_block(test_folded, train_folded, xp):
    """(a, W) · (b, W)ᵀ → (a, b) float32 scores."""
    return xp.matmul(test_folded, train_folded.T)


def self_influence_rows(grads, weights, xp):
    """Σ_c η_c ‖g_c‖² for each row of (C, rows, F) → (rows,) float64."""
    sq = xp.einsum("crf,crf->cr", grads, grads, dtype=xp.float32).astype(xp.float64)
    return xp.asarray(weights, dtype=xp.float64) @ sq


def sample_stride(b: int, k: int) -> int:
    """Every how many columns to sample for the selection threshold (1: use the whole row)."""
    return max(1, min(8, b // (8 * k), 1024 // k))


def _thresholds(scores, kk: int, stride: int, xp):
    """Per row, a value t_lo with at least kk scores <= t_lo and t_hi with at least kk >= t_hi.

    Taken from a strided sample of the row (a subset, so the bounds are safe): the candidates
    ``scores >= t_hi`` always hold the true top-kk, ties included, at a fraction of a full partition.
    """
    sample = scores[:, ::stride] if stride > 1 else scores
    n = sample.shape[1]
    lo_k, hi_k = kk - 1, n - kk
    if xp is np:
        part = np.partition(sample, sorted({lo_k, hi_k}), axis=1)
        return part[:, lo_k], part[:, hi_k]
    lo = xp.partition(sample, lo_k, axis=1)[:, lo_k]
    hi = xp.partition(sample, hi_k, axis=1)[:, hi_k]
    return lo, hi


def _nonzero(mask, xp):
    """(rows, cols) of a sparse boolean matrix; on the CPU, scans 8 flags per step."""
    a, b = mask.shape
    if xp is not np or b % 8 or not mask.flags.c_contiguous:
        return xp.nonzero(mask)
    words = np.flatnonzero(mask.view(np.uint64))
    flat = (words[:, None] * 8 + np.arange(8)).ravel()
    flat = flat[mask.ravel()[flat]]
    return flat // b, flat % b


def _pick(n_rows: int, rows, cols, vals, kk: int, largest: bool, xp):
    """From candidates (row-major order), the kk best of each row; ties go to the lower column.

    Candidates are packed into a small dense (rows, max candidates) matrix, padded with ∓inf, and
    sorted per row with a stable sort: columns arrive ascending, so ties keep the lower column.
    """
    counts = xp.bincount(rows, minlength=n_rows)
    starts = xp.cumsum(counts) - counts
    rank = xp.arange(rows.shape[0]) - starts[rows]
    width = int(counts.max())
    pad = -xp.inf if largest else xp.inf
    packed = xp.full((n_rows, width), pad, dtype=vals.dtype)
    index = xp.zeros((n_rows, width), dtype=xp.int64)
    packed[rows, rank] = vals
    index[rows, rank] = cols
    order = xp.argsort(-packed if largest else packed, axis=1, kind="stable")[:, :kk]
    return xp.take_along_axis(packed, order, axis=1), xp.take_along_axis(index, order, axis=1)


# The one-pass CPU kernel (numba) for k up to this; larger k or CuPy: the array-module path below.
FUSED_MAX_K = 256
_fused_lock = threading.Lock()
_fused = None


def _select_rows(scores, kk, nch, offset, out_v, out_i):
    """Per row of ``scores`` (a, b): the kk largest into out_v[0]/out_i[0] (descending) and the kk smallest
    into out_v[1]/out_i[1] (ascending), ties to the lower column; indices are column + ``offset``.

    Columns are dealt into ``nch`` interleaved chunks (chunk c: columns c, c + nch, c + 2·nch, …):
      1. one pass over the row keeps each chunk's max and -min (elementwise over contiguous row segments,
         so it vectorises and the row is read from memory once);
      2. t = the kk-th largest chunk max: kk distinct chunks hold a value >= t, so the kk-th largest score
         is >= t and every top-kk score (ties included) lies in a chunk whose max is >= t;
      3. only those chunks (usually exactly kk) are read again, in ascending column order, keeping the
         kk best values >= t in a small sorted list; with strict comparisons a later column never
         displaces an equal value, so ties keep the lower column exactly.
    The smallest are the largest of -x (negation is exact), so both ends share the code.
    """
    a, b = scores.shape
    nseg = (b + nch - 1) // nch
    acc_hi = np.empty(nch, scores.dtype)  # per chunk: max of x
    acc_lo = np.empty(nch, scores.dtype)  # per chunk: max of -x
    buf = np.empty(kk, scores.dtype)
    chunks = np.empty(nch, np.int64)
    for r in range(a):
        row = scores[r]
        hi = acc_hi
        lo = acc_lo
        for c in range(nch):
            hi[c] = row[c]
            lo[c] = -row[c]
        for q in range(1, nseg):
            seg = row[q * nch : min(b, (q + 1) * nch)]
            for c in range(seg.shape[0]):
                x = seg[c]
                hi[c] = x if x > hi[c] else hi[c]
                y = -x
                lo[c] = y if y > lo[c] else lo[c]
        for end in range(2):
            vals = acc_hi if end == 0 else acc_lo
            m = 0
            for c in range(nch):  # buf: the kk largest chunk maxima, descending
                v = vals[c]
                if m < kk:
                    p = m
                    m += 1
                elif v > buf[kk - 1]:
                    p = kk - 1
                else:
                    continue
                while p > 0 and buf[p - 1] < v:
                    buf[p] = buf[p - 1]
                    p -= 1
                buf[p] = v
            t = buf[kk - 1]
            n = 0
            for c in range(nch):
                if vals[c] >= t:
                    chunks[n] = c
                    n += 1
            ov = out_v[end, r]
            oi = out_i[end, r]
            m = 0
            for q in range(nseg):
                base = q * nch
                for s in range(n):
                    j = base + chunks[s]
                    if j >= b:
                        break
                    v = row[j] if end == 0 else -row[j]
                    if v < t:
                        continue
                    if m < kk:
                        p = m
                        m += 1
                    elif v > ov[kk - 1]:
                        p = kk - 1
                    else:
                        continue
                    while p > 0 and ov[p - 1] < v:
                        ov[p] = ov[p - 1]
                        oi[p] = oi[p - 1]
                        p -= 1
                    ov[p] = v
                    oi[p] = j + offset
            if end == 1:
                for i in range(kk):
                    ov[i] = -ov[i]


def _fused_kernel():
    """``_select_rows`` compiled by numba on first use (nogil: Dask threads run it in parallel; cached on disk)."""
    global _fused
    with _fused_lock:
        if _fused is None:
            import numba

            _fused = numba.njit(nogil=True, cache=True)(_select_rows)
    return _fused


def warm_up() -> None:
    """Load (or compile) the fused selection kernel now: a worker's memory baseline includes numba's
    LLVM (~150 MB RSS here) once it has run a top-k task."""
    select_topk(np.zeros((1, 4), dtype=np.float32), 1, 0, np)


def fused_chunks(b: int, kk: int) -> int:
    """Interleaved chunks for the fused kernel: a power of two near √(kk·b), between kk and b."""
    return min(b, max(kk, 1 << round(math.log2(math.sqrt(kk * b)))))


def select_topk(scores, k: int, offset: int, xp) -> TopK:
    """Exact top-k and bottom-k of each row of a score block, with global column indices.

    On the CPU, one fused pass (``_select_rows``, numba); otherwise thresholds from a strided sample and
    an exact sort of the few candidates. Both are far cheaper than argpartition (docs/engine.md).
    """
    a, b = scores.shape
    kk = min(k, b)
    if xp is np and kk < b and kk <= FUSED_MAX_K and a > 0:
        scores = np.ascontiguousarray(scores)
        out_v = np.empty((2, a, kk), dtype=scores.dtype)
        out_i = np.empty((2, a, kk), dtype=np.int64)
        _fused_kernel()(scores, kk, fused_chunks(b, kk), offset, out_v, out_i)
        return TopK(out_v[0], out_i[0], out_v[1], out_i[1])
    if kk < b:
        lo, hi = _thresholds(scores, kk, sample_stride(b, kk), xp)
        lo, hi = lo[:, None], hi[:, None]
        rows, cols = _nonzero((scores >= hi) | (scores <= lo), xp)  # one scan for both ends
        vals = scores[rows, cols]
        top = vals >= hi[rows, 0]
        bottom = vals <= lo[rows, 0]
        best_v, best_i = _pick(a, rows[top], cols[top], vals[top], kk, True, xp)
        worst_v, worst_i = _pick(a, rows[bottom], cols[bottom], vals[bottom], kk, False, xp)
    else:
        best_i = xp.argsort(-scores, axis=1, kind="stable")
        worst_i = xp.argsort(scores, axis=1, kind="stable")
        best_v = xp.take_along_axis(scores, best_i, axis=1)
        worst_v = xp.take_along_axis(scores, worst_i, axis=1)
    return TopK(best_v, best_i.astype(xp.int64) + offset, worst_v, worst_i.astype(xp.int64) + offset)


SCORE_TILE_BYTES = 64 << 20  # score_topk on the CPU: train columns per GEMM so one tile is about this big,
SCORE_TILE_MIN_COLS = 1024  # but never narrower than this (narrow GEMMs run slower)
_tile = threading.local()


def _tile_buffer(rows: int, cols: int, dtype) -> np.ndarray:
    """This thread's reusable (rows, cols) output for the GEMM: a fresh 100 MB array per block costs the
    single-threaded GEMM 15-35 % (page faults inside BLAS; docs/engine.md)."""
    buf = getattr(_tile, "buf", None)
    if buf is None or buf.size < rows * cols or buf.dtype != dtype:
        buf = _tile.buf = None  # release the old one first
        buf = _tile.buf = np.empty(rows * cols, dtype=dtype)
    return buf[: rows * cols].reshape(rows, cols)


def score_topk(test_folded, train_folded, k: int, offset: int, xp) -> TopK:
    """``select_topk(score_block(test_folded, train_folded))`` without materialising the score block.

    On the CPU the GEMM runs in column tiles of about SCORE_TILE_BYTES into a per-thread buffer that is
    reused across tasks, each tile is selected in turn, and the tiles' results are merged
    (exact: ties to the lower index). On a GPU: one GEMM and one selection.
    """
    if xp is not np:
        return select_topk(score_block(test_folded, train_folded, xp), k, offset, xp)
    a, b = test_folded.shape[0], train_folded.shape[0]
    dtype = np.result_type(test_folded.dtype, train_folded.dtype)
    width = max(1, min(b, max(SCORE_TILE_MIN_COLS, SCORE_TILE_BYTES // (dtype.itemsize * max(a, 1)))))
    parts = []
    for j in range(0, b, width):
        e = min(b, j + width)
        tile = _tile_buffer(a, e - j, dtype)
        np.matmul(test_folded, train_folded[j:e].T, out=tile)
        parts.append(select_topk(tile, k, offset + j, np))
    return merge_topk(parts, k) if parts else select_topk(score_block(test_folded, train_folded, np), k, offset, np)


def merge_topk(parts: list[TopK], k: int) -> TopK:
    """Merge partial results (host numpy) over train blocks into the k best and worst overall."""
    if len(parts) == 1:
        return parts[0]
    bv = np.concatenate([p.best_score for p in parts], axis=1)
    bi = np.concatenate([p.best_index for p in parts], axis=1)
    wv = np.concatenate([p.worst_score for p in parts], axis=1)
    wi = np.concatenate([p.worst_index for p in parts], axis=1)
    kk = min(k, bv.shape[1])
    ob = np.lexsort((bi, -bv), axis=1)[:, :kk]
    ow = np.lexsort((wi, wv), axis=1)[:, :kk]
    take = np.take_along_axis
    return TopK(take(bv, ob, 1), take(bi, ob, 1), take(wv, ow, 1), take(wi, ow, 1))


def topk_to_host(t: TopK, to_host) -> TopK:
    return TopK(*(to_host(x) for x in t))
