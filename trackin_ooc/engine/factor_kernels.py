"""Block kernels for stores with per-layer factors (``projection="factors"``), written once for numpy and cupy.

A row block of such a store holds, per checkpoint c, the flat part F_c (rows × features) and for every
factor layer l the layer inputs A_c (rows × T × d_in, a 1 appended for the bias) and output gradients
D_c (rows × T × d_out), or token ids (rows × T) in place of A for an Embedding. The exact score of a
test block against a train block is

    S = Σ_c [ F_c F'_cᵀ + Σ_l Σ_{t,s} (A_c,t A'_c,sᵀ) ⊙ (D_c,t D'_c,sᵀ) ]

(with η_c, and 1/‖g_c‖ when normalising, folded into the flat part and D: they scale the whole
gradient). For T = T' = 1 each layer is two small GEMMs and a Hadamard product; with positions, the
(rows·T × rows'·T') products are summed over (t, s) in sub-tiles of at most PAIR_ELEMENTS; for an
Embedding A A'ᵀ is the indicator [id_t = id'_s]. On the CPU the block is computed in TILE_ROWS ×
TILE_COLS tiles into per-thread buffers (the Hadamard products then stay in cache), and top-k selects
one strip of TILE_ROWS test rows at a time, so no score block is allocated for it.
"""

from __future__ import annotations

import math
import threading
from typing import Any, NamedTuple

import numpy as np

from .kernels import NORM_EPS, TopK, select_topk
from .planning import Scratch

TILE_ROWS = 256  # test rows per CPU tile (and per top-k strip)
TILE_COLS = 512  # train rows per CPU tile
PAIR_ELEMENTS = 1 << 22  # (rows·T × rows'·T') elements of a positions product computed at once
GPU_TILE_ELEMENTS = 1 << 26  # score elements per tile on a GPU (the whole block, up to this)


class LayerRows(NamedTuple):
    """One factor layer of a row block: a (C, rows, T, d_in) or ids (rows, T), the other None; d (C, rows, T, d_out)."""

    a: Any
    ids: Any
    d: Any

    @property
    def positions(self) -> int:
        return int(self.d.shape[2])

    def rows(self, i: int, j: int) -> LayerRows:
        return LayerRows(
            None if self.a is None else self.a[:, i:j], None if self.ids is None else self.ids[i:j], self.d[:, i:j]
        )


class FactorRows(NamedTuple):
    """A row block of a factor store, scaled, ready for scoring: flat (rows, C·F) and its factor layers."""

    flat: Any
    layers: tuple[LayerRows, ...]

    @property
    def n_rows(self) -> int:
        return int(self.flat.shape[0])

    def rows(self, i: int, j: int) -> FactorRows:
        return FactorRows(self.flat[i:j], tuple(x.rows(i, j) for x in self.layers))

    def to(self, asarray) -> FactorRows:
        """The same block through ``asarray`` (host → device)."""

        def move(x):
            return None if x is None else asarray(x)

        return FactorRows(move(self.flat), tuple(LayerRows(move(x.a), move(x.ids), move(x.d)) for x in self.layers))


def inverse_norms(sq_norms: np.ndarray) -> np.ndarray:
    """1/‖g_c‖ per (checkpoint, row) from exact squared norms; 0 for a zero gradient."""
    norms = np.sqrt(np.maximum(np.asarray(sq_norms, dtype=np.float64), 0.0))
    return (1.0 / np.maximum(norms, NORM_EPS)).astype(np.float32)


def factor_rows(flat: np.ndarray, parts, scale: np.ndarray | None = None) -> FactorRows:
    """A block as read from the store, scaled per (checkpoint, row) by ``scale`` (C, rows) or not at all.

    ``flat``: (C, rows, F) float32; ``parts``: per factor layer (layout, values (C, rows, T, width), ids or None).
    """
    n_ckpt, rows, feat = flat.shape
    folded = np.empty((rows, n_ckpt, feat), dtype=np.float32)
    for c in range(n_ckpt):
        folded[:, c, :] = flat[c] if scale is None else flat[c] * scale[c][:, None]
    layers = []
    for f, values, ids in parts:
        a = None if f.tokens else np.ascontiguousarray(values[..., : f.a_width])
        d = np.ascontiguousarray(values[..., f.a_width :])
        if scale is not None:
            d *= scale[:, :, None, None]
        layers.append(LayerRows(a, None if ids is None else np.ascontiguousarray(ids), d))
    return FactorRows(folded.reshape(rows, n_ckpt * feat), tuple(layers))


