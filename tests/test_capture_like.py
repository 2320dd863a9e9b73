"""capture_like: a test store made with its train store's options equals one with them spelled out, bit for bit,
and combines with it; path=None queries in memory; plan_capture says what a capture will write."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from torch.utils.data import Subset

import trackin_ooc as to
from trackin_ooc import testing as tt
from trackin_ooc.store import backends

# (train store options, what capture_like must repeat): dense with a layer subset, seed and dtype; factored;
# exact from per-layer factors.
OPTIONS = {
    "gaussian": dict(projection_dim=48, layers=["conv2", "fc"], seed=3, dtype="float16"),
    "factored": dict(projection="factored", projection_dim=64, seed=1),
    "factors": dict(projection="factors", dtype="bfloat16"),
}


@pytest.fixture(scope="module")
def trains(cnn, digits, tmp_path_factory):
    root = tmp_path_factory.mktemp("like")
    train_data = Subset(digits.train, range(200))
    return root, {
        name: to.capture(cnn.model, cnn.checkpoints, train_data, root / f"train_{name}.zarr", progress=False, **kw)
        for name, kw in OPTIONS.items()
    }


@pytest.mark.parametrize("name", list(OPTIONS))
def test_like_equals_the_options_spelled_out(name, trains, cnn, digits_test, tmp_path):
    _, stores = trains
    train = stores[name]
    like = to.capture_like(train, cnn.model, digits_test, tmp_path / "like.zarr", progress=False)
    spelled = to.capture(
        cnn.model, cnn.checkpoints, digits_test, tmp_path / "spelled.zarr", progress=False, **OPTIONS[name]
    )
    tt.assert_stores_identical(like, spelled)
    assert like.fingerprint == train.fingerprint
    best = to.top_k(like, train, k=3, progress=False)  # combines with its train store
    xr.testing.assert_identical(best, to.top_k(spelled, train, k=3, progress=False).assign_attrs(best.attrs))


def test_in_memory_query_equals_on_disk(trains, cnn, digits_test, tmp_path):
    _, stores = trains
    train = stores["gaussian"]
    few = Subset(digits_test, [4, 17, 31])
    disk = to.capture_like(train, cnn.model, few, tmp_path / "few.zarr", progress=False)
    memory = to.capture_like(train, cnn.model, few, None, progress=False)
    assert backends.is_memory(memory.path) and not (tmp_path / "None").exists()
    tt.assert_stores_identical(memory, disk)
    for a, b in (
        (to.top_k(memory, train, k=5, progress=False), to.top_k(disk, train, k=5, progress=False)),
        (
            to.top_k(memory, train, k=5, normalize=True, progress=False),
            to.top_k(disk, train, k=5, normalize=True, progress=False),
        ),
    ):
        for var in a.data_vars:
            np.testing.assert_array_equal(a[var].values, b[var].values)
    np.testing.assert_array_equal(to.influence(memory, train).values, to.influence(disk, train).values)
    np.testing.assert_array_equal(to.self_influence(memory).values, to.self_influence(disk).values)
    np.testing.assert_array_equal(to.net_influence(memory, train).values, to.net_influence(disk, train).values)
    # A lazy result keeps the store it reads alive: a store made inline is still there when it computes.
    import gc

    lazy = to.influence(to.capture_like(train, cnn.model, few, None, progress=False), train)
    gc.collect()
    np.testing.assert_array_equal(lazy.values, to.influence(disk, train).values)
    # The memory goes with the store object (and with the last lazy result that reads it).
    fs, where = backends.filesystem(memory.path)
    assert fs.exists(where)
    del memory
    gc.collect()
    assert not fs.exists(where)


def test_capture_with_path_none(cnn, digits_test):
    store = to.capture(
        cnn.model, cnn.checkpoints, Subset(digits_test, range(5)), None, projection_dim=16, progress=False
    )
    assert store.complete and store.n_examples == 5 and backends.is_memory(store.path)


def test_moved_or_changed_checkpoint_is_one_line(cnn, digits, digits_test, tmp_path):
    ckpts = []
    for p in cnn.checkpoints:
        shutil.copy(p, tmp_path / p.name)
        ckpts.append(tmp_path / p.name)
    train = to.capture(
        cnn.model, ckpts, Subset(digits.train, range(40)), tmp_path / "train.zarr", projection_dim=16, progress=False
    )
    assert train.attrs["checkpoint_paths"] == [str(p) for p in ckpts]
    ckpts[1].rename(tmp_path / "moved.pt")
    with pytest.raises(to.CheckpointNotFoundError) as err:
        to.capture_like(train, cnn.model, digits_test, tmp_path / "test.zarr", progress=False)
    message = str(err.value)
    assert "\n" not in message and ckpts[1].name in message and "checkpoints=[...]" in message
    assert not (tmp_path / "test.zarr").exists()
    # Given where they are now, it captures; other weights under the old name are refused by their hash.
    moved = [ckpts[0], tmp_path / "moved.pt", ckpts[2]]
    assert to.capture_like(
        train, cnn.model, digits_test, tmp_path / "ok.zarr", checkpoints=moved, progress=False
    ).complete
    shutil.copy(ckpts[0], ckpts[1])
    with pytest.raises(to.CheckpointError, match="hash") as err:
        to.capture_like(train, cnn.model, digits_test, tmp_path / "test.zarr", progress=False)
    assert "\n" not in str(err.value) and ckpts[1].name in str(err.value)


def test_store_without_checkpoint_paths_asks_for_them(trains, cnn, digits_test, tmp_path):
    root, stores = trains
    old = tmp_path / "old.zarr"
    shutil.copytree(stores["gaussian"].path, old)
    group = zarr.open_group(str(old), mode="r+")
    meta = dict(group.attrs["trackin_ooc"])
    del meta["checkpoint_paths"], meta["target_key"]  # as stores made before this version
    group.attrs["trackin_ooc"] = meta
    with pytest.raises(to.CaptureError, match=r"checkpoints=\[\.\.\.\] \(--checkpoint\)"):
        to.capture_like(old, cnn.model, digits_test, tmp_path / "t.zarr", progress=False)
    got = to.capture_like(old, cnn.model, digits_test, tmp_path / "t.zarr", checkpoints=cnn.checkpoints, progress=False)
    assert got.fingerprint == stores["gaussian"].fingerprint


def test_options_that_define_the_space_are_refused(trains, cnn, digits_test, tmp_path):
    _, stores = trains
    for bad in (dict(seed=1), dict(projection_dim=8), dict(layers=["fc"]), dict(learning_rates=[1, 1, 1])):
        with pytest.raises(to.ArgumentError, match="capture_like takes"):
            to.capture_like(stores["gaussian"], cnn.model, digits_test, tmp_path / "t.zarr", **bad)
    assert not (tmp_path / "t.zarr").exists()


def _margin(outputs, targets):
    """Another differentiable metric per example: minus the logit of the target class."""
    return -outputs.gather(1, targets[:, None])[:, 0]


def test_a_custom_loss_must_be_named_again(cnn, digits, digits_test, tmp_path):
    train = to.capture(
        cnn.model,
        cnn.checkpoints,
        Subset(digits.train, range(40)),
        tmp_path / "train.zarr",
        projection_dim=16,
        loss_fn=_margin,
        progress=False,
    )
    with pytest.raises(to.CaptureError, match="'_margin'.*loss_fn="):
        to.capture_like(train, cnn.model, digits_test, tmp_path / "t.zarr", progress=False)
    got = to.capture_like(train, cnn.model, digits_test, tmp_path / "t.zarr", loss_fn=None, progress=False)
    assert got.loss_name == "cross_entropy" and to.top_k(got, train, k=2, progress=False).sizes["rank"] == 2


@pytest.mark.parametrize("name", list(OPTIONS))
def test_plan_says_what_capture_writes(name, trains, cnn, digits):
    _, stores = trains
    store = stores[name]
    plan = to.plan_capture(cnn.model, cnn.checkpoints, Subset(digits.train, range(200)), **OPTIONS[name])
    assert plan.nbytes == store.nbytes and plan.feature_dim == store.feature_dim
    assert plan.n_examples == store.n_examples and plan.checkpoints == tuple(store.checkpoint_names)
    np.testing.assert_array_equal(plan.learning_rates, store.learning_rates)
    assert [x.name for x in plan.layers] == [n for n, _ in store.spec.layers]
    assert plan.spec.fingerprint == store.fingerprint
    text, page = repr(plan), plan._repr_html_()
    assert plan.describe() in text and "about" in text and all(x.name in text for x in plan.layers)
    assert "<table" in page and plan.checkpoints[0] in page


def test_plan_html_escapes(cnn, digits, tmp_path):
    torch.save({"model_state_dict": cnn.model.state_dict(), "learning_rate": 0.1}, tmp_path / "<i>&x.pt")
    plan = to.plan_capture(cnn.model, [tmp_path / "<i>&x.pt"], Subset(digits.train, range(8)))
    page = plan._repr_html_()
    assert "<i>&x" not in page and "&lt;i&gt;&amp;x" in page


def test_capture_announces_its_size_first(cnn, digits, tmp_path, capfd):
    to.capture(
        cnn.model,
        cnn.checkpoints,
        Subset(digits.train, range(30)),
        tmp_path / "s.zarr",
        projection_dim=8,
        progress=True,
    )
    err = capfd.readouterr().err
    store = to.open_store(tmp_path / "s.zarr")
    line = next(x for x in err.replace("\r", "\n").splitlines() if x.startswith("capture: about"))
    assert "30 examples × 3 checkpoints × 8 features, float32" in line and str(tmp_path / "s.zarr") in line
    assert err.index("capture: about") < err.index("examples [")  # before the bar's first count
    assert store.nbytes == 30 * 3 * 8 * 4


def test_top_k_ranks_from_one_with_labels(trains, cnn, digits_test, tmp_path):
    _, stores = trains
    train = stores["gaussian"]
    test = to.capture_like(train, cnn.model, digits_test, None, progress=False)
    best = to.top_k(test, train, k=4, progress=False)
    np.testing.assert_array_equal(best["rank"].values, [1, 2, 3, 4])
    labels = train.labels()
    np.testing.assert_array_equal(best.proponent_label.values, labels[best.proponent_index.values])
    np.testing.assert_array_equal(best.opponent_label.values, labels[best.opponent_index.values])
    np.testing.assert_array_equal(best.test_label.values, test.labels())
    lazy = to.top_k(test, train, k=4, compute_now=False, progress=False)
    np.testing.assert_array_equal(lazy.proponent_label.values, best.proponent_label.values)


@pytest.fixture(scope="module")
def adam_checkpoints(digits, tmp_path_factory) -> tuple[torch.nn.Module, list]:
    """A small MLP after real AdamW steps on 160 digits: a torch file per epoch with its optimizer state."""
    from trackin_ooc.demo import digits_mlp

    root = tmp_path_factory.mktemp("adam")
    model = digits_mlp((16,), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x, y = digits.train.tensors
    paths = []
    for epoch in range(2):
        for idx in torch.randperm(160, generator=torch.Generator().manual_seed(epoch)).split(32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        paths.append(root / f"epoch_{epoch}.pt")
        torch.save(
            {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(), "learning_rate": 0.01},
            paths[-1],
        )
    return model, paths


def test_like_repeats_the_preconditioner(adam_checkpoints, digits, digits_test, tmp_path):
    model, paths = adam_checkpoints
    train = to.capture(
        model, paths, Subset(digits.train, range(80)), tmp_path / "train.zarr", projection_dim=32, progress=False
    )  # preconditioner="auto": Adam moments in every file
    assert train.spec.preconditioner == "adam"
    like = to.capture_like(train, model, digits_test, tmp_path / "like.zarr", progress=False)
    spelled = to.capture(
        model, paths, digits_test, tmp_path / "spelled.zarr", projection_dim=32, preconditioner="adam", progress=False
    )
    tt.assert_stores_identical(like, spelled)
    assert to.top_k(like, train, k=2, progress=False).sizes["rank"] == 2
    sgd = to.capture(
        model,
        paths,
        Subset(digits.train, range(80)),
        tmp_path / "sgd.zarr",
        projection_dim=32,
        preconditioner=None,
        progress=False,
    )
    assert to.capture_like(sgd, model, digits_test, None, progress=False).spec.preconditioner == "none"
    plan = to.plan_capture(model, paths, Subset(digits.train, range(80)), projection_dim=32)
    assert plan.preconditioner == "adam" and plan.spec.fingerprint == train.fingerprint
