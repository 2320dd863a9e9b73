"""``to.retrain``: reproducible subsets, real retrainings of a digits MLP as Dask tasks, a resumable store.

The train function is the one the CLI example names (``trackin_ooc.demo.examples:digits_retrain_small``):
a 64-32-10 MLP trained by SGD on the chosen of 300 training digits, its losses on 100 test digits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import zarr

import trackin_ooc as to
from trackin_ooc.demo import examples
from trackin_ooc.retraining import run_seed, subset_indices, subset_masks
from trackin_ooc.store.runs_store import RunsStore

from .test_cli import ok, run_cli

N_TRAIN = examples.SMALL_TRAIN
N_SUBSETS = 8


class Counting:
    """A train function that counts its calls (in this process)."""

    def __init__(self, fn=examples.digits_retrain_small):
        self.fn, self.calls = fn, []

    def __call__(self, indices, seed):
        self.calls.append(int(seed))
        return self.fn(indices, seed)


@pytest.fixture(scope="module")
def reference():
    """An uninterrupted in-process run, without a store."""
    return to.retrain(examples.digits_retrain_small, N_TRAIN, n_subsets=N_SUBSETS, progress=False)


def test_subsets_follow_from_the_seed():
    masks, seeds = subset_masks(1000, 6, 0.3, 7)
    again, seeds_again = subset_masks(1000, 9, 0.3, 7)
    np.testing.assert_array_equal(masks, again[:6])  # subset s does not depend on how many there are
    np.testing.assert_array_equal(seeds, seeds_again[:6])
    assert (masks.sum(axis=1) == 300).all()
    assert len({m.tobytes() for m in masks}) == 6 and len(set(seeds.tolist())) == 6
    other, _ = subset_masks(1000, 6, 0.3, 8)
    assert not (other == masks).all(axis=1).any()
    np.testing.assert_array_equal(np.flatnonzero(masks[2]), subset_indices(1000, 300, 7, 2))
    assert seeds[2] == run_seed(7, 2) and 0 <= seeds[2] < 2**31


def test_retrain_returns_each_subsets_test_losses(reference):
    ds = reference
    assert ds["subset"].dims == ("subset", "train") and ds["subset"].dtype == bool
    assert ds["output"].dims == ("subset", "test") and ds["seed"].dims == ("subset",)
    assert ds.sizes == {"subset": N_SUBSETS, "train": N_TRAIN, "test": examples.SMALL_TEST}
    assert ds.attrs["subset_size"] == 150 and (ds["subset"].sum("train") == 150).all()
    # Each row is what the train function gives for that subset and seed, called directly.
    for s in (0, 5):
        direct = examples.digits_retrain_small(np.flatnonzero(ds["subset"].values[s]), int(ds["seed"].values[s]))
        np.testing.assert_array_equal(ds["output"].values[s], direct)
    # Different subsets train different models.
    assert np.ptp(ds["output"].values.mean(axis=1)) > 0


@pytest.fixture(scope="module")
def cluster():
    """One real worker process with two threads: two retrainings at once in one process (which must
    still give the in-process results), shared by the cluster and CLI tests."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        yield cluster


def test_retrain_on_a_local_cluster_matches_in_process(reference, cluster):
    from distributed import Client

    with Client(cluster) as client:
        ds = to.retrain(examples.digits_retrain_small, N_TRAIN, n_subsets=N_SUBSETS, client=client, progress=False)
        ran_on = client.run(lambda: "torch" in sys.modules)
    assert all(ran_on.values()), "the retrainings ran on the worker"
    np.testing.assert_array_equal(ds["subset"].values, reference["subset"].values)
    np.testing.assert_allclose(ds["output"].values, reference["output"].values, rtol=1e-12)


KILLED_RUN = textwrap.dedent("""
    import sys, time
    import trackin_ooc as to
    from trackin_ooc.demo import examples

    def slow(indices, seed):
        time.sleep(0.3)
        return examples.digits_retrain_small(indices, seed)

    to.retrain(slow, {n_train}, n_subsets={n_subsets}, out=sys.argv[1], progress=False)
""")


