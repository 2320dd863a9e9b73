"""Exact TracIn from per-layer factors (``projection="factors"``, store layout version 2).

Scores from a factor store equal Captum's ``TracInCP`` on the digits MLP (every layer factors) and CNN
(a mixed store: both convolutions flat, the last layer factors), and equal the flat exact store of the
same capture on models with positions: the text classifier (an Embedding over 16 tokens), the CNN with
every convolution forced to factors, and a model over sequences of varying length. The store reports
damaged chunks by name, is captured and scored on a LocalCluster, and ``info`` shows the per-layer choice.
Its resume after SIGKILL is one of the kill points of tests/test_resume_capture.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import trackin_ooc as to
from trackin_ooc import testing as tt
from trackin_ooc.capturing.projection import factors as factors_module
from trackin_ooc.store import layout
from trackin_ooc.summary import store_info

from . import two_worker_client
from .test_captum_parity import K, assert_close, assert_topk_matches

pytestmark = pytest.mark.timeout(300)

RTOL = 1e-4
EXE = Path(sys.executable).parent / "trackin-ooc"


def capture_pair(trained_model, checkpoints, train_ds, test_ds, root: Path, tag: str, **kw):
    """(test, train) stores of one capture configuration (device="cpu": exact float32 on every machine)."""
    kw = dict(device="cpu", batch_size=64, **kw)
    train = to.capture(trained_model, checkpoints, train_ds, root / f"{tag}_train.zarr", **kw)
    test = to.capture(trained_model, checkpoints, test_ds, root / f"{tag}_test.zarr", **kw)
    return test, train


def assert_same_scores(factor_pair, flat_pair, k: int = 3) -> None:
    """Influence (plain and normalized), self-influence and top-k of a factor store equal the flat store's."""
    for normalize in (False, True):
        ref = to.influence(*flat_pair, normalize=normalize).values
        assert_close(to.influence(*factor_pair, normalize=normalize).values, ref, f"influence normalize={normalize}")
        best, want = to.top_k(*factor_pair, k=k, normalize=normalize), to.top_k(*flat_pair, k=k, normalize=normalize)
        scale = float(np.abs(ref).max())
        for side in ("proponent", "opponent"):
            assert_close(best[f"{side}_score"].values, want[f"{side}_score"].values, f"{side} scores", scale)
            picked = np.take_along_axis(ref, best[f"{side}_index"].values, axis=1)
            assert_close(picked, want[f"{side}_score"].values, f"{side} picks", scale)
    ref_self = to.self_influence(flat_pair[1]).values
    assert_close(to.self_influence(factor_pair[1]).values, ref_self, "self_influence")
    assert_close(to.self_influence(factor_pair[1], exact_norms=True).values, ref_self, "self_influence exact_norms")


# ---- parity with Captum --------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_factor_store_matches_captum(request, model_name, digits, digits_test, captum_reference, factors_pair):
    trained = request.getfixturevalue(model_name)
    ref = captum_reference(model_name)  # the same Captum run as tests/test_captum_parity.py's
    test, train = factors_pair(model_name)  # captured once per session (conftest.py), device="cpu"

    assert train.attrs["format_version"] == layout.FACTORS_FORMAT_VERSION == 2
    stored = {f.module: f for f in train.factor_arrays}
    n_params = sum(p.numel() for p in trained.model.parameters())
    if model_name == "mlp":  # every Linear is cheaper as factors: nothing flat
        assert sorted(stored) == ["1", "3", "5"] and train.feature_dim == 0
        assert all(f.positions == 1 for f in stored.values())
        exact_bytes = train.n_checkpoints * train.n_examples * n_params * 4
        assert train.nbytes * 20 <= exact_bytes, "the factor store should be ≥ 20x smaller than the flat one"
    else:  # 36 and 16 positions make the convolutions cheaper flat; the last Linear is factors
        assert sorted(stored) == ["fc"]
        assert train.feature_dim == sum(p.numel() for n, p in trained.model.named_parameters() if n.startswith("conv"))
        assert train.attrs[layout.FACTOR_POSITIONS_ATTR] == {"conv1": 36, "conv2": 16, "fc": 1}
    with pytest.raises(to.StoreError, match="per-layer factors"):
        train.read_grads(0, 4)

    inf = to.influence(test, train)
    assert inf.dims == ("test", "train") and inf.shape == (len(digits_test), len(digits.train))
    assert_close(inf.values, ref["influence"], "influence")
    assert_close(to.self_influence(train).values, ref["self_influence"], "self_influence")
    assert_close(to.self_influence(train, exact_norms=True).values, ref["self_influence"], "self_influence (norms)")
    best = to.top_k(test, train, k=K)
    assert_topk_matches(
        best.proponent_index.values,
        best.proponent_score.values,
        ref["proponent_index"],
        ref["proponent_score"],
        ref["influence"],
        "proponents",
    )
    assert_topk_matches(
        best.opponent_index.values,
        best.opponent_score.values,
        ref["opponent_index"],
        ref["opponent_score"],
        ref["influence"],
        "opponents",
    )


