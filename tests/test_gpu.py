"""device="gpu" (CuPy blocks) gives the device="cpu" (NumPy blocks) results. Skips without a CUDA device."""

from __future__ import annotations

import itertools

import dask
import numpy as np
import pytest

import trackin_ooc as to
from tests import has_cupy, requires_cupy
from trackin_ooc import testing as tt
from trackin_ooc.engine import resources
from trackin_ooc.engine.array_module import resolve_backend
from trackin_ooc.engine.planning import worker_bytes
from trackin_ooc.store import layout

LRS = [0.6, 0.05, 1.7]
_counter = itertools.count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("gpu")


def make_pair(workdir, dtype: str, n_test: int = 19, n_train: int = 83, feat: int = 24):
    i = next(_counter)
    rng = np.random.default_rng(i)
    te = to.from_arrays(
        workdir / f"test-{i}.zarr",
        rng.standard_normal((3, n_test, feat)).astype(np.float32),
        LRS,
        chunk_rows=4,
        dtype=dtype,
    )
    tr = to.from_arrays(
        workdir / f"train-{i}.zarr",
        rng.standard_normal((3, n_train, feat)).astype(np.float32),
        LRS,
        chunk_rows=8,
        dtype=dtype,
    )
    return te, tr


def small_budget(te, tr, test_rows: int, train_rows: int, k: int = 0) -> int:
    width = tr.n_checkpoints * tr.feature_dim
    return worker_bytes(test_rows, train_rows, width, layout.itemsize(tr.dtype), resources.detect().threads, k)


def test_gpu_device_is_refused_or_resolved():
    """Runs everywhere: without CuPy, device='gpu' is an error (never a silent CPU fallback)."""
    if has_cupy:
        assert resolve_backend("gpu").name == "cupy"
        assert resolve_backend("auto").name == "cupy"
    else:
        with pytest.raises(RuntimeError, match="cupy"):
            resolve_backend("gpu")
        assert resolve_backend("auto").name == "numpy"
    assert resolve_backend("cpu").name == "numpy"
    with pytest.raises(ValueError, match="device"):
        resolve_backend("tpu")


@requires_cupy
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gpu_influence_equals_cpu(workdir, dtype, normalize):
    te, tr = make_pair(workdir, dtype)
    limit = small_budget(te, tr, 5, 16)
    cpu = to.influence(te, tr, normalize=normalize, device="cpu", memory_limit=limit)
    gpu = to.influence(te, tr, normalize=normalize, device="gpu", memory_limit=limit)
    tt.assert_lazy(gpu)
    assert gpu.data.numblocks == cpu.data.numblocks and gpu.data.numblocks[1] > 1
    cpu_values = cpu.values
    computed = gpu.compute()
    assert type(computed.data) is np.ndarray  # blocks come back to the host
    tt.assert_influence_equal(computed, cpu_values, rtol=1e-5, lazy=False)
    expected = tt.reference_influence(te.read_grads(), tr.read_grads(), LRS, normalize=normalize)
    tt.assert_influence_equal(computed, expected, rtol=1e-5)


@requires_cupy
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_influence_out_equals_cpu(workdir, tmp_path, dtype):
    te, tr = make_pair(workdir, dtype)
    limit = small_budget(te, tr, 5, 16)
    cpu = to.influence(te, tr, out=tmp_path / "cpu.zarr", device="cpu", memory_limit=limit)
    gpu = to.influence(te, tr, out=tmp_path / "gpu.zarr", device="gpu", memory_limit=limit)
    tt.assert_influence_equal(gpu, cpu.values, rtol=1e-5)
    assert gpu.attrs["complete"] is True


@requires_cupy
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("k", [1, 5, 40])  # 40: more than a train block below
def test_gpu_top_k_equals_cpu(workdir, dtype, normalize, k):
    te, tr = make_pair(workdir, dtype)
    limit = small_budget(te, tr, 3, 16, k=k)
    plan = to.plan_for(te, tr, memory_limit=limit, k=k)
    assert len(plan.train_blocks(tr.n_examples)) > 1
    cpu = to.top_k(te, tr, k=k, normalize=normalize, device="cpu", memory_limit=limit)
    gpu = to.top_k(te, tr, k=k, normalize=normalize, device="gpu", memory_limit=limit)
    expected = tt.reference_influence(te.read_grads(), tr.read_grads(), LRS, normalize=normalize)
    tt.assert_top_k_equal(gpu, expected, k)
    tt.assert_top_k_equal(cpu, expected, k)
    for name in ("proponent_score", "opponent_score"):
        assert type(gpu[name].data) is np.ndarray
        np.testing.assert_allclose(gpu[name].values, cpu[name].values, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@requires_cupy
def test_gpu_top_k_ties_go_to_the_lower_index(workdir):
    rng = np.random.default_rng(3)
    distinct = rng.integers(-2, 3, size=(2, 5, 8)).astype(np.float32)
    train = distinct[:, rng.integers(0, 5, size=50), :]
    test = rng.integers(-2, 3, size=(2, 7, 8)).astype(np.float32)
    lrs = [0.5, 2.0]
    te = to.from_arrays(workdir / "tie-test.zarr", test, lrs, chunk_rows=4)
    tr = to.from_arrays(workdir / "tie-train.zarr", train, lrs, chunk_rows=4)
    k = 12
    gpu = to.top_k(te, tr, k=k, device="gpu", memory_limit=small_budget(te, tr, 2, 4, k=k))
    ref = tt.reference_top_k(tt.reference_influence(test, train, lrs), k)
    for name in tt.TOP_K_VARS:
        np.testing.assert_array_equal(gpu[name].values, ref[name].values, err_msg=name)


@requires_cupy
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_gpu_self_influence_equals_cpu(workdir, dtype):
    _, tr = make_pair(workdir, dtype)
    cpu = to.self_influence(tr, device="cpu")
    lazy = to.self_influence(tr, device="gpu", compute_now=False)
    tt.assert_lazy(lazy)
    gpu = to.self_influence(tr, device="gpu")
    assert type(gpu.data) is np.ndarray and not dask.is_dask_collection(gpu.data)
    np.testing.assert_allclose(gpu.values, cpu.values, rtol=1e-5)
    np.testing.assert_allclose(lazy.values, cpu.values, rtol=1e-5)
    tt.assert_self_influence_equal(gpu, tt.reference_self_influence(tr.read_grads(), LRS))
