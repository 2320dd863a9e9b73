"""Testing helpers for trackin-ooc, in the style of ``xarray.testing`` and dask's ``assert_eq``.

Plain NumPy (float64) references for the TracIn scores, assertions that compare the engine's
xarray results against them (with float32 tolerances and tie-aware top-k comparison), and a task
counter that tells whether building a result computed anything::

    from trackin_ooc import testing as tt

    expected = tt.reference_influence(test.read_grads(), train.read_grads(), train.learning_rates)
    with tt.count_tasks() as counter:
        lazy = to.influence(test, train)
    assert counter.tasks == 0
    tt.assert_influence_equal(lazy, expected, lazy=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr
from dask.callbacks import Callback

__all__ = [
    "reference_influence",
    "reference_self_influence",
    "reference_top_k",
    "assert_influence_equal",
    "assert_self_influence_equal",
    "assert_top_k_equal",
    "assert_lazy",
    "count_tasks",
    "TaskCounter",
]

# Rows whose norm is below this are treated as zero vectors by the cosine reference.
_NORM_EPS = 1e-30
TOP_K_VARS = ("proponent_index", "proponent_score", "opponent_index", "opponent_score")


# ---- references ---------------------------------------------------------------------------------
def _as_grads(grads: Any, name: str) -> np.ndarray:
    arr = np.asarray(grads, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name} must have shape (checkpoint, example, feature), got {arr.shape}")
    return arr


def _as_lrs(learning_rates: Sequence[float] | np.ndarray, n_checkpoints: int) -> np.ndarray:
    lrs = np.atleast_1d(np.asarray(learning_rates, dtype=np.float64))
    if lrs.shape != (n_checkpoints,):
        raise ValueError(f"{lrs.size} learning rates for {n_checkpoints} checkpoints")
    return lrs


def _unit_rows(g: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("crf,crf->cr", g, g))
    return g / np.maximum(norms, _NORM_EPS)[..., None]


def reference_influence(
    test_grads: np.ndarray,
    train_grads: np.ndarray,
    learning_rates: Sequence[float] | np.ndarray,
    normalize: bool = False,
) -> np.ndarray:
    """Σ_c η_c ⟨g_c(test), g_c(train)⟩ as a float64 (n_test, n_train) array, from (C, N, F) arrays.

    With ``normalize`` every checkpoint's gradients are scaled to unit length first (cosine).
    """
    te, tr = _as_grads(test_grads, "test_grads"), _as_grads(train_grads, "train_grads")
    if te.shape[0] != tr.shape[0] or te.shape[2] != tr.shape[2]:
        raise ValueError(f"test grads {te.shape} and train grads {tr.shape} do not combine")
    lrs = _as_lrs(learning_rates, te.shape[0])
    if normalize:
        te, tr = _unit_rows(te), _unit_rows(tr)
    out = np.zeros((te.shape[1], tr.shape[1]), dtype=np.float64)
    for c in range(te.shape[0]):
        out += lrs[c] * (te[c] @ tr[c].T)
    return out


def reference_self_influence(grads: np.ndarray, learning_rates: Sequence[float] | np.ndarray) -> np.ndarray:
    """Σ_c η_c ‖g_c(z)‖² for every example, float64 of shape (n_examples,)."""
    g = _as_grads(grads, "grads")
    lrs = _as_lrs(learning_rates, g.shape[0])
    return lrs @ np.einsum("crf,crf->cr", g, g)


def reference_top_k(scores: np.ndarray, k: int) -> xr.Dataset:
    """Exact top-k of every row of a score matrix, as the engine's ``top_k`` Dataset would hold it.

    Proponents by descending score, opponents by ascending score; equal scores go to the lower
    train index. Scores stay float64.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (n_test, n_train), got shape {s.shape}")
    if not 0 < k <= s.shape[1]:
        raise ValueError(f"k must be in 1..{s.shape[1]}, got {k}")
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    worst = np.argsort(s, axis=1, kind="stable")[:, :k]
    dims = ("test", "rank")
    return xr.Dataset(
        {
            "proponent_index": (dims, best.astype(np.int64)),
            "proponent_score": (dims, np.take_along_axis(s, best, axis=1)),
            "opponent_index": (dims, worst.astype(np.int64)),
            "opponent_score": (dims, np.take_along_axis(s, worst, axis=1)),
        },
        coords={"rank": np.arange(1, k + 1)},  # ranks from 1, as to.top_k counts them
    )


