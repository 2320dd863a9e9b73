"""Gradient stores on disk: plain Zarr v3 / xarray readability, checksums, completeness, dtypes."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch.utils.data import Dataset
from zarr.codecs import Crc32cCodec

import trackin_ooc as to
from trackin_ooc.store.rows import RowBlock

DIMS = ("checkpoint", "example", "feature")


def capture_test_split(trained, digits_test, path, **kw) -> to.GradientStore:
    kw.setdefault("projection_dim", 64)
    return to.capture(trained.model, trained.checkpoints, digits_test, path, **kw)


def group_meta(path) -> dict:
    """The store's trackin_ooc attributes, read by plain zarr (not through GradientStore)."""
    return dict(zarr.open_group(str(path), mode="r").attrs)["trackin_ooc"]


def numpy_self_influence(grads: np.ndarray, lrs) -> np.ndarray:
    g = grads.astype(np.float64)
    return np.einsum("c,cnf,cnf->n", np.asarray(lrs, dtype=np.float64), g, g)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def test_xarray_opens_a_captured_store(mlp, digits_test, tmp_path):
    path = tmp_path / "test.zarr"
    store = capture_test_split(mlp, digits_test, path)
    ds = xr.open_zarr(path)  # plain xarray, no trackin_ooc involved
    assert ds["grads"].dims == DIMS
    assert ds["grads"].shape == (len(mlp.checkpoints), len(digits_test), 64)
    assert "example" in ds.coords
    np.testing.assert_array_equal(ds["example"].values, np.arange(len(digits_test)))
    np.testing.assert_array_equal(ds["grads"].values, store.read_grads())
    assert ds["loss"].dims == ("checkpoint", "example")
    assert np.all(np.isfinite(ds["loss"].values)) and np.all(ds["loss"].values >= 0)
    assert ds["learning_rate"].dims == ("checkpoint",)
    np.testing.assert_allclose(ds["learning_rate"].values, mlp.learning_rate)
    np.testing.assert_array_equal(ds["label"].values, digits_test.tensors[1].numpy())


def test_every_array_has_a_crc32c_checksum(mlp, digits_test, tmp_path):
    path = tmp_path / "test.zarr"
    capture_test_split(mlp, digits_test, path)
    group = zarr.open_group(str(path), mode="r")
    assert group.metadata.zarr_format == 3
    arrays = dict(group.arrays())
    assert {"grads", "loss", "learning_rate", "example", "label"} <= set(arrays)
    for name, arr in arrays.items():
        codecs = arr.metadata.codecs
        assert any(isinstance(c, Crc32cCodec) for c in codecs), f"{name} has no crc32c codec: {codecs}"


def test_complete_only_after_every_block_is_written(rng, tmp_path):
    path = tmp_path / "blocks.zarr"
    n, feat, lrs = 50, 8, [0.5, 0.25]
    grads = rng.standard_normal((2, n, feat)).astype(np.float32)
    store = to.GradientStore.create(
        path,
        n_checkpoints=2,
        n_examples=n,
        spec=to.ProjectionSpec(kind="external", dim=feat),
        learning_rates=lrs,
        chunk_rows=16,
    )
    blocks = store.row_blocks()
    assert blocks == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert group_meta(path)["complete"] is False
    assert not to.open_store(path).complete

    # Write the blocks out of order: "complete" means every block, not "the block at the end".
    order = [3, 0, 2, 1]
    for i, b in enumerate(order):
        start, stop = blocks[b]
        store.write_block(start, RowBlock(grads[:, start:stop], rng.random((2, stop - start), dtype=np.float32)))
        assert int(store.blocks_done().sum()) == i + 1
        assert group_meta(path)["complete"] is False
        with pytest.raises(to.IncompleteStoreError, match="incomplete"):
            to.self_influence(path)
        if i < len(order) - 1:
            with pytest.raises(to.IncompleteStoreError):
                store.mark_complete()
            assert group_meta(path)["complete"] is False

    store.mark_complete()
    assert group_meta(path)["complete"] is True
    reopened = to.open_store(path)
    assert reopened.complete
    np.testing.assert_array_equal(reopened.read_grads(), grads)
    np.testing.assert_allclose(to.self_influence(path).values, numpy_self_influence(grads, lrs), rtol=1e-5)


class FailingDataset(Dataset):
    """The first ``fail_at`` examples of ``base``, then an error (a disk that goes away mid-capture)."""

    def __init__(self, base, fail_at: int):
        self.base, self.fail_at = base, fail_at

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i >= self.fail_at:
            raise OSError(f"example {i} is unreadable")
        return self.base[i]


