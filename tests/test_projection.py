"""Random projections: reproducible from the spec, refused when specs differ, faithful to exact ranks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from torch.utils.data import Subset, TensorDataset

import trackin_ooc as to

DIM = 2048
MIN_MEAN_SPEARMAN = 0.95


def capture(trained, data, path, **kw):
    return to.capture(trained.model, trained.checkpoints, data, path, **kw)


@pytest.fixture(scope="module")
def exact_influence(mlp, exact_pair) -> np.ndarray:
    """Exact (test, train) influence on the digits MLP: the reference for projected scores (the exact
    stores are the session's, conftest.py)."""
    test, train = exact_pair("mlp")
    assert train.spec.kind == "exact"
    assert train.feature_dim == sum(p.numel() for p in mlp.model.parameters())
    return to.influence(test, train).values


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_same_spec_is_bit_identical_across_runs(kind, mlp, digits, tmp_path):
    a = capture(mlp, digits.train, tmp_path / "a.zarr", projection_dim=256, projection=kind, seed=7)
    b = capture(mlp, digits.train, tmp_path / "b.zarr", projection_dim=256, projection=kind, seed=7)
    assert a.feature_dim == b.feature_dim == 256
    assert a.spec.kind == kind and a.spec.seed == 7
    assert a.fingerprint == b.fingerprint
    ga, gb = a.read_grads(), b.read_grads()
    assert ga.shape == (len(mlp.checkpoints), len(digits.train), 256)
    assert np.abs(ga).max() > 0
    np.testing.assert_array_equal(ga, gb)


def test_train_and_test_captures_of_the_same_data_agree(mlp, digits, tmp_path):
    kw = dict(projection_dim=512, seed=1)
    train = capture(mlp, digits.train, tmp_path / "train.zarr", **kw)

    # The same examples, held by a separate dataset object, captured as a "test" store: bit-identical.
    x, y = digits.train.tensors
    same = TensorDataset(x.clone(), y.clone())
    test = capture(mlp, same, tmp_path / "test.zarr", **kw)
    np.testing.assert_array_equal(test.read_grads(), train.read_grads())

    # A slice of the train data in other batches: the same rows (up to float32 summation order).
    rows = range(100, 160)
    part = capture(mlp, Subset(digits.train, rows), tmp_path / "part.zarr", batch_size=16, **kw)
    want = train.read_grads(rows.start, rows.stop)
    np.testing.assert_allclose(part.read_grads(), want, rtol=0, atol=1e-6 * np.abs(want).max())

    # They combine: a train example's influence on itself is its self-influence.
    inf = to.influence(part, train).values
    si = to.self_influence(train).values
    np.testing.assert_allclose(np.diag(inf[:, rows.start : rows.stop]), si[rows.start : rows.stop], rtol=1e-5)


def test_different_seeds_are_refused(mlp, digits, digits_test, tmp_path):
    train = capture(mlp, digits.train, tmp_path / "train.zarr", projection_dim=256, seed=0)
    test = capture(mlp, digits_test, tmp_path / "test.zarr", projection_dim=256, seed=1)
    # Same shapes, so a careless engine would happily multiply them.
    assert test.feature_dim == train.feature_dim
    assert not np.array_equal(test.read_grads(0, 10), train.read_grads(0, 10))
    with pytest.raises(to.IncompatibleStoresError, match="seed") as err:
        to.influence(test, train)
    assert "same" in str(err.value)  # says what to do: capture both with the same spec
    with pytest.raises(to.IncompatibleStoresError, match="seed"):
        to.top_k(test, train, k=5)
    with pytest.raises(to.IncompatibleStoresError, match="seed"):
        to.influence(str(tmp_path / "test.zarr"), str(tmp_path / "train.zarr"))


def test_different_projection_kinds_are_refused(mlp, digits, digits_test, tmp_path):
    train = capture(mlp, digits.train, tmp_path / "train.zarr", projection_dim=128, projection="gaussian")
    test = capture(mlp, digits_test, tmp_path / "test.zarr", projection_dim=128, projection="rademacher")
    with pytest.raises(to.IncompatibleStoresError, match="kind"):
        to.influence(test, train)
    with pytest.raises(to.IncompatibleStoresError, match="kind"):
        to.top_k(test, train, k=3)


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projected_influence_ranks_like_exact(kind, exact_influence, mlp, digits, digits_test, tmp_path):
    train = capture(mlp, digits.train, tmp_path / "train.zarr", projection_dim=DIM, projection=kind)
    test = capture(mlp, digits_test, tmp_path / "test.zarr", projection_dim=DIM, projection=kind)
    assert train.feature_dim == DIM < sum(p.numel() for p in mlp.model.parameters())
    projected = to.influence(test, train).values
    assert projected.shape == exact_influence.shape
    rho = np.array([spearmanr(exact_influence[i], projected[i]).statistic for i in range(len(projected))])
    assert np.all(np.isfinite(rho))
    assert rho.mean() >= MIN_MEAN_SPEARMAN, f"mean Spearman {rho.mean():.3f} (min {rho.min():.3f})"
    # Not trivially equal: a projection only approximates the exact scores.
    assert not np.allclose(projected, exact_influence)
