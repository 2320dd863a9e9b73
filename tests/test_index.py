"""The top-k index (build_index, top_k(index=...)): exact when every list is read, good recall on real
clustered gradients while reading a fraction of the rows, exact scores always, resumable after a kill,
stale indexes refused, and the CLI (index, top-k --index --probe) end to end."""

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
from trackin_ooc import testing as tt
from trackin_ooc.engine import ivf
from trackin_ooc.store.guard import OutputKindError, OutputOverlapsInputError

from .test_cli import cli_env, ok, run_cli

K = 10


def recall(approx, exact, side: str) -> float:
    a, b = approx[f"{side}_index"].values, exact[f"{side}_index"].values
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))


@pytest.fixture(scope="module")
def digits_stores(tmp_path_factory, flipped_mlp, flipped_digits):
    """Real gradients: the digits MLP trained on 10 % flipped labels, captured (projected to 128 dims)
    for its 1,500 training and 297 test examples."""
    root = tmp_path_factory.mktemp("index_digits")
    train = to.capture(
        flipped_mlp.model,
        flipped_mlp.checkpoints,
        flipped_digits.train,
        root / "train.zarr",
        projection_dim=128,
        progress=False,
    )
    test = to.capture(
        flipped_mlp.model,
        flipped_mlp.checkpoints,
        flipped_digits.test,
        root / "test.zarr",
        projection_dim=128,
        progress=False,
    )
    return train, test


@pytest.fixture(scope="module")
def digits_index(digits_stores):
    train, _ = digits_stores
    return to.build_index(train)


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """20,000 float16 rows in 10 classes (class centre + per-row scale + noise) and 24 test rows."""
    root = tmp_path_factory.mktemp("index_clustered")
    rng = np.random.default_rng(0)
    c, f, classes = 2, 32, 10
    centres = rng.standard_normal((classes, c, f)).astype(np.float32)

    def rows(n):
        y = rng.integers(0, classes, n)
        scale = rng.lognormal(0.0, 0.5, n).astype(np.float32)
        g = scale[None, :, None] * (centres[y].transpose(1, 0, 2) + 0.6 * rng.standard_normal((c, n, f)))
        return g.astype(np.float32), y

    g, y = rows(20_000)
    train = to.from_arrays(root / "train.zarr", g.astype(np.float16), [0.1, 0.03], labels=y, chunk_rows=2048)
    gt, yt = rows(24)
    test = to.from_arrays(root / "test.zarr", gt.astype(np.float16), [0.1, 0.03], labels=yt)
    return train, test


# ---- exactness --------------------------------------------------------------------------------------
def test_every_list_probed_equals_exact_top_k(digits_stores, digits_index):
    train, test = digits_stores
    res = to.top_k(test, train, k=K, index=digits_index, n_probe=digits_index.n_lists)
    scores = tt.reference_influence(test.read_grads(), train.read_grads(), train.learning_rates)
    tt.assert_top_k_equal(res, scores, K)
    assert res.attrs["approximate"] is True and res.attrs["fraction_read"] == 1.0
    assert to.top_k(test, train, k=K).attrs["approximate"] is False