# ---- laziness and task counting -----------------------------------------------------------------
def _dask_arrays(obj: Any) -> list[Any]:
    if isinstance(obj, xr.Dataset):
        return [obj[name].data for name in obj.data_vars]
    if isinstance(obj, xr.DataArray):
        return [obj.data]
    return [obj]


def _is_materialised(node: Any) -> bool:
    """True when a graph value is literal data rather than a task or a reference to one."""
    try:
        from dask._task_spec import DataNode, GraphNode
    except ImportError:  # pragma: no cover - older dask
        pass
    else:
        if isinstance(node, DataNode):
            return True
        if isinstance(node, GraphNode):
            return False
    if dask.core.istask(node):
        return False
    return isinstance(node, np.ndarray | np.generic) or hasattr(node, "__cuda_array_interface__")


def assert_lazy(obj: Any) -> None:
    """Assert ``obj`` (DataArray, Dataset or dask collection) is dask-backed and not yet computed.

    "Not computed" means every output chunk is still a task in the graph, not literal data as
    ``persist()`` or an eager computation would leave it.
    """
    arrays = _dask_arrays(obj)
    assert arrays, f"{type(obj).__name__} holds no data variables"
    for arr in arrays:
        assert dask.is_dask_collection(arr), f"expected a dask-backed result, got {type(arr).__name__}"
        graph = dict(arr.__dask_graph__())
        keys = list(dask.core.flatten(arr.__dask_keys__()))
        assert keys, "dask collection has no output keys"
        done = [k for k in keys if _is_materialised(graph.get(k))]
        assert not done, f"{len(done)} of {len(keys)} output chunks are already computed, e.g. {done[0]}"


def _shapes(result: Any) -> list[tuple[int, ...]]:
    if hasattr(result, "shape") and hasattr(result, "dtype"):
        return [tuple(result.shape)]
    if isinstance(result, tuple | list):
        return [s for item in result for s in _shapes(item)]
    return []


class TaskCounter(Callback):
    """A dask callback that counts what local schedulers (threads, processes, sync) execute.

    ``tasks``: tasks finished; ``computes``: graphs started; ``keys``: the finished keys in order;
    ``result_shapes``: key -> shapes of the arrays each task returned (with ``record_shapes``).
    Tasks run on a ``distributed`` cluster are not seen.
    """

    def __init__(self, record_shapes: bool = False):
        super().__init__()
        self.record_shapes = record_shapes
        self.tasks = 0
        self.computes = 0
        self.keys: list[Any] = []
        self.result_shapes: dict[Any, list[tuple[int, ...]]] = {}

    def _start(self, dsk: Any) -> None:
        self.computes += 1

    def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
        self.tasks += 1
        self.keys.append(key)
        if self.record_shapes:
            self.result_shapes[key] = _shapes(result)


@contextlib.contextmanager
def count_tasks(record_shapes: bool = False) -> Iterator[TaskCounter]:
    """Count the dask tasks executed inside the block: ``with count_tasks() as c: ...; c.tasks``."""
    counter = TaskCounter(record_shapes=record_shapes)
    with counter:
        yield counter


# ---- assertions -----------------------------------------------------------------------------------
def _tolerance(expected: np.ndarray, rtol: float, atol: float | None) -> float:
    """Absolute tolerance: ``atol``, or ``rtol`` times the largest magnitude (float32 GEMM error
    scales with the operands, not with each entry, so small entries need an absolute bound)."""
    if atol is not None:
        return float(atol)
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return rtol * max(scale, float(np.finfo(np.float32).tiny))