def test_retrain_resumes_after_a_kill(reference, tmp_path):
    out = tmp_path / "runs.zarr"
    script = KILLED_RUN.format(n_train=N_TRAIN, n_subsets=N_SUBSETS)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = int(np.asarray(zarr.open_group(str(out), mode="r")["subset_complete"][:]).sum())
            except Exception:
                done = 0
            if done >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.stderr.read().decode()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    store = RunsStore(out, read_only=True)
    done_before = int(store.done().sum())
    assert not store.complete and 2 <= done_before < N_SUBSETS
    # The rerun computes only what the killed one had not written, and ends where an uninterrupted run does.
    fn = Counting()
    ds = to.retrain(fn, N_TRAIN, n_subsets=N_SUBSETS, out=out, progress=False)
    assert len(fn.calls) == N_SUBSETS - done_before
    assert ds.attrs["complete"] is True and RunsStore(out, read_only=True).complete
    np.testing.assert_array_equal(ds["subset"].values, reference["subset"].values)
    np.testing.assert_array_equal(ds["seed"].values, reference["seed"].values)
    np.testing.assert_allclose(ds["output"].values, reference["output"].values, rtol=1e-12)
    np.testing.assert_allclose(to.open_runs(out)["output"].values, reference["output"].values, rtol=1e-12)
    # A rerun of a finished job runs nothing and returns it.
    again = Counting()
    to.retrain(again, N_TRAIN, n_subsets=N_SUBSETS, out=out, progress=False)
    assert again.calls == []


def _toy(indices, seed):
    return np.array([indices.mean(), seed % 7, 1.0])


def test_out_refusals(tmp_path):
    out = tmp_path / "runs.zarr"
    to.retrain(_toy, 40, n_subsets=4, out=out, progress=False)
    before = to.open_runs(out)
    # Other parameters: refused in one line, the store left as it was.
    for change in (dict(n_subsets=5), dict(seed=1), dict(fraction=0.25)):
        with pytest.raises(to.StoreError, match="made with other parameters") as err:
            to.retrain(_toy, 40, **{"n_subsets": 4, **change}, out=out, progress=False)
        assert "\n" not in str(err.value) and "overwrite=True" in str(err.value)
    with pytest.raises(to.StoreError, match=r"n_train=40 \(now 50\)"):
        to.retrain(_toy, 50, n_subsets=4, out=out, progress=False)
    np.testing.assert_array_equal(to.open_runs(out)["output"].values, before["output"].values)
    # overwrite=True replaces an earlier retraining output.
    ds = to.retrain(_toy, 40, n_subsets=3, seed=2, out=out, overwrite=True, progress=False)
    assert ds.sizes["subset"] == 3 and to.open_runs(out).attrs["seed"] == 2
    # Never a gradient store or a folder someone else made, with or without overwrite.
    store = to.from_arrays(tmp_path / "grads.zarr", np.ones((1, 4, 2)), [0.1])
    for overwrite in (False, True):
        with pytest.raises(to.StoreExistsError, match="gradient store"):
            to.retrain(_toy, 40, n_subsets=3, out=store.path, overwrite=overwrite, progress=False)
    assert to.open_store(store.path).complete
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(to.OutputKindError, match="no trackin-ooc writer made"):
        to.retrain(_toy, 40, n_subsets=3, out=mine, overwrite=True, progress=False)
    assert (mine / "notes.txt").read_text() == "keep"


