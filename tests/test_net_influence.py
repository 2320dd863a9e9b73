"""net_influence: influence summed over a test set (per test label), equal to the summed influence
matrix, on real digits gradients; bad input; the CLI's net-influence command end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import trackin_ooc as to
from trackin_ooc import testing as tt

from .test_cli import ok, run_cli

RTOL = 1e-5


@pytest.fixture(scope="module")
def stores(tmp_path_factory, mlp, digits, digits_test):
    """The digits MLP's gradients (3 checkpoints, projected to 96 dims) for 500 train and 60 test examples."""
    root = tmp_path_factory.mktemp("net")
    train = to.capture(mlp.model, mlp.checkpoints, digits.train, root / "train.zarr", projection_dim=96, progress=False)
    test = to.capture(mlp.model, mlp.checkpoints, digits_test, root / "test.zarr", projection_dim=96, progress=False)
    return train, test


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    """Within RTOL of each value, or of the largest magnitude for values near zero (sums cancel)."""
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


@pytest.mark.parametrize("normalize", [False, True])
def test_equals_the_summed_matrix(stores, normalize):
    train, test = stores
    net = to.net_influence(test, train, normalize=normalize)
    assert net.dims == ("train",) and net.sizes["train"] == train.n_examples
    np.testing.assert_array_equal(net["train"].values, train.example_ids())
    np.testing.assert_array_equal(net["label"].values, train.labels())
    ref = tt.reference_influence(test.read_grads(), train.read_grads(), train.learning_rates, normalize=normalize)
    assert_close(net.values, ref.sum(axis=0))
    assert_close(net.values, to.influence(test, train, normalize=normalize).sum("test").values.astype(np.float64))
    assert net.attrs["normalize"] is normalize and net.attrs["n_test"] == test.n_examples


def test_per_test_label(stores):
    train, test = stores
    net = to.net_influence(test, train, by="label")
    labels = test.labels()
    assert net.dims == ("group", "train")
    np.testing.assert_array_equal(net["group"].values, np.unique(labels))
    np.testing.assert_array_equal(net["n_test"].values, np.bincount(labels))
    matrix = to.influence(test, train).assign_coords(test_label=("test", labels))
    summed = matrix.groupby("test_label").sum("test")
    assert_close(net.values, summed.values.astype(np.float64))
    # Any grouping works; the groups add up to the whole.
    halves = np.where(np.arange(test.n_examples) < 20, "first", "rest")
    by_half = to.net_influence(test, train, by=halves)
    assert list(by_half["group"].values) == ["first", "rest"]
    assert_close(by_half.sum("group").values, to.net_influence(test, train).values)


def test_lazy_until_asked(stores):
    train, test = stores
    with tt.count_tasks() as counter:
        lazy = to.net_influence(test, train, compute_now=False)
    assert counter.tasks == 0
    tt.assert_lazy(lazy)
    np.testing.assert_allclose(lazy.values, to.net_influence(test, train).values, rtol=1e-12)


def test_a_helpful_example_helps(stores):
    """Sign: a train example counted twice in the test set adds its own (positive) self-influence."""
    train, _ = stores
    net = to.net_influence(train, train).values
    si = to.self_influence(train).values
    assert np.corrcoef(net, si)[0, 1] > 0  # what pushes its own loss down the most tends to help the set
    assert (net > 0).mean() > 0.5  # trained on the same data: most examples help the training set


def test_bad_input(stores, tmp_path):
    train, test = stores
    with pytest.raises(to.ArgumentError, match="one group per test example"):
        to.net_influence(test, train, by=[0, 1, 2])
    with pytest.raises(to.ArgumentError, match="by must be"):
        to.net_influence(test, train, by="colour")
    unlabelled = to.from_arrays(tmp_path / "nolabels.zarr", test.read_grads(), test.learning_rates)
    same_space = to.from_arrays(tmp_path / "train.zarr", train.read_grads(), train.learning_rates)
    with pytest.raises(to.ArgumentError, match="needs test labels"):
        to.net_influence(unlabelled, same_space, by="label")
    other = to.from_arrays(tmp_path / "other.zarr", np.ones((1, 5, 4), np.float32), [0.1])
    with pytest.raises(to.IncompatibleStoresError):
        to.net_influence(other, train)


def test_cli(stores, tmp_path):
    train, test = stores
    by_label = ok(
        run_cli(
            "net-influence", "--train", train.path, "--test", test.path, "--by-label", "--out", "net.csv", cwd=tmp_path
        )
    )
    assert by_label.stdout.strip() == (
        f"wrote the net influence of 500 train examples on 60 test examples per label (10 labels) to "
        f"{tmp_path / 'net.csv'} in {by_label.stdout.split(' in ')[-1].strip()}"
    )
    net = to.net_influence(test, train, by="label")
    table = pd.read_csv(tmp_path / "net.csv")
    assert list(table.columns) == ["test_label", "rank", "train", "label", "net_influence"]
    assert len(table) == net.size
    threes = table[table["test_label"] == 3].sort_values("rank")
    want = net.sel(group=3).sortby(net.sel(group=3), ascending=False)
    np.testing.assert_array_equal(threes["train"].values, want["train"].values)
    np.testing.assert_allclose(threes["net_influence"].values, want.values, rtol=1e-6)  # float32 through text
    np.testing.assert_array_equal(threes["label"].values, want["label"].values)

    ok(run_cli("net-influence", "--train", train.path, "--test", test.path, "--out", "net.zarr", cwd=tmp_path))
    ds = xr.open_zarr(tmp_path / "net.zarr").load()
    assert ds["net_influence"].dims == ("train",) and ds["rank"].values.min() == 1
    np.testing.assert_array_equal(ds["net_influence"].values, to.net_influence(test, train).values)

    into_store = run_cli(
        "net-influence", "--train", train.path, "--test", test.path, "--out", f"{train.path}/net.csv", cwd=tmp_path
    )
    assert into_store.returncode == 1 and "inside the input store" in into_store.stderr
    assert len(into_store.stderr.strip().splitlines()) == 1 and "Traceback" not in into_store.stderr