# ---- models with positions: equal to the flat exact store ------------------------------------------
@pytest.fixture(scope="module")
def text_checkpoints(tmp_path_factory):
    from trackin_ooc.demo import train_with_checkpoints
    from trackin_ooc.demo.text import TokenClassifier, token_data

    torch.manual_seed(0)
    model = TokenClassifier()
    paths = train_with_checkpoints(
        model, token_data(256, seed=2), tmp_path_factory.mktemp("text"), epochs=2, lr=0.5, checkpoint_every=1, seed=0
    )
    return model, paths


def test_text_model_factor_store_equals_flat_store(text_checkpoints, tmp_path):
    from trackin_ooc.demo.text import LENGTH, token_data

    model, ckpts = text_checkpoints
    train_ds, test_ds = token_data(24, seed=0), token_data(6, seed=1)
    factor_pair = capture_pair(model, ckpts, train_ds, test_ds, tmp_path, "f", projection="factors", chunk_rows=8)
    flat_pair = capture_pair(model, ckpts, train_ds, test_ds, tmp_path, "e", chunk_rows=8)
    train = factor_pair[1]
    # The embedding's 16 tokens and the head's one position as factors; the token Linear (16 positions,
    # 17×32) cheaper flat.
    assert [(f.module, f.kind, f.positions, f.tokens) for f in train.factor_arrays] == [
        ("embed", "embedding", LENGTH, True),
        ("head", "linear", 1, False),
    ]
    assert train.feature_dim == 17 * 32
    ids = train.to_xarray()["tokens_0"].values
    np.testing.assert_array_equal(ids, train_ds.tensors[0].numpy())
    assert train.nbytes * 100 < flat_pair[1].nbytes
    assert_same_scores(factor_pair, flat_pair)


def test_convolutions_forced_to_factors_equal_flat_store(cnn, digits, digits_test, tmp_path, monkeypatch):
    """Positions on both sides (conv1: 36, conv2: 16) through the (T × T') products of the kernels."""
    train_ds, test_ds = Subset(digits.train, range(150)), Subset(digits_test, range(20))
    flat_pair = capture_pair(cnn.model, cnn.checkpoints, train_ds, test_ds, tmp_path, "e", chunk_rows=40)
    monkeypatch.setattr(factors_module, "prefer_factors", lambda kind, d_in, d_out, positions: positions > 0)
    factor_pair = capture_pair(
        cnn.model, cnn.checkpoints, train_ds, test_ds, tmp_path, "f", projection="factors", chunk_rows=40
    )
    assert [(f.module, f.positions) for f in factor_pair[1].factor_arrays] == [("conv1", 36), ("conv2", 16), ("fc", 1)]
    assert factor_pair[1].feature_dim == 0
    assert_same_scores(factor_pair, flat_pair)