def test_interrupted_capture_leaves_an_incomplete_store(mlp, digits, digits_test, tmp_path):
    path = tmp_path / "broken.zarr"
    data = FailingDataset(digits.train, fail_at=100)
    with pytest.raises(OSError, match="unreadable"):
        to.capture(mlp.model, mlp.checkpoints, data, path, projection_dim=32, chunk_rows=32, batch_size=16)
    assert path.exists()
    assert group_meta(path)["complete"] is False
    store = to.open_store(path)
    assert not store.complete
    assert len(store.row_blocks()) == -(-len(digits.train) // 32)
    assert not store.blocks_done().all()
    # The engine refuses it, and says why.
    with pytest.raises(to.IncompleteStoreError, match="incomplete"):
        to.self_influence(path)
    good = tmp_path / "test.zarr"
    capture_test_split(mlp, digits_test, good, projection_dim=32)
    with pytest.raises(to.IncompleteStoreError):
        to.influence(good, path)
    with pytest.raises(to.IncompleteStoreError):
        to.top_k(good, path, k=3)


def bfloat16_reference(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).to(torch.float32).numpy()


def float16_reference(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


# dtype -> (reference rounding, unit roundoff, absolute error bound for subnormals, zarr dtype on disk)
REFERENCE = {
    "float16": (float16_reference, 2.0**-11, 2.0**-25, np.float16),
    "bfloat16": (bfloat16_reference, 2.0**-8, 0.0, np.uint16),  # float32's exponent range: no subnormals here
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_from_arrays_low_precision_round_trip(dtype, rng, tmp_path):
    reference, eps, tiny, on_disk = REFERENCE[dtype]
    grads = (rng.standard_normal((2, 40, 24)) * 0.05).astype(np.float32)
    path = tmp_path / f"{dtype}.zarr"
    to.from_arrays(path, grads, [0.1, 0.2], dtype=dtype, chunk_rows=16)
    store = to.open_store(path)
    assert store.dtype == dtype
    assert zarr.open_group(str(path), mode="r")["grads"].dtype == on_disk  # really stored in 16 bits
    back = store.read_grads()
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, grads, rtol=eps, atol=tiny)
    np.testing.assert_array_equal(back, reference(grads))  # round to nearest (even), like numpy/torch
    assert not np.array_equal(back, grads)  # precision was actually reduced
    # The xarray view holds floats (bfloat16 bits decoded, not raw uint16) equal to read_grads.
    ds = store.to_xarray()
    assert ds["grads"].dtype.kind == "f"
    assert isinstance(ds["grads"].data, da.Array)
    np.testing.assert_array_equal(ds["grads"].values.astype(np.float32), back)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_capture_low_precision_round_trip(dtype, mlp, digits_test, tmp_path):
    reference, eps, tiny, _ = REFERENCE[dtype]
    full = capture_test_split(mlp, digits_test, tmp_path / "f32.zarr", projection_dim=128)
    half = capture_test_split(mlp, digits_test, tmp_path / "half.zarr", projection_dim=128, dtype=dtype)
    assert half.dtype == dtype and full.dtype == "float32"
    g32, g16 = full.read_grads(), half.read_grads()
    np.testing.assert_array_equal(g16, reference(g32))
    np.testing.assert_allclose(g16, g32, rtol=eps, atol=tiny)
    np.testing.assert_allclose(to.self_influence(half).values, to.self_influence(full).values, rtol=4 * eps)
    # Stores of different storage dtypes do not combine silently.
    with pytest.raises(to.IncompatibleStoresError, match="dtype"):
        to.influence(half, full)


def test_to_xarray_is_lazy_and_dask_backed(mlp, digits_test, tmp_path):
    path = tmp_path / "test.zarr"
    store = capture_test_split(mlp, digits_test, path, chunk_rows=16)
    ds = store.to_xarray()
    for name in ("grads", "loss"):
        assert isinstance(ds[name].data, da.Array), f"{name} is not dask-backed"
    assert ds["grads"].dims == DIMS
    n_ckpt, n = store.n_checkpoints, store.n_examples
    assert ds["grads"].data.chunks == ((1,) * n_ckpt, (16, 16, 16, n - 48), (store.feature_dim,))
    np.testing.assert_array_equal(ds["example"].values, np.arange(n))
    expected = store.read_grads()
    # Nothing was read when the Dataset was made: change the data on disk, then compute.
    zarr.open_group(str(path), mode="r+")["grads"][:, :16, :] = 0.0
    values = ds["grads"].values
    assert np.all(values[:, :16] == 0)
    np.testing.assert_array_equal(values[:, 16:], expected[:, 16:])


@pytest.mark.parametrize("kind", ["numpy", "dask", "zarr"])
def test_from_arrays_and_open_store_properties(kind, rng, tmp_path):
    c, n, f = 3, 37, 5
    lrs = [0.5, 0.25, 0.125]
    grads = rng.standard_normal((c, n, f)).astype(np.float32)
    ids = np.arange(100, 100 + n)
    labels = rng.integers(0, 10, size=n)
    if kind == "dask":
        source = da.from_array(grads, chunks=(1, 10, f))
    elif kind == "zarr":
        source = zarr.create_array(str(tmp_path / "source.zarr"), shape=grads.shape, chunks=(1, 8, f), dtype="float32")
        source[:] = grads
    else:
        source = grads
    path = tmp_path / "store.zarr"
    made = to.from_arrays(path, source, lrs, example_ids=ids, labels=labels, chunk_rows=8)
    for store in (made, to.open_store(path), to.open_store(str(path))):
        assert isinstance(store, to.GradientStore)
        assert store.n_checkpoints == c
        assert store.n_examples == n
        assert store.feature_dim == f
        np.testing.assert_array_equal(store.learning_rates, lrs)
        assert store.complete
        np.testing.assert_array_equal(store.example_ids(), ids)
        np.testing.assert_array_equal(store.labels(), labels)
        np.testing.assert_array_equal(store.read_grads(), grads)
    si = to.self_influence(path)
    np.testing.assert_array_equal(si["example"].values, ids)
    np.testing.assert_allclose(si.values, numpy_self_influence(grads, lrs), rtol=1e-5)