def test_bad_arguments_and_results(tmp_path):
    for kwargs, match in ((dict(n_subsets=1), "n_subsets"), (dict(fraction=1.0), "fraction"), (dict(seed=-1), "seed")):
        with pytest.raises(to.ArgumentError, match=match):
            to.retrain(_toy, 40, **kwargs, progress=False)
    with pytest.raises(to.ArgumentError, match="train_fn must be a callable"):
        to.retrain("nope", 40, progress=False)
    with pytest.raises(to.ArgumentError, match=r"returned shape \(2, 2\)"):
        to.retrain(lambda idx, seed: np.ones((2, 2)), 40, n_subsets=2, progress=False)
    with pytest.raises(to.ArgumentError, match="non-finite loss"):
        to.retrain(lambda idx, seed: np.array([1.0, np.nan]), 40, n_subsets=2, progress=False)
    with pytest.raises(to.ArgumentError, match="the same test set"):
        to.retrain(lambda idx, seed: np.ones(2 + seed % 2), 40, n_subsets=6, progress=False)
    # A failed run keeps what finished: its store stays unfinished and resumable.
    out = tmp_path / "fails.zarr"

    def fails_on_third(idx, seed, calls=[]):  # noqa: B006 - counts calls across the run
        calls.append(seed)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return np.ones(3)

    with pytest.raises(RuntimeError, match="boom"):
        to.retrain(fails_on_third, 40, n_subsets=5, out=out, progress=False)
    store = RunsStore(out, read_only=True)
    assert not store.complete and store.done().sum() == 2
    ds = to.retrain(lambda idx, seed: np.ones(3), 40, n_subsets=5, out=out, progress=False)
    assert ds.attrs["complete"] and np.isfinite(ds["output"].values).all()


def test_cli_retrain_and_lds(tmp_path, cluster):
    """The real executable: retrain from a file's train function on a cluster (which cannot import that
    file: the function travels by value), then lds."""
    user = tmp_path / "user_retrain.py"
    user.write_text(
        "from trackin_ooc.demo.examples import digits_retrain_small\n\n\n"
        "def train(indices, seed):\n    return digits_retrain_small(indices, seed)\n"
    )
    runs = tmp_path / "runs.zarr"
    result = ok(
        run_cli(
            "--scheduler-address",
            cluster.scheduler_address,
            "retrain",
            "--train-fn",
            f"{user}:train",
            "--n-train",
            N_TRAIN,
            "--subsets",
            4,
            "--out",
            runs,
            cwd=tmp_path,
            timeout=240,
        )
    )
    assert "wrote 4 retrainings (150 of 300 training examples each, 100 test losses)" in result.stdout
    direct = to.retrain(examples.digits_retrain_small, N_TRAIN, n_subsets=4, progress=False)
    np.testing.assert_allclose(to.open_runs(runs)["output"].values, direct["output"].values, rtol=1e-12)

    # Stores from the same split and an SGD run of the same recipe, then the LDS from the command line.
    from trackin_ooc.demo.recipes import train_run

    split = examples.digits_split()
    x, y = split.train.tensors
    model, ckpts = train_run(examples.digits_mlp_recipe(), x[:N_TRAIN], y[:N_TRAIN], tmp_path / "ckpts")
    train = to.capture(model, ckpts, examples.digits_train_small(), tmp_path / "train.zarr", progress=False)
    test = to.capture(model, ckpts, examples.digits_test_small(), tmp_path / "test.zarr", progress=False)
    result = ok(
        run_cli(
            "lds",
            "--train",
            train.path,
            "--test",
            test.path,
            "--runs",
            runs,
            "--out",
            tmp_path / "lds.csv",
            cwd=tmp_path,
        )
    )
    want = to.lds(test, train, runs, progress=False)
    assert f"LDS {want.attrs['lds']:.4f} (TracIn; mean over 100 test examples" in result.stdout
    import pandas as pd

    table = pd.read_csv(tmp_path / "lds.csv")
    assert list(table.columns) == ["test", "test_label", "lds"] and len(table) == 100
    np.testing.assert_allclose(table["lds"].values, want.values, atol=1e-12)
    # Rerunning with other parameters: exit 1, one line, no traceback; the store is kept.
    bad = run_cli(
        "retrain", "--train-fn", f"{user}:train", "--n-train", N_TRAIN, "--subsets", 5, "--out", runs, cwd=tmp_path
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and "other parameters: n_subsets=4 (now 5)" in bad.stderr
    # lds with runs of another train set: exit 1, one line.
    other = run_cli("lds", "--train", test.path, "--test", test.path, "--runs", runs, cwd=tmp_path)
    assert other.returncode == 1 and "retrain with n_train=100" in other.stderr and "Traceback" not in other.stderr