@pytest.mark.parametrize("normalize", [False, True])
def test_small_and_large_query_blocks_equal_exact_top_k(clustered, tmp_path, monkeypatch, normalize):
    """A query block with fewer test rows than folded features (C·F = 64 here) is scored in list order and its
    columns put in train order; a larger one puts the rows in train order first. Both are exact top-k."""
    from trackin_ooc.engine import ivf_tasks

    train, _ = clustered
    idx = to.build_index(train, n_lists=16, normalize=normalize, path=tmp_path / "index.zarr")
    calls = []
    real = ivf_tasks.kernels.score_topk
    monkeypatch.setattr(ivf_tasks.kernels, "score_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    queries = train.read_grads(0, 100) * np.linspace(0.5, 2.0, 100)[None, :, None]
    for n, rows_first in ((3, False), (100, True)):
        test = to.from_arrays(
            tmp_path / f"test{n}.zarr", queries[:, :n].astype(np.float16), train.learning_rates, dtype="float16"
        )
        calls.clear()
        res = to.top_k(test, train, k=K, index=idx, n_probe=idx.n_lists, normalize=normalize, memory_limit="8GB")
        assert bool(calls) is rows_first
        want = tt.reference_influence(test.read_grads(), train.read_grads(), train.learning_rates, normalize=normalize)
        tt.assert_top_k_equal(res, want, K)


def test_scores_are_exact_for_the_ids_returned(clustered):
    train, test = clustered
    idx = to.build_index(train, n_lists=64, overwrite=True)
    res = to.top_k(test, train, k=K, index=idx, n_probe=2)
    assert res.attrs["fraction_read"] < 0.5
    full = to.influence(test, train).values.astype(np.float64)
    for side in ("proponent", "opponent"):
        got = res[f"{side}_score"].values
        want = np.take_along_axis(full, res[f"{side}_index"].values, axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(full).max())
    # Sorted best first, no repeats.
    assert (np.diff(res["proponent_score"].values, axis=1) <= 0).all()
    assert (np.diff(res["opponent_score"].values, axis=1) >= 0).all()
    assert all(len(set(r)) == K for r in res["proponent_index"].values)


def test_cosine_index(clustered):
    train, test = clustered
    idx = to.build_index(train, n_lists=32, normalize=True, overwrite=True)
    assert idx.normalize and idx.path.endswith("index_cosine")
    res = to.top_k(test, train, k=K, normalize=True, index=idx, n_probe=idx.n_lists)
    scores = tt.reference_influence(test.read_grads(), train.read_grads(), train.learning_rates, normalize=True)
    tt.assert_top_k_equal(res, scores, K)
    with pytest.raises(to.ArgumentError, match="normalize"):
        to.top_k(test, train, k=K, index=idx)  # a cosine index for dot-product queries


# ---- recall and reading less ------------------------------------------------------------------------
def test_recall_on_real_digits_gradients(digits_stores, digits_index):
    """Held-out test examples, default n_probe (calibrated for recall@10 >= 0.95 on held-out queries)."""
    train, test = digits_stores
    exact = to.top_k(test, train, k=K)
    one_by_one = [to.top_k(test.path, train, k=K, index=digits_index) for _ in range(1)][0]
    cal = digits_index.calibration["by_n_probe"][str(digits_index.n_probe)]
    assert min(cal["proponent_recall"], cal["opponent_recall"]) >= 0.95
    assert digits_index.n_probe < digits_index.n_lists
    assert recall(one_by_one, exact, "proponent") >= 0.9
    assert recall(one_by_one, exact, "opponent") >= 0.9
    # One test example at a time reads a small part of the store.
    single = test.path
    small = to.top_k(single, train, k=K, index=digits_index, memory_limit=2**20)
    assert small.attrs["rows_read"] > 0


def test_recall_and_fraction_read_on_clustered_rows(clustered, tmp_path):
    train, test = clustered
    idx = to.build_index(train, overwrite=True)
    assert idx.n_lists == round(np.sqrt(train.n_examples))
    exact = to.top_k(test, train, k=K)
    batch = to.top_k(test, train, k=K, index=idx)  # 24 test examples of 10 classes: the union of their lists
    assert batch.attrs["fraction_read"] < 0.5
    assert recall(batch, exact, "proponent") >= 0.95
    assert recall(batch, exact, "opponent") >= 0.95
    grads = test.read_grads()
    for i in range(4):  # one test example at a time reads a small part of the store
        one = to.from_arrays(tmp_path / f"one{i}.zarr", grads[:, i : i + 1], test.learning_rates, dtype="float16")
        res = to.top_k(one, train, k=K, index=idx)
        assert res.attrs["fraction_read"] < 0.1
        np.testing.assert_allclose(
            res["proponent_score"].values[0][:3], exact["proponent_score"].values[i][:3], rtol=1e-5
        )  # the strongest are found
    more = to.top_k(test, train, k=K, index=idx, n_probe=4 * idx.n_probe)
    assert more.attrs["fraction_read"] > batch.attrs["fraction_read"]
    assert recall(more, exact, "proponent") >= recall(batch, exact, "proponent")


# ---- where it lives, and when it is refused ---------------------------------------------------------
def test_saved_in_the_store_and_found_again(clustered):
    train, test = clustered
    idx = to.build_index(train, n_lists=16, overwrite=True)
    again = to.open_store(train.path)
    assert isinstance(again.index, to.TopKIndex) and again.index.path == idx.path
    assert idx.path == os.path.join(train.path, "index")
    assert to.open_index(train.path).index_id == idx.index_id
    res = to.top_k(test, train, k=K, index=True)  # the train store's own index
    assert res.attrs["index"] == idx.path
    assert again.complete and again.read_grads(0, 5).shape == (2, 5, 32)  # the store is untouched
    assert to.open_store(test.path).index is None
    with pytest.raises(to.StoreError, match="has no index; build one"):
        to.top_k(train, test, k=K, index=True)
    with pytest.raises(to.StoreExistsError, match="already exists"):
        to.build_index(train, n_lists=16)


def test_stale_index_refused(tmp_path):
    rng = np.random.default_rng(1)
    g = rng.standard_normal((1, 600, 8)).astype(np.float32)
    train = to.from_arrays(tmp_path / "train.zarr", g, [0.1])
    test = to.from_arrays(tmp_path / "test.zarr", g[:, :5], [0.1])
    idx = to.build_index(train, path=tmp_path / "kept_apart.zarr", n_lists=8)
    # isotropic rows: the default streams (no structure), an explicit n_probe reads the lists
    assert to.top_k(test, train, k=3, index=idx, n_probe=1).attrs["approximate"]
    rewritten = to.from_arrays(tmp_path / "train.zarr", g, [0.1], overwrite=True)  # same data, new store
    with pytest.raises(to.StaleIndexError, match="another version of the train store") as e:
        to.top_k(test, rewritten, k=3, index=tmp_path / "kept_apart.zarr")
    assert "\n" not in str(e.value) and "build_index(train, overwrite=True)" in str(e.value)
    other = to.from_arrays(tmp_path / "other.zarr", g, [0.1])
    with pytest.raises(to.StaleIndexError):
        to.top_k(test, other, k=3, index=idx)


def test_bad_arguments(clustered, tmp_path):
    train, test = clustered
    idx = to.build_index(train, n_lists=16, overwrite=True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(to.ArgumentError, match="n_probe"):
            to.top_k(test, train, k=K, index=idx, n_probe=bad)
    with pytest.raises(to.ArgumentError, match="n_probe needs an index"):
        to.top_k(test, train, k=K, n_probe=3)
    for bad in (0, train.n_examples + 1, 2.0):
        with pytest.raises(to.ArgumentError, match="n_lists"):
            to.build_index(train, path=tmp_path / "x.zarr", n_lists=bad)
    with pytest.raises(OutputOverlapsInputError):
        to.build_index(train, path=os.path.join(train.path, "elsewhere"))
    with pytest.raises(OutputKindError):  # never replaces a gradient store, even with overwrite
        to.build_index(train, path=test.path, overwrite=True)
    assert to.open_store(test.path).complete
    neg = to.from_arrays(tmp_path / "neg.zarr", np.ones((2, 30, 4), np.float32), [0.1, -0.1])
    with pytest.raises(to.ArgumentError, match="non-negative learning rates"):
        to.build_index(neg)


def test_damaged_index_chunk_is_named(tmp_path):
    rng = np.random.default_rng(2)
    g = rng.standard_normal((1, 3000, 16)).astype(np.float32)
    train = to.from_arrays(tmp_path / "train.zarr", g, [0.1])
    test = to.from_arrays(tmp_path / "test.zarr", g[:, :4], [0.1])
    idx = to.build_index(train, n_lists=4)
    assert idx.verify() == []
    chunk = next(p for p in (tmp_path / "train.zarr" / "index" / "grads").iterdir() if p.name.startswith("c."))
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(data)
    assert [b.array for b in to.open_index(train).verify()] == ["grads"]
    with pytest.raises(to.CorruptChunkError, match="grads"):
        to.top_k(test, train, k=3, index=True, n_probe=4)


# ---- a killed build resumes -------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import sys, dask, trackin_ooc as to
    from trackin_ooc.engine import ivf_build
    dask.config.set(scheduler="synchronous")
    ivf_build.MIN_CHUNK_BYTES, ivf_build.WINDOW_BYTES = 1, 1 << 15  # a dozen small windows: a pass 2 to kill in
    to.build_index(sys.argv[1], n_lists=40, progress=False)
    """
)


def _flags(path, name: str) -> int:
    try:
        return int(zarr.open_group(str(path), mode="r")[name][:].sum())
    except Exception:  # not laid out yet, or a flag chunk read mid-write
        return -1


def test_killed_build_resumes(tmp_path):
    rng = np.random.default_rng(3)
    g = (rng.standard_normal((2, 3000, 16)) + rng.integers(0, 5, 3000)[None, :, None]).astype(np.float32)
    train = to.from_arrays(tmp_path / "train.zarr", g, [0.2, 0.1], chunk_rows=200)
    index_path = tmp_path / "train.zarr" / "index"
    n_blocks = len(train.row_blocks())
    killed_in = []
    for flag, total in (("block_complete", n_blocks), ("window_complete", None)):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, train.path], env=cli_env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            n = total or (
                zarr.open_group(str(index_path), mode="r")["window_complete"].shape[0]
                if _flags(index_path, "window_complete") >= 0
                else 0
            )
            if n and _flags(index_path, flag) >= n // 3:
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed_in.append(flag)
        proc.wait()
        meta = zarr.open_group(str(index_path), mode="r").attrs["trackin_ooc"]
        assert meta["complete"] is False  # never sealed while parts are missing
    assert killed_in == ["block_complete", "window_complete"]
    windows = zarr.open_group(str(index_path), mode="r")["window_complete"][:]
    assert 0 < windows.sum() < windows.size  # killed in the middle of pass 2

    resumed = to.build_index(train, n_lists=40)  # the same call: resumes
    assert resumed.complete and resumed.verify() == []
    assert not (index_path / "staging").exists()
    # What the resumed build wrote is a whole, correct index: every train row once, in the list of its
    # nearest centroid, with its own features; and reading every list gives the exact top-k.
    ix = zarr.open_group(str(index_path), mode="r")
    rows, offsets = ix["train_index"][...], ix["list_offsets"][...]
    np.testing.assert_array_equal(np.sort(rows), np.arange(train.n_examples))
    centroids = ix["centroids"][...]
    lists, _ = ivf.assign(
        ivf.to_index_space(train.read_grads(), train.learning_rates, False),
        centroids,
        0.5 * (centroids * centroids).sum(1),
    )
    np.testing.assert_array_equal(lists[rows], np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)))
    np.testing.assert_array_equal(ix["grads"][...], train.read_grads()[:, rows])
    test = to.from_arrays(tmp_path / "test.zarr", g[:, :7], [0.2, 0.1])
    res = to.top_k(test, train, k=5, index=resumed, n_probe=resumed.n_lists)
    tt.assert_top_k_equal(res, tt.reference_influence(test.read_grads(), g, train.learning_rates), 5)


# ---- the CLI ----------------------------------------------------------------------------------------
def test_cli_index_and_top_k(clustered, tmp_path):
    train, test = clustered
    built = ok(run_cli("index", train.path, "--lists", "20", "--raw", "--overwrite", cwd=tmp_path))
    line = built.stdout.strip()
    assert "\n" not in line and line.startswith("indexed 20,000 train examples into 20 lists")
    assert "recall@10" in line and "--probe" in line
    idx = to.open_index(train)
    assert idx.n_lists == 20
    out = ok(
        run_cli(
            "top-k",
            "--train",
            train.path,
            "--test",
            test.path,
            "--raw",
            "--index",
            "--probe",
            "20",
            "--out",
            "top.csv",
            cwd=tmp_path,
        )
    )
    assert "20 lists per end, 100.0 % of rows read" in out.stdout
    table = tt_frame(tmp_path / "top.csv")
    exact = to.top_k(test, train, k=K)
    np.testing.assert_array_equal(table["proponent"].to_numpy().reshape(-1, K), exact["proponent_index"].values)


def tt_frame(path):
    import pandas as pd

    return pd.read_csv(path)


@pytest.mark.parametrize(
    "args, status, words",
    [
        (["index", "missing.zarr"], 1, "no gradient store"),
        (["index", "{train}", "--lists", "0"], 2, "--lists"),
        (
            ["top-k", "--train", "{train}", "--test", "{test}", "--index", "--probe", "0", "--out", "o.csv"],
            2,
            "--probe",
        ),
        (
            ["top-k", "--train", "{train}", "--test", "{test}", "--probe", "3", "--out", "o.csv"],
            2,
            "--probe needs --index",
        ),
        (["top-k", "--train", "{test}", "--test", "{test}", "--index", "--out", "o.csv"], 1, "has no cosine index"),
    ],
)
def test_cli_bad_input(clustered, tmp_path, args, status, words):
    train, test = clustered
    result = run_cli(*[a.format(train=train.path, test=test.path) for a in args], cwd=tmp_path)
    assert result.returncode == status, result.stderr
    assert words in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "o.csv").exists()


def test_factor_stores_refused(mlp, digits_test, tmp_path):
    """Per-layer factors (projection="factors") are not one feature matrix: refused in one line, before any work."""
    factors = to.capture(
        mlp.model, mlp.checkpoints, digits_test, tmp_path / "factors.zarr", projection="factors", progress=False
    )
    assert factors.has_factors
    for call in (lambda: to.build_index(factors), lambda: to.net_influence(factors, factors)):
        with pytest.raises(to.ArgumentError, match="per-layer factors") as e:
            call()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "factors.zarr" / "index").exists()


def test_local_chunk_reads_equal_zarr(clustered):
    """Queries read local index chunks as files (checksums checked): the same rows as zarr's own reading."""
    train, _ = clustered
    idx = to.build_index(train, n_lists=16, overwrite=True)
    rows = np.sort(np.random.default_rng(4).choice(train.n_examples, 3000, replace=False))
    assert idx._plain_local_chunks("grads") and idx._plain_local_chunks("train_index")
    raw, ids = idx.read_raw_rows(rows)
    np.testing.assert_array_equal(raw, idx._oindex("grads", rows, 3))
    np.testing.assert_array_equal(ids, idx._oindex("train_index", rows, 1))
    np.testing.assert_array_equal(raw, train.read_grads()[:, ids].astype(np.float16))


def test_on_a_local_cluster(tmp_path):
    """Build, query and net influence as tasks on two worker processes: the same results as in-process."""
    from . import two_worker_client

    rng = np.random.default_rng(5)
    g = (rng.standard_normal((2, 5000, 16)) + 3 * rng.integers(0, 4, 5000)[None, :, None]).astype(np.float32)
    train = to.from_arrays(tmp_path / "train.zarr", g, [0.2, 0.1], chunk_rows=1000)
    test = to.from_arrays(tmp_path / "test.zarr", g[:, :9] + 0.1, [0.2, 0.1])
    local = to.build_index(train, path=tmp_path / "local.zarr", n_lists=30)
    with two_worker_client() as client:
        idx = to.build_index(train, n_lists=30, client=client)
        res = to.top_k(test, train, k=K, index=idx, client=client)
        net = to.net_influence(test, train, client=client)
    zl, zc = zarr.open_group(local.path, mode="r"), zarr.open_group(idx.path, mode="r")
    for name in ("grads", "train_index", "list_offsets"):
        np.testing.assert_array_equal(zl[name][...], zc[name][...], err_msg=name)
    want = to.top_k(test, train, k=K, index=local)
    np.testing.assert_array_equal(res["proponent_index"].values, want["proponent_index"].values)
    np.testing.assert_allclose(net.values, to.net_influence(test, train).values, rtol=1e-12)


# ---- defaults that hold on stores nobody tuned them on (the family of benchmarks/sweep_index.py) ----------
def _sweep():
    import importlib.util

    if "sweep_index" in sys.modules:
        return sys.modules["sweep_index"]
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "sweep_index.py")
    spec = importlib.util.spec_from_file_location("sweep_index", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sweep_index"] = module  # before running it: its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SWEEP_STORES = [  # rows, checkpoints, features, clusters, noise, norm spread σ, cosine, seed
    (60_000, 2, 48, 40, 0.3, 1.0, False, 11),
    (60_000, 1, 128, 25, 0.4, 1.5, False, 12),
    (100_000, 1, 96, 500, 0.25, 0.5, True, 15),
]


@pytest.mark.parametrize("store", SWEEP_STORES, ids=lambda s: f"{s[3]}clusters-sigma{s[5]}-{'cos' if s[6] else 'dot'}")
def test_defaults_hold_on_sweep_stores(store, tmp_path):
    """Default build and query (nothing tuned): recall@10 >= 0.95 at both ends on held-out test examples of
    the same family, counting only what each example's own lists hold, and one test example reads <= 5 %."""
    sw = _sweep()
    case = sw.Case(*store)
    train = sw.write_store(tmp_path / "train.zarr", case, case.rows, row_seed=1, chunk_rows=8192)
    test = sw.write_store(tmp_path / "test.zarr", case, 256, row_seed=2)  # 256: recall within about ±0.01
    idx = to.build_index(train, normalize=case.cosine)
    assert idx.structured and "reach recall@10" in idx.verdict
    sizes = idx.list_sizes()
    assert sizes.max() <= 4 * sizes.mean()  # balanced lists (within 2x the mean on the sample)
    exact = to.top_k(test, train, k=K, normalize=case.cosine)
    own_recall, own_read = sw.own_lists(idx, test, exact)
    assert own_recall >= 0.95 and own_read <= 0.05
    calls = [
        to.from_arrays(tmp_path / f"call{i}.zarr", test.read_grads(i, i + 16), test.learning_rates, dtype="float16")
        for i in range(0, 64, 16)
    ]  # calls of 16 test examples
    batch = [to.top_k(c, train, k=K, normalize=case.cosine, index=idx) for c in calls]
    for side in ("proponent", "opponent"):
        got = np.concatenate([b[f"{side}_index"].values for b in batch])
        assert sw.recall(got, exact[f"{side}_index"].values[:64]) >= 0.95
    # what a call with one test example reads is what its own lists hold (the figure averaged above)
    one = to.from_arrays(tmp_path / "one.zarr", test.read_grads(0, 1), test.learning_rates, dtype="float16")
    q = ivf.to_index_space(one.read_grads(), one.learning_rates, case.cosine)
    own = idx.list_sizes()[ivf.probe(q, idx.quantizer(), idx.rules(), K)].sum() / train.n_examples
    assert to.top_k(one, train, k=K, normalize=case.cosine, index=idx).attrs["fraction_read"] == pytest.approx(own)


@pytest.mark.parametrize("normalize", [False, True])
def test_unstructured_store_streams(tmp_path, caplog, normalize):
    """Isotropic Gaussian rows: build_index says so in one line and records it; top_k(index=) is exact top-k."""
    sw = _sweep()
    case = sw.Case(20_000, 2, 32, 0, 0.0, 0.0, normalize, 21)  # isotropic rows of one norm
    train = sw.write_store(tmp_path / "train.zarr", case, case.rows, row_seed=1, chunk_rows=4096)
    test = sw.write_store(tmp_path / "test.zarr", case, 8, row_seed=2)
    with caplog.at_level("WARNING", logger="trackin_ooc"):
        idx = to.build_index(train, normalize=normalize)
    said = [r.getMessage() for r in caplog.records if "no structure" in r.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and "streams exact top-k" in said[0]
    assert not idx.structured and idx.verdict in said[0]
    assert not to.open_index(train, normalize=normalize).structured  # recorded in the index
    got = to.top_k(test, train, k=K, normalize=normalize, index=idx)
    want = to.top_k(test, train, k=K, normalize=normalize)
    for name in ("proponent_index", "proponent_score", "opponent_index", "opponent_score"):
        np.testing.assert_array_equal(got[name].values, want[name].values)
    assert got.attrs["streamed"] and got.attrs["fraction_read"] == 1.0 and got.attrs["approximate"] is False


def test_old_index_version_refused(tmp_path):
    rng = np.random.default_rng(6)
    g = rng.standard_normal((1, 2000, 8)).astype(np.float32)
    train = to.from_arrays(tmp_path / "train.zarr", g, [0.1])
    to.build_index(train, n_lists=8)
    group = zarr.open_group(str(tmp_path / "train.zarr" / "index"), mode="r+")
    meta = dict(group.attrs["trackin_ooc"], format_version=1)
    group.attrs["trackin_ooc"] = meta
    with pytest.raises(to.StoreError, match="format version 1") as e:
        to.top_k(train, train, k=3, index=True)
    assert "\n" not in str(e.value) and "rebuild it" in str(e.value)