def assert_influence_equal(
    actual: xr.DataArray,
    expected: np.ndarray,
    rtol: float = 1e-5,
    atol: float | None = None,
    lazy: bool | None = None,
) -> None:
    """Assert an influence DataArray matches a (n_test, n_train) reference.

    Checks dims ("test", "train"), float32 dtype and shape; with ``lazy=True`` that it is
    dask-backed and uncomputed, with ``lazy=False`` that it holds NumPy data. ``atol`` defaults
    to ``rtol`` times the largest reference magnitude.
    """
    assert isinstance(actual, xr.DataArray), f"expected an xarray.DataArray, got {type(actual).__name__}"
    assert actual.dims == ("test", "train"), f"dims {actual.dims} != ('test', 'train')"
    assert actual.dtype == np.float32, f"dtype {actual.dtype} != float32"
    exp = np.asarray(expected, dtype=np.float64)
    assert actual.shape == exp.shape, f"shape {actual.shape} != {exp.shape}"
    if lazy is True:
        assert_lazy(actual)
    elif lazy is False:
        assert not dask.is_dask_collection(actual.data), "expected an eager (NumPy-backed) result"
    values = np.asarray(actual.values, dtype=np.float64)
    np.testing.assert_allclose(values, exp, rtol=rtol, atol=_tolerance(exp, rtol, atol))


def assert_self_influence_equal(
    actual: xr.DataArray, expected: np.ndarray, rtol: float = 1e-5, atol: float | None = None
) -> None:
    """Assert a self-influence DataArray (dims ("example",)) matches a reference vector."""
    assert isinstance(actual, xr.DataArray), f"expected an xarray.DataArray, got {type(actual).__name__}"
    assert actual.dims == ("example",), f"dims {actual.dims} != ('example',)"
    exp = np.asarray(expected, dtype=np.float64)
    assert actual.shape == exp.shape, f"shape {actual.shape} != {exp.shape}"
    values = np.asarray(actual.values, dtype=np.float64)
    np.testing.assert_allclose(values, exp, rtol=rtol, atol=_tolerance(exp, rtol, atol))


def _at(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(x) for x in np.argwhere(mask)[0])


def _check_side(
    name: str,
    idx: np.ndarray,
    val: np.ndarray,
    scores: np.ndarray,
    ref_idx: np.ndarray,
    ref_val: np.ndarray,
    tol: np.ndarray,
    descending: bool,
) -> None:
    n_train = scores.shape[1]
    assert np.issubdtype(idx.dtype, np.integer), f"{name}_index dtype {idx.dtype} is not an integer type"
    assert ((idx >= 0) & (idx < n_train)).all(), f"{name}_index out of range 0..{n_train - 1}"
    for i, row in enumerate(idx):
        assert len(np.unique(row)) == len(row), f"test row {i}: repeated {name} indices {row.tolist()}"
    # The engine's own order: sorted by its scores, equal scores by ascending train index.
    step = np.diff(val, axis=1)
    bad_order = step > 0 if descending else step < 0
    order = "descending" if descending else "ascending"
    assert not bad_order.any(), f"{name}_score not sorted {order} in test row {_at(bad_order)[0]}"
    tied = step == 0
    assert not (tied & (np.diff(idx, axis=1) <= 0)).any(), f"equal {name} scores not in train-index order"
    # Each reported score is the score of the reported index, and the k best by rank.
    own = np.take_along_axis(scores, idx, axis=1)
    off = np.abs(val - own) > tol
    assert not off.any(), (
        f"{name}_score differs from the reference score of its index at {_at(off)}: {val[off][0]} vs {own[off][0]}"
    )
    off = np.abs(val - ref_val) > tol
    assert not off.any(), (
        f"{name}_score differs from the reference top-k at {_at(off)}: {val[off][0]} vs {ref_val[off][0]}"
    )
    # Indices exactly as the reference, except where the scores tie within tolerance.
    differ = idx != ref_idx
    gap = np.abs(own - np.take_along_axis(scores, ref_idx, axis=1))
    untied = differ & (gap > tol)
    assert not untied.any(), (
        f"{name}_index differs from the reference at {_at(untied)} where scores do not tie: "
        f"{idx[untied][0]} vs {ref_idx[untied][0]}"
    )


