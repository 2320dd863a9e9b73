"""Block kernels: arrays in, arrays out, written once for numpy and cupy (``xp``).

Score block for a test row block A and a train row block B over checkpoints c:
    S = Σ_c η_c · A_c B_cᵀ  =  [η_c A_c]_c · [B_c]_cᵀ
The checkpoints are folded into the feature axis so the whole block is one GEMM.
"""

from __future__ import annotations

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


def select_topk(scores, k: int, offset: int, xp) -> TopK:
    """Exact top-k and bottom-k of each row of a score block, with global column indices.

    Thresholds from a strided sample, then an exact sort of the few candidates: far cheaper than
    argpartition or a full partition of the block (docs/engine.md).
    """
    a, b = scores.shape
    kk = min(k, b)
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