# ---- scores ------------------------------------------------------------------------------------
_local = threading.local()
_fma_lock = threading.Lock()
_fma = None


def _multiply_add(acc, x, y) -> None:
    """acc += x * y elementwise (2-D, same shape): one pass over memory instead of two."""
    rows, cols = acc.shape
    for i in range(rows):
        for j in range(cols):
            acc[i, j] += x[i, j] * y[i, j]


def _fused_multiply_add():
    """``_multiply_add`` compiled by numba on first use (nogil, cached on disk)."""
    global _fma
    with _fma_lock:
        if _fma is None:
            import numba

            _fma = numba.njit(nogil=True, cache=True, fastmath=False)(_multiply_add)
    return _fma


def multiply_add(acc, x, y, xp) -> None:
    """acc += x ⊙ y: fused on the CPU (numba), two array operations elsewhere."""
    if xp is np:
        _fused_multiply_add()(acc, x, y)
    else:
        x *= y
        acc += x


def _buffers(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """This thread's three reusable (rows, cols) float32 tiles (numpy)."""
    bufs = getattr(_local, "tiles", None)
    if bufs is None or bufs[0].size < rows * cols:
        bufs = _local.tiles = tuple(np.empty(rows * cols, dtype=np.float32) for _ in range(3))
    return tuple(b[: rows * cols].reshape(rows, cols) for b in bufs)


def _strip(rows: int, cols: int) -> np.ndarray:
    buf = getattr(_local, "strip", None)
    if buf is None or buf.size < rows * cols:
        buf = _local.strip = None
        buf = _local.strip = np.empty(rows * cols, dtype=np.float32)
    return buf[: rows * cols].reshape(rows, cols)


def _positions_term(xt: LayerRows, xr: LayerRows, c: int, acc, xp) -> None:
    """acc (n, m) += Σ_{t,s} (a_t·a'_s)(δ_t·δ'_s) for one layer and checkpoint, in bounded sub-tiles."""
    n, t = xt.d.shape[1], xt.d.shape[2]
    m, s = xr.d.shape[1], xr.d.shape[2]
    if n == 0 or m == 0 or t == 0 or s == 0:
        return
    rstep = max(1, min(n, math.isqrt(max(1, PAIR_ELEMENTS // (t * s)))))
    cstep = max(1, PAIR_ELEMENTS // (rstep * t * s))
    for i in range(0, n, rstep):
        ie = min(n, i + rstep)
        dt = xt.d[c, i:ie].reshape((ie - i) * t, -1)
        at = None if xt.a is None else xt.a[c, i:ie].reshape((ie - i) * t, -1)
        it = None if xt.ids is None else xt.ids[i:ie].reshape(-1)
        for j in range(0, m, cstep):
            je = min(m, j + cstep)
            gd = xp.matmul(dt, xr.d[c, j:je].reshape((je - j) * s, -1).T)
            if it is not None:
                gd *= it[:, None] == xr.ids[j:je].reshape(-1)[None, :]
            else:
                gd *= xp.matmul(at, xr.a[c, j:je].reshape((je - j) * s, -1).T)
            acc[i:ie, j:je] += gd.reshape(ie - i, t, je - j, s).sum(axis=(1, 3))


def _tile(test: FactorRows, train: FactorRows, acc, t1, t2, xp) -> None:
    """acc (n, m) = the exact scores of ``test`` rows against ``train`` rows; t1, t2: scratch of acc's shape."""
    if test.flat.shape[1]:
        xp.matmul(test.flat, train.flat.T, out=acc)
    else:
        acc[...] = 0
    for xt, xr in zip(test.layers, train.layers):
        n_ckpt = xt.d.shape[0]
        simple = xt.ids is None and xt.positions == 1 and xr.positions == 1
        for c in range(n_ckpt):
            if not simple:
                _positions_term(xt, xr, c, acc, xp)
                continue
            xp.matmul(xt.a[c, :, 0], xr.a[c, :, 0].T, out=t1)
            xp.matmul(xt.d[c, :, 0], xr.d[c, :, 0].T, out=t2)
            multiply_add(acc, t1, t2, xp)


def score_block(test: FactorRows, train: FactorRows, xp):
    """(a, b) float32 exact scores of a test block against a train block."""
    a, b = test.n_rows, train.n_rows
    out = xp.empty((a, b), dtype=xp.float32)
    if xp is not np:
        rows = max(1, min(a, GPU_TILE_ELEMENTS // max(1, b)))
        for i in range(0, a, rows):
            ie = min(a, i + rows)
            t1 = xp.empty((ie - i, b), dtype=xp.float32)
            t2 = xp.empty_like(t1)
            _tile(test.rows(i, ie), train, out[i:ie], t1, t2, xp)
        return out
    for i in range(0, a, TILE_ROWS):
        ie = min(a, i + TILE_ROWS)
        _fill_strip(test.rows(i, ie), train, out[i:ie])
    return out


def _fill_strip(test: FactorRows, train: FactorRows, strip: np.ndarray) -> None:
    """strip (n, b) = scores of ``test`` (n ≤ TILE_ROWS rows) against every train row, tile by tile (numpy)."""
    n, b = strip.shape
    for j in range(0, b, TILE_COLS):
        je = min(b, j + TILE_COLS)
        acc, t1, t2 = _buffers(n, je - j)
        _tile(test, train.rows(j, je), acc, t1, t2, np)
        strip[:, j:je] = acc


def score_topk(test: FactorRows, train: FactorRows, k: int, offset: int, xp) -> TopK:
    """``select_topk(score_block(test, train))``; on the CPU one strip of TILE_ROWS test rows at a time."""
    if xp is not np:
        return select_topk(score_block(test, train, xp), k, offset, xp)
    a, b = test.n_rows, train.n_rows
    parts = []
    for i in range(0, a, TILE_ROWS):
        ie = min(a, i + TILE_ROWS)
        strip = _strip(ie - i, b)
        _fill_strip(test.rows(i, ie), train, strip)
        parts.append(select_topk(strip, k, offset, np))
    if len(parts) == 1:
        return parts[0]
    return TopK(*(np.concatenate([p[f] for p in parts], axis=0) for f in range(4)))


def self_influence(block: FactorRows, weights, xp):
    """Σ_c η_c ‖g_c‖² per row of an unscaled block, exactly from its factors: float64 (rows,).

    The squared norms ``score_block`` of the block with itself would put on its diagonal, per row:
    ‖a‖²‖δ‖² for one position, Σ_{t,s} of the (T × T) Gram products otherwise.
    """
    rows, n_ckpt = block.n_rows, len(weights)
    sq = xp.zeros((n_ckpt, rows), dtype=xp.float64)
    if block.flat.shape[1]:
        flat = block.flat.reshape(rows, n_ckpt, -1)
        sq += xp.einsum("rcf,rcf->cr", flat, flat, dtype=xp.float64)
    for x in block.layers:
        t = x.positions
        if t == 0:
            continue
        for c in range(n_ckpt):
            d = x.d[c]
            if x.ids is None and t == 1:
                sq[c] += xp.einsum("rk,rk->r", x.a[c, :, 0], x.a[c, :, 0], dtype=xp.float64) * xp.einsum(
                    "rk,rk->r", d[:, 0], d[:, 0], dtype=xp.float64
                )
                continue
            step = max(1, PAIR_ELEMENTS // (t * t))
            for i in range(0, rows, step):
                ie = min(rows, i + step)
                gd = xp.matmul(d[i:ie], d[i:ie].transpose(0, 2, 1))
                if x.ids is None:
                    gd *= xp.matmul(x.a[c, i:ie], x.a[c, i:ie].transpose(0, 2, 1))
                else:
                    gd *= x.ids[i:ie, :, None] == x.ids[i:ie, None, :]
                sq[c, i:ie] += gd.sum(axis=(1, 2), dtype=xp.float64)
    return xp.asarray(weights, dtype=xp.float64) @ sq


def scratch() -> Scratch:
    """What a CPU scoring task of a factor store holds beyond the planner's blocks: the top-k strip
    (TILE_ROWS × train rows), three tiles, and a positions product with its two operands."""
    return Scratch(fixed=3 * TILE_ROWS * TILE_COLS * 4 + 3 * PAIR_ELEMENTS * 4, per_train_row=TILE_ROWS * 4)