def assert_top_k_equal(
    actual: xr.Dataset,
    expected_scores: np.ndarray,
    k: int,
    rtol: float = 1e-5,
    atol: float | None = None,
) -> None:
    """Assert a ``top_k`` Dataset is the exact top-k of a (n_test, n_train) reference score matrix.

    Indices must equal the reference's exactly, except where the two candidates' reference scores
    tie within tolerance (then either order is right, and the scores must match). Also checks dims,
    the k ranks, unique in-range indices, and the engine's own sort order and tie-breaking.
    """
    assert isinstance(actual, xr.Dataset), f"expected an xarray.Dataset, got {type(actual).__name__}"
    missing = [v for v in TOP_K_VARS if v not in actual.data_vars]
    assert not missing, f"missing variables {missing}"
    scores = np.asarray(expected_scores, dtype=np.float64)
    ref = reference_top_k(scores, k)
    base = _tolerance(scores, rtol, atol)
    for side, descending in (("proponent", True), ("opponent", False)):
        idx_da, val_da = actual[f"{side}_index"], actual[f"{side}_score"]
        for da_ in (idx_da, val_da):
            assert da_.dims == ("test", "rank"), f"{da_.name} dims {da_.dims} != ('test', 'rank')"
            assert da_.shape == (scores.shape[0], k), f"{da_.name} shape {da_.shape} != {(scores.shape[0], k)}"
        ref_val = ref[f"{side}_score"].values
        _check_side(
            side,
            np.asarray(idx_da.values),
            np.asarray(val_da.values, dtype=np.float64),
            scores,
            ref[f"{side}_index"].values,
            ref_val,
            base + rtol * np.abs(ref_val),
            descending,
        )


# Attributes that differ between any two captures of the same data (when, by which build, which run).
RUN_ATTRS = ("created", "store_id", "package_version")


def assert_stores_identical(actual, expected, *, ignore_attrs: Sequence[str] = RUN_ATTRS) -> None:
    """Assert two gradient stores hold the same bytes: every array (values, dtype, shape, chunks) and
    every ``trackin_ooc`` attribute except ``ignore_attrs``.

    What a resumed or scaled-out capture is checked against: an uninterrupted one-process run.
    """
    from .store import open_store

    a, b = open_store(actual), open_store(expected)
    names_a, names_b = sorted(n for n, _ in a._group.arrays()), sorted(n for n, _ in b._group.arrays())
    assert names_a == names_b, f"arrays differ: {names_a} vs {names_b}"
    for name in names_a:
        x, y = a._group[name], b._group[name]
        assert isinstance(x, zarr.Array) and isinstance(y, zarr.Array), name
        assert x.dtype == y.dtype and x.shape == y.shape and x.chunks == y.chunks, (
            f"{name}: {x.dtype} {x.shape} chunks {x.chunks} vs {y.dtype} {y.shape} chunks {y.chunks}"
        )
        xv, yv = np.asarray(x[...]), np.asarray(y[...])
        if xv.dtype.kind == "f":
            same = np.array_equal(xv.view(f"u{xv.itemsize}"), yv.view(f"u{yv.itemsize}"))  # NaNs too
        else:
            same = np.array_equal(xv, yv)
        if not same:
            diff: Any = np.argwhere(xv != yv) if xv.shape else []
            first = tuple(int(i) for i in diff[0]) if len(diff) else ()
            raise AssertionError(f"array {name} differs ({len(diff)} elements, first at {first})")
    ma = {k: v for k, v in a.attrs.items() if k not in ignore_attrs}
    mb = {k: v for k, v in b.attrs.items() if k not in ignore_attrs}
    differ = {k: (ma.get(k), mb.get(k)) for k in set(ma) | set(mb) if ma.get(k) != mb.get(k)}
    assert not differ, f"attributes differ: {differ}"
