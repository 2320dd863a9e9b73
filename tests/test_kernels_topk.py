"""kernels.select_topk against a full stable sort: heavy ties, k at and beyond the block width, infinities.

Both CPU paths are checked: the fused one-pass kernel (numba) and the array-module path kept for CuPy
and for large k.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trackin_ooc.engine import kernels


def reference(scores: np.ndarray, k: int, offset: int) -> kernels.TopK:
    """Stable argsort of the whole row: ties keep the lower column."""
    kk = min(k, scores.shape[1])
    best = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    worst = np.argsort(scores, axis=1, kind="stable")[:, :kk]
    take = np.take_along_axis
    return kernels.TopK(take(scores, best, 1), best + offset, take(scores, worst, 1), worst + offset)


def assert_same(got: kernels.TopK, want: kernels.TopK) -> None:
    for name, g, w in zip(kernels.TopK._fields, got, want, strict=True):
        assert g.shape == w.shape, name
        assert g.dtype == w.dtype, name
        np.testing.assert_array_equal(g, w, err_msg=name)


@pytest.fixture(params=["fused", "array"])
def path(request, monkeypatch):
    if request.param == "array":
        monkeypatch.setattr(kernels, "FUSED_MAX_K", -1)
    return request.param


@st.composite
def blocks(draw):
    """A score block with few distinct values (many ties), sometimes ±inf, ±0 or a sorted row."""
    a = draw(st.integers(1, 6))
    b = draw(st.integers(1, 300))
    distinct = draw(st.sampled_from([1, 2, 3, 5, 50, 10**6]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scores = rng.integers(-distinct, distinct + 1, size=(a, b)).astype(np.float32) / 7
    if draw(st.booleans()):
        scores[rng.random((a, b)) < 0.05] = np.inf
        scores[rng.random((a, b)) < 0.05] = -np.inf
    if draw(st.booleans()):
        scores[rng.random((a, b)) < 0.2] = -0.0
    if draw(st.booleans()):
        scores[0] = np.sort(scores[0])[:: draw(st.sampled_from([1, -1]))]
    return scores


@settings(max_examples=300, deadline=None)
@given(scores=blocks(), k=st.integers(1, 320), offset=st.integers(0, 10**9))
def test_select_topk_matches_stable_sort(scores, k, offset):
    for max_k in (kernels.FUSED_MAX_K, -1):  # fused kernel, then the array-module path
        saved, kernels.FUSED_MAX_K = kernels.FUSED_MAX_K, max_k
        try:
            assert_same(kernels.select_topk(scores, k, offset, np), reference(scores, k, offset))
        finally:
            kernels.FUSED_MAX_K = saved


@pytest.mark.parametrize("k", [1, 10, 100])
def test_select_topk_realistic_block(path, k):
    rng = np.random.default_rng(k)
    scores = rng.standard_normal((40, 16384), dtype=np.float32)
    scores[3] = 0.0  # a zero gradient: every score ties
    scores[5, ::2] = scores[5, 1::2]  # pairs of equal scores
    assert_same(kernels.select_topk(scores, k, 16384 * 3, np), reference(scores, k, 16384 * 3))


def test_non_contiguous_and_float64(path):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((30, 500))
    view = scores[::2, ::3]
    assert_same(kernels.select_topk(view, 7, 5, np), reference(view, 7, 5))


@pytest.mark.parametrize("b,k", [(16384, 10), (16384, 256), (1000, 999), (5, 4), (4096, 1)])
def test_fused_chunks_between_k_and_b(b, k):
    assert k <= kernels.fused_chunks(b, k) <= b


@settings(max_examples=60, deadline=None)
@given(
    a=st.integers(1, 5),
    b=st.integers(1, 200),
    k=st.integers(1, 60),
    tile_bytes=st.sampled_from([1, 64, 400, 64 << 20]),
    seed=st.integers(0, 2**32 - 1),
)
def test_score_topk_tiles_match_one_block(a, b, k, tile_bytes, seed):
    """Column tiles of the GEMM, each selected and then merged, give the whole block's selection exactly
    (small integer features: exact scores with many ties)."""
    rng = np.random.default_rng(seed)
    test = rng.integers(-2, 3, size=(a, 4)).astype(np.float32)
    train = rng.integers(-2, 3, size=(b, 4)).astype(np.float32)
    saved_tile, saved_min = kernels.SCORE_TILE_BYTES, kernels.SCORE_TILE_MIN_COLS
    kernels.SCORE_TILE_BYTES, kernels.SCORE_TILE_MIN_COLS = tile_bytes, 1
    try:
        got = kernels.score_topk(test, train, k, 1000, np)
    finally:
        kernels.SCORE_TILE_BYTES, kernels.SCORE_TILE_MIN_COLS = saved_tile, saved_min
    assert_same(got, reference(test @ train.T, k, 1000))
