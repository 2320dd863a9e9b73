"""The linear datamodeling score: ``to.lds`` against a direct computation on real digits models.

The direct computation builds the full influence matrix, sums it per subset, and calls scipy's
``spearmanr`` per test example; ``to.lds`` never forms the matrix (subset-summed train features).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.stats import spearmanr

import trackin_ooc as to
from trackin_ooc.demo import examples
from trackin_ooc.demo.recipes import train_run
from trackin_ooc.engine.lds import MaskSource, subset_predictions_array

N_SUBSETS = 12


@dataclass(frozen=True)
class Setup:
    train: to.GradientStore
    test: to.GradientStore
    runs: xr.Dataset
    runs_path: Path
    model: torch.nn.Module
    checkpoints: list
    root: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    """The digits MLP trained by SGD on the first 300 training digits; exact stores; 12 retrainings."""
    root = tmp_path_factory.mktemp("lds")
    split = examples.digits_split()
    x, y = split.train.tensors
    xt, yt = split.test.tensors
    n, m = examples.SMALL_TRAIN, examples.SMALL_TEST
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, ckpts = train_run(examples.digits_mlp_recipe(), x[:n], y[:n], root / "ckpts")
        train = to.capture(model, ckpts, examples.digits_train_small(), root / "train.zarr", progress=False)
        test = to.capture(model, ckpts, examples.digits_test_small(), root / "test.zarr", progress=False)
    finally:
        torch.set_num_threads(previous)
    runs = to.retrain(examples.digits_retrain_small, n, n_subsets=N_SUBSETS, out=root / "runs.zarr", progress=False)
    assert runs.sizes == {"subset": N_SUBSETS, "train": n, "test": m}
    return Setup(train, test, runs, root / "runs.zarr", model, ckpts, root)


def direct_lds(test, train, runs: xr.Dataset, normalize: bool) -> np.ndarray:
    """The full influence matrix, summed per subset, Spearman per test example against minus the loss."""
    matrix = np.asarray(to.influence(test, train, normalize=normalize).values, dtype=np.float64)
    predictions = matrix @ runs["subset"].values.T.astype(np.float64)
    outputs = runs["output"].values
    return np.array([spearmanr(predictions[i], -outputs[:, i]).statistic for i in range(matrix.shape[0])])


@pytest.mark.parametrize("normalize", [False, True])
def test_lds_equals_the_direct_computation(setup, normalize):
    result = to.lds(setup.test, setup.train, setup.runs, normalize=normalize, progress=False)
    expected = direct_lds(setup.test, setup.train, setup.runs, normalize)
    assert result.dims == ("test",) and result.sizes["test"] == setup.test.n_examples
    np.testing.assert_array_equal(result["test"].values, setup.test.example_ids())
    np.testing.assert_allclose(result.values, expected, atol=1e-9)
    assert result.attrs["lds"] == pytest.approx(np.nanmean(expected), abs=1e-12)
    assert result.attrs["n_subsets"] == N_SUBSETS and result.attrs["normalize"] is normalize
    # The runs' path gives the same answer as the Dataset.
    from_path = to.lds(setup.test, setup.train, setup.runs_path, normalize=normalize, progress=False)
    np.testing.assert_allclose(from_path.values, result.values, atol=1e-12)


def test_predictions_are_subset_sums_of_influence(setup):
    pred = to.subset_predictions(setup.test, setup.train, setup.runs, progress=False)
    matrix = np.asarray(to.influence(setup.test, setup.train).values, dtype=np.float64)
    expected = matrix @ setup.runs["subset"].values.T
    assert pred.dims == ("test", "subset")
    np.testing.assert_allclose(pred.values, expected, rtol=2e-5, atol=1e-6 * np.abs(expected).max())


def test_many_train_blocks_reduce_to_the_same_sums(setup):
    # Blocks of 7 rows: 43 partial sums reduced in a tree (SPLIT_EVERY wide), masks read from the store.
    runs = to.open_runs(setup.runs_path)
    from trackin_ooc.store.runs_store import open_runs_store

    arr = subset_predictions_array(
        setup.test, setup.train, MaskSource.of(open_runs_store(setup.runs_path)), N_SUBSETS, False, train_rows=7
    )
    assert len(arr.dask) > 43 + setup.test.n_examples // setup.test.chunk_rows
    one_block = to.subset_predictions(setup.test, setup.train, runs, progress=False).values
    np.testing.assert_allclose(arr.compute(), one_block, rtol=1e-5, atol=1e-7 * np.abs(one_block).max())


def test_factor_stores_give_the_exact_lds(setup):
    kw = dict(projection="factors", progress=False)
    train = to.capture(setup.model, setup.checkpoints, examples.digits_train_small(), setup.root / "f_train.zarr", **kw)
    test = to.capture(setup.model, setup.checkpoints, examples.digits_test_small(), setup.root / "f_test.zarr", **kw)
    assert train.has_factors
    for normalize in (False, True):
        flat = to.lds(setup.test, setup.train, setup.runs, normalize=normalize, progress=False)
        factors = to.lds(test, train, setup.runs, normalize=normalize, progress=False)
        np.testing.assert_allclose(factors.values, flat.values, atol=1e-6)


def test_mismatched_runs_are_refused(setup, tmp_path):
    other = to.retrain(lambda idx, seed: np.arange(5.0) + idx.sum(), 50, n_subsets=3, progress=False)
    with pytest.raises(to.ArgumentError, match="retrain with n_train=300"):
        to.lds(setup.test, setup.train, other, progress=False)
    short = setup.runs.isel(test=slice(0, 10))
    with pytest.raises(to.ArgumentError, match="10 test losses"):
        to.lds(setup.test, setup.train, short, progress=False)
    with pytest.raises(to.ArgumentError, match="lacks output"):
        to.lds(setup.test, setup.train, setup.runs.drop_vars("output"), progress=False)
    with pytest.raises(to.StoreError, match="not a retraining output"):
        to.lds(setup.test, setup.train, setup.train.path, progress=False)
    with pytest.raises(to.StoreError, match="does not exist"):
        to.lds(setup.test, setup.train, tmp_path / "nothing.zarr", progress=False)
    with pytest.raises(to.ArgumentError, match="do not fit the memory budget"):
        to.lds(setup.test, setup.train, setup.runs, memory_limit=1000, progress=False)


def test_an_unfinished_runs_store_is_refused(setup, tmp_path):
    from trackin_ooc.retraining import subset_masks
    from trackin_ooc.store.runs_store import RunsStore

    job = {"n_train": 300, "n_subsets": 4, "fraction": 0.5, "seed": 0, "subset_size": 150}
    masks, seeds = subset_masks(300, 4, 0.5, 0)
    store = RunsStore.create(tmp_path / "part.zarr", job=job, subsets=masks, seeds=seeds, train_fn="f")
    store.write_output(0, np.ones(setup.test.n_examples))
    with pytest.raises(to.IncompleteStoreError, match=r"unfinished \(1 of 4 retrainings done\)"):
        to.lds(setup.test, setup.train, tmp_path / "part.zarr", progress=False)


def test_lds_from_predictions_matches_scipy():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(9, 20))
    out = rng.normal(size=(20, 9))
    pred[3] = 1.0  # constant predictions: undefined, as in scipy
    pred[4, :10] = pred[4, 10:]  # ties: average ranks
    got = to.lds_from_predictions(pred, out)
    with np.errstate(invalid="ignore"), pytest.warns(Warning):
        want = np.array([spearmanr(pred[i], -out[:, i]).statistic for i in range(9)])
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert np.isnan(got[3])
    with pytest.raises(to.ArgumentError, match="must be"):
        to.lds_from_predictions(pred, out[:, :5])


def test_lds_never_imports_torch(tmp_path):
    """Scoring stays torch-free: the LDS of stores made from arrays, in a fresh process."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import trackin_ooc as to

        rng = np.random.default_rng(0)
        train = to.from_arrays({str(tmp_path / "train.zarr")!r}, rng.normal(size=(2, 40, 8)), [0.1, 0.2])
        test = to.from_arrays({str(tmp_path / "test.zarr")!r}, rng.normal(size=(2, 5, 8)), [0.1, 0.2])
        runs = to.retrain(lambda idx, seed: rng.normal(size=5), 40, n_subsets=6, out={str(tmp_path / "r.zarr")!r},
                          progress=False)
        print(to.lds(test, train, {str(tmp_path / "r.zarr")!r}, progress=False).attrs["lds"])
        assert "torch" not in sys.modules, "lds imported torch"
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert -1 <= float(out.stdout.strip()) <= 1