class Sequences(Dataset):
    """Token sequences of varying length (ids 1..29; 0 pads) with a class each."""

    def __init__(self, n: int, lengths: tuple[int, int], seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            t = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
            self.items.append((torch.randint(1, 30, (t,), generator=g), int(torch.randint(0, 3, (1,), generator=g))))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def pad_batch(items):
    """Pads every sequence of a batch to the batch's longest with 0."""
    longest = max(len(x) for x, _ in items)
    ids = torch.zeros(len(items), longest, dtype=torch.int64)
    for i, (x, _) in enumerate(items):
        ids[i, : len(x)] = x
    return ids, torch.tensor([y for _, y in items])


class MaskedBag(nn.Module):
    """Embedding (0 pads) → Linear per token → tanh → sum over real tokens → Linear: padding changes nothing."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 6, padding_idx=0)
        self.token = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        h = torch.tanh(self.token(self.embed(ids)))
        return self.head((h * (ids != 0).unsqueeze(-1).to(h.dtype)).sum(1))


def test_varying_lengths_pad_to_the_longest_example(tmp_path, monkeypatch):
    """Positions differ per batch; the layout takes the most in the dataset (not the first batch's), pads
    the rest with zeros, and a test store with longer sequences still combines with the train store."""
    torch.manual_seed(0)
    model = MaskedBag()
    ckpts = []
    for i, lr in enumerate((0.1, 0.05)):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ckpts.append(tmp_path / f"ck{i}.pt")
        torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr}, ckpts[-1])
    train_items, test_items = Sequences(40, (2, 9), seed=0), Sequences(7, (3, 12), seed=1)
    train_items.items[:8] = [(x[:2], y) for x, y in train_items.items[:8]]  # a short first batch
    longest_train = max(len(x) for x, _ in train_items)
    longest_test = max(len(x) for x, _ in test_items)
    assert longest_test > longest_train

    def loaders():
        return (
            DataLoader(train_items, batch_size=8, collate_fn=pad_batch),
            DataLoader(test_items, batch_size=8, collate_fn=pad_batch),
        )

    def pair(tag, **kw):
        tr, te = loaders()
        kw = dict(device="cpu", chunk_rows=16, **kw)
        return (
            to.capture(model, ckpts, te, tmp_path / f"{tag}_test.zarr", **kw),
            to.capture(model, ckpts, tr, tmp_path / f"{tag}_train.zarr", **kw),
        )

    flat_pair = pair("e")
    monkeypatch.setattr(factors_module, "prefer_factors", lambda kind, d_in, d_out, positions: positions > 0)
    factor_pair = pair("f", projection="factors")
    test, train = factor_pair
    assert [(f.module, f.positions) for f in train.factor_arrays] == [
        ("embed", longest_train),
        ("token", longest_train),
        ("head", 1),
    ]
    assert [f.positions for f in test.factor_arrays] == [longest_test, longest_test, 1]
    assert test.fingerprint == train.fingerprint
    ids = train.to_xarray()["tokens_0"].values
    assert (ids[:8, 2:] == layout.NO_TOKEN).all() and (ids[:8, :2] > 0).all()
    values = train.read_factors(0, 8)[1][1]  # the token Linear's [a | 1 | δ] rows: zero beyond each example
    assert np.abs(values[:, :, 2:]).max() == 0 and np.abs(values[:, :, :2]).max() > 0
    assert_same_scores(factor_pair, flat_pair)


def test_array_module_path_equals_the_cpu_path(cnn, digits, digits_test, tmp_path, monkeypatch):
    """The kernels' path for array modules other than numpy (CuPy on a GPU: whole-block tiles, unfused
    products, sampled-threshold top-k) run here with numpy behind another module object."""
    import types

    from trackin_ooc.engine import factor_kernels as fk
    from trackin_ooc.engine import factor_tasks
    from trackin_ooc.engine.tasks import StoreRef

    monkeypatch.setattr(factors_module, "prefer_factors", lambda kind, d_in, d_out, positions: positions > 0)
    test, train = capture_pair(
        cnn.model,
        cnn.checkpoints,
        Subset(digits.train, range(90)),
        Subset(digits_test, range(12)),
        tmp_path,
        "f",
        projection="factors",
    )
    xp = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    a = factor_tasks.read_test_block(StoreRef.of(test), 0, 12, list(train.learning_rates), True)
    b = factor_tasks._read(StoreRef.of(train), 0, 90, None, True)
    cpu, other = fk.score_block(a, b, np), fk.score_block(a, b, xp)
    np.testing.assert_allclose(other, cpu, rtol=1e-5, atol=1e-6 * np.abs(cpu).max())
    best_cpu, best_other = fk.score_topk(a, b, 4, 0, np), fk.score_topk(a, b, 4, 0, xp)
    np.testing.assert_array_equal(best_other.best_index, best_cpu.best_index)
    np.testing.assert_array_equal(best_other.worst_index, best_cpu.worst_index)
    plain = factor_tasks._read(StoreRef.of(train), 0, 90, None, False)
    np.testing.assert_allclose(
        fk.self_influence(plain, train.learning_rates, xp),
        fk.self_influence(plain, train.learning_rates, np),
        rtol=1e-6,
    )


# ---- scoring on a LocalCluster ---------------------------------------------------------------------
def test_factor_capture_and_scores_on_a_local_cluster(mlp, digits, digits_test, tmp_path):
    train_ds = Subset(digits.train, range(200))
    pair = capture_pair(
        mlp.model, mlp.checkpoints, train_ds, digits_test, tmp_path, "f", projection="factors", chunk_rows=32
    )
    here_inf = to.influence(*pair).values
    here_top = to.top_k(*pair, k=4, normalize=True)
    here_self = to.self_influence(pair[1]).values
    with two_worker_client() as client:  # the module's LocalCluster (tests/__init__.py)
        # Row blocks captured as Dask tasks on the workers: the same bytes as in-process.
        spread = to.capture(
            mlp.model,
            mlp.checkpoints,
            train_ds,
            tmp_path / "spread.zarr",
            projection="factors",
            chunk_rows=32,
            batch_size=64,
            device="cpu",
            client=client,
        )
        tt.assert_stores_identical(spread, pair[1])
        there_inf = to.influence(*pair, client=client, memory_limit="64MB").values
        there_top = to.top_k(*pair, k=4, normalize=True, client=client)
        there_self = to.self_influence(pair[1], client=client).values
        out = to.influence(*pair, out=tmp_path / "inf.zarr", client=client).values
    np.testing.assert_allclose(there_inf, here_inf, rtol=1e-5, atol=1e-6 * np.abs(here_inf).max())
    np.testing.assert_allclose(out, here_inf, rtol=1e-5, atol=1e-6 * np.abs(here_inf).max())
    np.testing.assert_array_equal(there_top.proponent_index.values, here_top.proponent_index.values)
    np.testing.assert_array_equal(there_top.opponent_index.values, here_top.opponent_index.values)
    np.testing.assert_allclose(there_self, here_self, rtol=1e-6)


# ---- what the capture and the store refuse, and storage dtypes ---------------------------------------
def test_refusals_and_bfloat16(mlp, digits, digits_test, tmp_path):
    train_ds, test_ds = Subset(digits.train, range(64)), Subset(digits_test, range(8))
    with pytest.raises(to.CaptureError, match="leave projection_dim out"):
        to.capture(mlp.model, mlp.checkpoints, train_ds, tmp_path / "x.zarr", projection="factors", projection_dim=8)
    factor_pair = capture_pair(mlp.model, mlp.checkpoints, train_ds, test_ds, tmp_path, "f", projection="factors")
    flat_pair = capture_pair(mlp.model, mlp.checkpoints, train_ds, test_ds, tmp_path, "e")
    with pytest.raises(to.IncompatibleStoresError, match="per-layer factors"):
        to.influence(flat_pair[0], factor_pair[1])
    half = capture_pair(
        mlp.model, mlp.checkpoints, train_ds, test_ds, tmp_path, "h", projection="factors", dtype="bfloat16"
    )
    ref = to.influence(*flat_pair).values
    got = to.influence(*half).values
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert 0 < err < 3e-2, f"bfloat16 factors: relative error {err:.1e}"
    ds = half[1].to_xarray()
    assert ds["factors_0"].dtype == np.float32 and ds["factors_0"].dims[2:] == ("position_0", "width_0")


def test_nonfinite_examples_are_flagged_and_zeroed_in_every_factor_array(mlp, digits, tmp_path):
    data = Subset(digits.train, range(48))
    labels = np.array([int(digits.train[i][1]) for i in range(48)])

    def loss_nan_for_threes(outputs, targets):
        loss = nn.functional.cross_entropy(outputs, targets, reduction="none")
        scale = torch.where(targets == 3, float("nan"), 1.0)  # a constant: NaN gradients for those examples only
        return loss * scale

    store = to.capture(
        mlp.model,
        mlp.checkpoints,
        data,
        tmp_path / "s.zarr",
        projection="factors",
        device="cpu",
        loss_fn=loss_nan_for_threes,
        nonfinite="flag",
        chunk_rows=16,
    )
    bad = np.flatnonzero(labels == 3)
    assert len(bad) > 0
    np.testing.assert_array_equal(store.nonfinite_examples(), bad)
    for _, values, _ in store.read_factors():
        assert np.isfinite(values).all() and not values[:, bad].any() and values[:, labels != 3].any()
    with pytest.warns(to.NonFiniteWarning):
        scores = to.influence(store, store).values
    assert not scores[bad].any() and not scores[:, bad].any() and np.isfinite(scores).all()


def test_exact_capture_logs_when_factors_are_cheaper(mlp, cnn, digits, tmp_path, caplog):
    data = Subset(digits.train, range(32))
    with caplog.at_level(logging.INFO, logger="trackin_ooc"):
        to.capture(mlp.model, mlp.checkpoints, data, tmp_path / "mlp.zarr", device="cpu")
    hints = [r.getMessage() for r in caplog.records if "projection='factors'" in r.getMessage()]
    assert len(hints) == 1 and "smaller" in hints[0], hints
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trackin_ooc"):  # the CNN's convolutions stay flat: < 10x
        to.capture(cnn.model, cnn.checkpoints, data, tmp_path / "cnn.zarr", device="cpu")
    assert not [r for r in caplog.records if "projection='factors'" in r.getMessage()]


# ---- integrity: checksums ------------------------------------------------------------------------
def test_damaged_factor_chunk_is_named_by_every_reader(mlp, digits, digits_test, tmp_path):
    test, train = capture_pair(
        mlp.model,
        mlp.checkpoints,
        Subset(digits.train, range(96)),
        digits_test,
        tmp_path,
        "f",
        projection="factors",
        chunk_rows=32,
    )
    chunk = Path(train.path, "factors_1", "c", "1", "2", "0", "0")
    data = bytearray(chunk.read_bytes())
    data[17] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert [str(b) for b in to.open_store(train.path).verify()] == ["array 'factors_1' chunk 1/2/0/0"]
    for run in (
        lambda: to.self_influence(train.path),
        lambda: to.top_k(test, train.path, k=3),
        lambda: to.influence(test, train.path).values,
    ):
        with pytest.raises(to.CorruptChunkError, match="'factors_1' chunk 1/2/0/0") as e:
            run()
        assert "\n" not in str(e.value)


# ---- the CLI: --projection factors and info's per-layer table ---------------------------------------
def test_cli_capture_with_factors_and_info_per_layer(cnn, tmp_path):
    env = dict(os.environ, TRACKIN_OOC_QUIET="1", OMP_NUM_THREADS="1")
    base = [
        str(EXE),
        "capture",
        "--model",
        "trackin_ooc.demo.examples:digits_cnn_model",
        "--data",
        "trackin_ooc.demo.examples:digits_test_small",
        *sum((["--checkpoint", str(p)] for p in cnn.checkpoints), []),
    ]
    bad = subprocess.run(
        [*base, "--out", str(tmp_path / "bad.zarr"), "--projection", "factors", "--projection-dim", "8"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "leave out --projection-dim" in bad.stderr
    made = subprocess.run(
        [*base, "--out", str(tmp_path / "s.zarr"), "--projection", "factors"], capture_output=True, text=True, env=env
    )
    assert made.returncode == 0, made.stderr
    info = subprocess.run([str(EXE), "info", str(tmp_path / "s.zarr")], capture_output=True, text=True, env=env)
    assert info.returncode == 0, info.stderr
    rows = {
        line.split()[0]: line
        for line in info.stdout.splitlines()
        if line.startswith("    conv") or line.startswith("    fc")
    }
    assert "36 positions" in rows["conv1"] and " flat " in rows["conv1"]
    assert "16 positions" in rows["conv2"] and " flat " in rows["conv2"]
    assert "1 position" in rows["fc"] and " factors " in rows["fc"]
    summary = store_info(tmp_path / "s.zarr")  # what info --json prints
    choices = {x["module"]: (x["store"], x["positions"]) for x in summary["factors"]["layers"]}
    assert choices == {"conv1": ("flat", 36), "conv2": ("flat", 16), "fc": ("factors", 1)}
    assert summary["format_version"] == 2 and json.dumps(summary)
