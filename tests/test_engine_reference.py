"""The out-of-core engine against a plain NumPy (float64) reference: influence, self-influence, top-k."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import trackin_ooc as to
from trackin_ooc import testing as tt
from trackin_ooc.engine import resources
from trackin_ooc.engine.planning import worker_bytes
from trackin_ooc.spec import ProjectionSpec
from trackin_ooc.store import layout
from trackin_ooc.store.rows import RowBlock

DTYPES = ("float32", "float16", "bfloat16")
HSETTINGS = settings(max_examples=25, deadline=None)
_counter = itertools.count()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine")


def fresh(workdir, name: str) -> str:
    return str(workdir / f"{name}-{next(_counter)}.zarr")


def budget(test: to.GradientStore, train: to.GradientStore, test_rows: int, train_rows: int, k: int = 0) -> int:
    """A memory_limit that holds exactly ``test_rows`` × ``train_rows`` blocks under the local scheduler."""
    width = train.n_checkpoints * train.feature_dim
    return worker_bytes(test_rows, train_rows, width, layout.itemsize(train.dtype), resources.detect().threads, k)


@st.composite
def pairs(draw, max_test: int = 24, max_train: int = 48):
    """A (test, train) problem: shapes, chunking, dtype and learning rates."""
    n_ckpt = draw(st.integers(1, 3))
    n_test = draw(st.integers(1, max_test))
    n_train = draw(st.integers(1, max_train))
    return dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        n_ckpt=n_ckpt,
        feat=draw(st.integers(1, 12)),
        n_test=n_test,
        n_train=n_train,
        test_chunk=draw(st.integers(1, n_test)),
        train_chunk=draw(st.integers(1, n_train)),
        dtype=draw(st.sampled_from(DTYPES)),
        lrs=draw(st.lists(st.floats(0.01, 3.0), min_size=n_ckpt, max_size=n_ckpt)),
        normalize=draw(st.booleans()),
    )


def build(workdir, p: dict, *, test_ids=None) -> tuple[to.GradientStore, to.GradientStore]:
    rng = np.random.default_rng(p["seed"])
    te_g = rng.standard_normal((p["n_ckpt"], p["n_test"], p["feat"])).astype(np.float32)
    tr_g = rng.standard_normal((p["n_ckpt"], p["n_train"], p["feat"])).astype(np.float32)
    te = to.from_arrays(
        fresh(workdir, "test"), te_g, p["lrs"], chunk_rows=p["test_chunk"], dtype=p["dtype"], example_ids=test_ids
    )
    tr = to.from_arrays(fresh(workdir, "train"), tr_g, p["lrs"], chunk_rows=p["train_chunk"], dtype=p["dtype"])
    return te, tr


def reference(te: to.GradientStore, tr: to.GradientStore, normalize: bool) -> np.ndarray:
    """The reference on the values as stored (decoded float16/bfloat16), not the float32 inputs."""
    return tt.reference_influence(te.read_grads(), tr.read_grads(), tr.learning_rates, normalize=normalize)


# ---- influence --------------------------------------------------------------------------------------
@HSETTINGS
@given(p=pairs(), small=st.booleans(), rows=st.tuples(st.integers(1, 4), st.integers(1, 8)))
def test_influence_matches_reference(workdir, p, small, rows):
    te, tr = build(workdir, p)
    limit = budget(te, tr, *rows) if small else None
    res = to.influence(te, tr, normalize=p["normalize"], memory_limit=limit)
    tt.assert_influence_equal(res, reference(te, tr, p["normalize"]), lazy=True)
    np.testing.assert_array_equal(res["test"].values, np.arange(p["n_test"]))
    np.testing.assert_array_equal(res["train"].values, np.arange(p["n_train"]))
    assert res.attrs["normalize"] is p["normalize"]
    if small:
        plan = to.plan_for(te, tr, memory_limit=limit)
        assert plan.estimated_bytes <= limit
        assert res.data.numblocks == (-(-p["n_test"] // plan.test_rows), -(-p["n_train"] // plan.train_rows))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_influence_many_blocks_each_dtype(workdir, dtype, normalize):
    p = dict(
        seed=7,
        n_ckpt=3,
        feat=10,
        n_test=23,
        n_train=41,
        test_chunk=5,
        train_chunk=6,
        dtype=dtype,
        lrs=[0.5, 0.125, 1.5],
        normalize=normalize,
    )
    te, tr = build(workdir, p)
    limit = budget(te, tr, 3, 6)
    plan = to.plan_for(te, tr, memory_limit=limit)
    assert len(plan.test_blocks(te.n_examples)) > 1 and len(plan.train_blocks(tr.n_examples)) > 1
    res = to.influence(te, tr, normalize=normalize, memory_limit=limit)
    tt.assert_influence_equal(res, reference(te, tr, normalize), lazy=True)


def test_influence_single_checkpoint(workdir):
    p = dict(
        seed=3,
        n_ckpt=1,
        feat=16,
        n_test=9,
        n_train=30,
        test_chunk=4,
        train_chunk=7,
        dtype="float32",
        lrs=[0.3],
        normalize=False,
    )
    te, tr = build(workdir, p)
    expected = 0.3 * te.read_grads()[0].astype(np.float64) @ tr.read_grads()[0].astype(np.float64).T
    res = to.influence(te, tr)
    tt.assert_influence_equal(res, expected, lazy=True)
    tt.assert_influence_equal(to.influence(te, tr, normalize=True), reference(te, tr, True))


def test_stored_low_precision_values_are_what_is_scored(workdir):
    """The reference must use decoded stored values: float16/bfloat16 rounding is visible in the scores."""
    p = dict(
        seed=11,
        n_ckpt=2,
        feat=12,
        n_test=6,
        n_train=10,
        test_chunk=6,
        train_chunk=10,
        dtype="bfloat16",
        lrs=[1.0, 1.0],
        normalize=False,
    )
    te, tr = build(workdir, p)
    rng = np.random.default_rng(11)
    te_f32 = rng.standard_normal((2, 6, 12)).astype(np.float32)
    tr_f32 = rng.standard_normal((2, 10, 12)).astype(np.float32)
    np.testing.assert_array_equal(layout.encode(te_f32, "bfloat16"), layout.encode(te.read_grads(), "bfloat16"))
    assert not np.array_equal(te_f32, te.read_grads())  # rounding happened
    res = to.influence(te, tr).values
    tt.assert_influence_equal(to.influence(te, tr), reference(te, tr, False), rtol=1e-6)
    unrounded = tt.reference_influence(te_f32, tr_f32, [1.0, 1.0])
    assert np.abs(res - unrounded).max() > 1e-3 * np.abs(unrounded).max()


@pytest.mark.parametrize("normalize", [False, True])
def test_influence_out_zarr(workdir, normalize):
    p = dict(
        seed=5,
        n_ckpt=2,
        feat=8,
        n_test=13,
        n_train=29,
        test_chunk=4,
        train_chunk=5,
        dtype="float16",
        lrs=[0.25, 0.75],
        normalize=normalize,
    )
    ids = 1000 + 3 * np.arange(13)
    te, tr = build(workdir, p, test_ids=ids)
    limit = budget(te, tr, 4, 5)
    out = fresh(workdir, "influence")
    res = to.influence(te, tr, out=out, normalize=normalize, memory_limit=limit)
    expected = reference(te, tr, normalize)
    tt.assert_influence_equal(res, expected, lazy=True)  # lazily read back from the Zarr output
    for key, value in (
        ("test_fingerprint", te.fingerprint),
        ("train_fingerprint", tr.fingerprint),
        ("normalize", normalize),
        ("complete", True),
    ):
        assert res.attrs[key] == value, key
    np.testing.assert_array_equal(res["test"].values, ids)

    ds = xr.open_zarr(out, consolidated=None)
    da = ds["influence"]
    assert da.dims == ("test", "train") and da.dtype == np.float32
    np.testing.assert_array_equal(ds["test"].values, ids)
    np.testing.assert_array_equal(ds["train"].values, np.arange(29))
    meta = ds.attrs[layout.ATTRS_KEY]
    assert meta["test_fingerprint"] == te.fingerprint and meta["train_fingerprint"] == tr.fingerprint
    assert meta["test_store_id"] == te.store_id and meta["train_store_id"] == tr.store_id
    assert meta["complete"] is True
    np.testing.assert_allclose(da.values, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert ds["task_complete"].values.all()
    plan = to.plan_for(te, tr, memory_limit=limit)
    assert da.encoding["chunks"] == (plan.test_rows, plan.train_rows)


def test_influence_out_refuses_existing_output(workdir):
    p = dict(
        seed=9,
        n_ckpt=1,
        feat=4,
        n_test=5,
        n_train=7,
        test_chunk=5,
        train_chunk=7,
        dtype="float32",
        lrs=[1.0],
        normalize=False,
    )
    te, tr = build(workdir, p)
    out = fresh(workdir, "influence")
    first = to.influence(te, tr, out=out).values
    with pytest.raises(to.StoreExistsError, match="overwrite"):
        to.influence(te, tr, out=out, normalize=True)
    # The refusal left the first output intact.
    np.testing.assert_array_equal(xr.open_zarr(out)["influence"].values, first)
    again = to.influence(te, tr, out=out, normalize=True, overwrite=True)
    tt.assert_influence_equal(again, reference(te, tr, True))
    # A plain existing directory is refused too.
    other = workdir / "not-an-output"
    other.mkdir()
    with pytest.raises(to.StoreExistsError):
        to.influence(te, tr, out=str(other))


def test_influence_out_resumes_an_interrupted_job(workdir):
    """An unfinished output of the same job is finished (only its missing blocks are computed); an
    unfinished output of another job is refused like any existing path."""
    import zarr

    p = dict(
        seed=13,
        n_ckpt=2,
        feat=6,
        n_test=14,
        n_train=31,
        test_chunk=4,
        train_chunk=8,
        dtype="float32",
        lrs=[0.5, 1.0],
        normalize=False,
    )
    te, tr = build(workdir, p)
    out = fresh(workdir, "influence")
    first = to.influence(te, tr, out=out, memory_limit=budget(te, tr, 4, 8)).values
    group = zarr.open_group(out, mode="r+", use_consolidated=False)
    done, inf = group["task_complete"], group["influence"]
    assert done.shape[0] > 1 and done.shape[1] > 1
    rows, cols = inf.chunks
    lost = [(0, 1), (done.shape[0] - 1, 0)]
    for i, j in lost:  # as if the run died before these two blocks were written
        done[i, j] = 0
        inf[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = np.nan
    group.attrs[layout.ATTRS_KEY] = dict(group.attrs[layout.ATTRS_KEY], complete=False)

    with pytest.raises(to.StoreExistsError):
        to.influence(te, tr, out=out, normalize=True)  # another job
    with tt.count_tasks() as run:
        res = to.influence(te, tr, out=out)  # same job, default budget: the stored blocks still apply
    writes = [key for key in run.keys if "influence-write" in str(key[0] if isinstance(key, tuple) else key)]
    assert sorted(key[1:] for key in writes) == sorted(lost)
    assert res.attrs["complete"] is True
    np.testing.assert_array_equal(res.values, first)
    tt.assert_influence_equal(res, reference(te, tr, False))


# ---- self-influence ----------------------------------------------------------------------------------
@HSETTINGS
@given(p=pairs(max_test=2), lazy=st.booleans())
def test_self_influence_matches_reference(workdir, p, lazy):
    _, tr = build(workdir, p)
    res = to.self_influence(tr, compute_now=not lazy)
    if lazy:
        tt.assert_lazy(res)
    expected = tt.reference_self_influence(tr.read_grads(), tr.learning_rates)
    tt.assert_self_influence_equal(res, expected)
    np.testing.assert_array_equal(res["example"].values, np.arange(p["n_train"]))
    assert res.attrs["fingerprint"] == tr.fingerprint
    # Self-influence is the diagonal of the influence of a store with itself.
    diag = np.diagonal(reference(tr, tr, False))
    np.testing.assert_allclose(res.values, diag, rtol=1e-5)


def test_self_influence_keeps_labels_and_ids(workdir):
    rng = np.random.default_rng(1)
    g = rng.standard_normal((2, 17, 5)).astype(np.float32)
    labels = rng.integers(0, 10, 17)
    ids = np.arange(17)[::-1] * 2
    st_ = to.from_arrays(fresh(workdir, "labelled"), g, [0.1, 0.9], labels=labels, example_ids=ids, chunk_rows=4)
    res = to.self_influence(st_.path)  # a path works as well as a store
    np.testing.assert_array_equal(res["example"].values, ids)
    np.testing.assert_array_equal(res["label"].values, labels)
    tt.assert_self_influence_equal(res, tt.reference_self_influence(g, [0.1, 0.9]))


# ---- top-k -------------------------------------------------------------------------------------------
@HSETTINGS
@given(p=pairs(), data=st.data(), small=st.booleans())
def test_top_k_matches_reference(workdir, p, data, small):
    te, tr = build(workdir, p)
    k = data.draw(st.integers(1, p["n_train"]), label="k")
    limit = None
    if small:
        rows = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 8)), label="rows")
        limit = budget(te, tr, *rows, k=k)
    res = to.top_k(te, tr, k=k, normalize=p["normalize"], memory_limit=limit)
    tt.assert_top_k_equal(res, reference(te, tr, p["normalize"]), k)
    assert res.attrs["k"] == k
    np.testing.assert_array_equal(res["rank"].values, np.arange(1, k + 1))
    np.testing.assert_array_equal(res["test"].values, np.arange(p["n_test"]))


@settings(max_examples=25, deadline=None)
@given(p=pairs(max_test=8, max_train=60), data=st.data())
def test_top_k_larger_than_a_train_block(workdir, p, data):
    """k spans several train blocks: partial results shorter than k must merge exactly."""
    p = dict(p, n_train=max(p["n_train"], 6), train_chunk=min(p["train_chunk"], 3))
    te, tr = build(workdir, p)
    k = data.draw(st.integers(3, p["n_train"]), label="k")
    b = data.draw(st.integers(1, min(k - 1, 8)), label="train_rows")
    limit = budget(te, tr, 1, b, k=k)
    plan = to.plan_for(te, tr, memory_limit=limit, k=k)
    assert plan.train_rows < k
    assert len(plan.train_blocks(tr.n_examples)) >= 2
    res = to.top_k(te, tr, k=k, normalize=p["normalize"], memory_limit=limit)
    tt.assert_top_k_equal(res, reference(te, tr, p["normalize"]), k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_k_equals_n_train_is_a_full_sort(workdir, dtype):
    p = dict(
        seed=21,
        n_ckpt=2,
        feat=6,
        n_test=7,
        n_train=19,
        test_chunk=3,
        train_chunk=4,
        dtype=dtype,
        lrs=[1.0, 0.5],
        normalize=False,
    )
    te, tr = build(workdir, p)
    scores = reference(te, tr, False)
    res = to.top_k(te, tr, k=19, memory_limit=budget(te, tr, 2, 4, k=19))
    tt.assert_top_k_equal(res, scores, 19)
    # Every train example appears once on each side, opponents in the reverse order of proponents.
    for name in ("proponent_index", "opponent_index"):
        np.testing.assert_array_equal(np.sort(res[name].values, axis=1), np.tile(np.arange(19), (7, 1)))


@pytest.mark.parametrize("small", [False, True])
def test_top_k_ties_go_to_the_lower_index(workdir, small):
    """Duplicate train rows give exactly equal scores (small integers are exact in float32)."""
    rng = np.random.default_rng(4)
    distinct = rng.integers(-2, 3, size=(2, 4, 6)).astype(np.float32)
    pattern = rng.integers(0, 4, size=40)
    train = distinct[:, pattern, :]
    test = rng.integers(-2, 3, size=(2, 9, 6)).astype(np.float32)
    lrs = [0.5, 2.0]
    te = to.from_arrays(fresh(workdir, "tie-test"), test, lrs, chunk_rows=4)
    tr = to.from_arrays(fresh(workdir, "tie-train"), train, lrs, chunk_rows=3)
    k = 12  # more than one duplicate group, so the order within groups matters
    limit = budget(te, tr, 2, 3, k=k) if small else None
    if small:
        assert to.plan_for(te, tr, memory_limit=limit, k=k).train_rows < k
    res = to.top_k(te, tr, k=k, memory_limit=limit)
    scores = tt.reference_influence(test, train, lrs)
    ref = tt.reference_top_k(scores, k)
    for name in tt.TOP_K_VARS:
        np.testing.assert_array_equal(res[name].values, ref[name].values, err_msg=name)
    # Spelled out: among equal proponent scores the indices ascend.
    s, i = res["proponent_score"].values, res["proponent_index"].values
    tied = np.diff(s, axis=1) == 0
    assert tied.any()
    assert (np.diff(i, axis=1)[tied] > 0).all()


def test_top_k_rejects_bad_k(workdir):
    p = dict(
        seed=2,
        n_ckpt=1,
        feat=3,
        n_test=4,
        n_train=6,
        test_chunk=4,
        train_chunk=6,
        dtype="float32",
        lrs=[1.0],
        normalize=False,
    )
    te, tr = build(workdir, p)
    with pytest.raises(ValueError, match="k=7"):
        to.top_k(te, tr, k=7)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(to.ArgumentError):
            to.top_k(te, tr, k=bad)
    assert to.top_k(te, tr, k=6)["proponent_index"].shape == (4, 6)


# ---- stores the engine must refuse ---------------------------------------------------------------------
def _incomplete(workdir, write_first: bool) -> to.GradientStore:
    store = to.GradientStore.create(
        fresh(workdir, "incomplete"),
        n_checkpoints=1,
        n_examples=10,
        spec=ProjectionSpec("external", 4),
        learning_rates=[1.0],
        chunk_rows=4,
    )
    if write_first:
        store.write_block(0, RowBlock(np.ones((1, 4, 4), np.float32)))
    return store


@pytest.mark.parametrize("write_first", [False, True])
def test_incomplete_store_is_refused(workdir, write_first):
    inc = _incomplete(workdir, write_first)
    good = to.from_arrays(fresh(workdir, "good"), np.ones((1, 10, 4), np.float32), [1.0])
    for call in (
        lambda: to.influence(inc, good),
        lambda: to.influence(good, inc.path),
        lambda: to.influence(good, inc, out=fresh(workdir, "never")),
        lambda: to.top_k(inc.path, good, k=2),
        lambda: to.top_k(good, inc, k=2),
        lambda: to.self_influence(inc),
        lambda: to.self_influence(inc.path, compute_now=False),
    ):
        with pytest.raises(to.IncompleteStoreError, match="incomplete"):
            call()


def test_incompatible_stores_are_refused(workdir):
    a = to.from_arrays(fresh(workdir, "a"), np.ones((2, 5, 4), np.float32), [1.0, 0.5])
    wider = to.from_arrays(fresh(workdir, "b"), np.ones((2, 5, 3), np.float32), [1.0, 0.5])
    other_lrs = to.from_arrays(fresh(workdir, "c"), np.ones((2, 5, 4), np.float32), [1.0, 0.25])
    for other in (wider, other_lrs):
        with pytest.raises(to.IncompatibleStoresError):
            to.influence(a, other)
        with pytest.raises(to.IncompatibleStoresError):
            to.top_k(other, a, k=1)


# ---- the testing helpers themselves (they must be able to fail) ---------------------------------------
def test_reference_influence_is_tracin():
    rng = np.random.default_rng(0)
    a, b, lrs = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4)), [0.5, 2.0]
    brute = np.array([[sum(lrs[c] * a[c, i] @ b[c, j] for c in range(2)) for j in range(5)] for i in range(3)])
    np.testing.assert_allclose(tt.reference_influence(a, b, lrs), brute, rtol=1e-12)
    cos = tt.reference_influence(a, a, lrs, normalize=True)
    np.testing.assert_allclose(np.diagonal(cos), sum(lrs), rtol=1e-12)
    assert (np.abs(cos) <= sum(lrs) + 1e-12).all()
    np.testing.assert_allclose(
        tt.reference_self_influence(b, lrs), np.diagonal(tt.reference_influence(b, b, lrs)), rtol=1e-12
    )
    with pytest.raises(ValueError):
        tt.reference_influence(a, b, [1.0])


def test_reference_top_k_breaks_ties_by_index():
    ref = tt.reference_top_k(np.array([[1.0, 3.0, 3.0, 0.0, 0.0]]), 3)
    assert ref["proponent_index"].values.tolist() == [[1, 2, 0]]
    assert ref["opponent_index"].values.tolist() == [[3, 4, 0]]
    assert ref["opponent_score"].values.tolist() == [[0.0, 0.0, 1.0]]
    with pytest.raises(ValueError):
        tt.reference_top_k(np.zeros((2, 3)), 4)


def _as_engine(ref: xr.Dataset) -> xr.Dataset:
    ds = ref.copy(deep=True)
    for name in ("proponent_score", "opponent_score"):
        ds[name] = ds[name].astype(np.float32)
    return ds


@pytest.mark.parametrize("mutation", ["swap_index", "swap_both", "other_index", "score", "repeat", "tie_order"])
def test_assert_top_k_equal_catches_mistakes(mutation):
    scores = np.random.default_rng(1).standard_normal((4, 12))
    scores[2, [3, 7]] = scores[2].max() + 1  # an exact tie at the top of row 2
    good = _as_engine(tt.reference_top_k(scores, 4))
    tt.assert_top_k_equal(good, scores, 4)
    bad = good.copy(deep=True)
    pi, ps, oi = bad["proponent_index"].values, bad["proponent_score"].values, bad["opponent_index"].values
    if mutation == "swap_index":
        pi[0, [0, 1]] = pi[0, [1, 0]]
    elif mutation == "swap_both":
        pi[0, [0, 1]], ps[0, [0, 1]] = pi[0, [1, 0]], ps[0, [1, 0]]
    elif mutation == "other_index":
        oi[1, 3] = np.argsort(scores[1])[6]
    elif mutation == "score":
        ps[3, 2] += 1e-3
    elif mutation == "repeat":
        oi[0, 1] = oi[0, 0]
    elif mutation == "tie_order":
        pi[2, [0, 1]] = [7, 3]
    with pytest.raises(AssertionError):
        tt.assert_top_k_equal(bad, scores, 4)


def test_assert_top_k_equal_accepts_near_ties_either_way():
    scores = np.array([[0.0, 2.0, 2.0 + 1e-9, -1.0]])
    ds = _as_engine(tt.reference_top_k(scores, 2))
    ds["proponent_index"].values[0] = [1, 2]  # float32 cannot tell these apart
    tt.assert_top_k_equal(ds, scores, 2)


def test_assert_influence_equal_and_lazy_catch_mistakes():
    import dask.array as dsa

    expected = np.arange(12.0).reshape(3, 4)
    lazy = xr.DataArray(dsa.from_array(expected.astype(np.float32), chunks=2), dims=("test", "train"))
    lazy = lazy + 0  # a task on top of the data
    tt.assert_influence_equal(lazy, expected, lazy=True)
    with pytest.raises(AssertionError):
        tt.assert_influence_equal(lazy, expected + 0.1)
    with pytest.raises(AssertionError):
        tt.assert_influence_equal(lazy.rename(test="a"), expected)
    with pytest.raises(AssertionError):
        tt.assert_influence_equal(lazy.astype(np.float64), expected)
    with pytest.raises(AssertionError):
        tt.assert_influence_equal(lazy.compute(), expected, lazy=True)
    with pytest.raises(AssertionError):
        tt.assert_lazy(lazy.persist())
    with tt.count_tasks() as built:
        doubled = lazy * 2
    assert built.tasks == 0
    with tt.count_tasks() as run:
        doubled.compute()
    assert run.tasks > 0 and run.computes == 1
