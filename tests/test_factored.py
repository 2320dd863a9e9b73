"""Factored projection (projection="factored"): hooks on Linear/Conv2d/Embedding, per-layer factors.

Checked against exact per-example gradients three ways: identity factors reproduce exact influence;
random factors computed through the hooks equal the same linear map applied to torch.func's exact
gradients; and on real trained models the factored ranking agrees with the exact one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from torch import nn
from torch.utils.data import TensorDataset

import trackin_ooc as to
from trackin_ooc.capturing.per_example.vmap import PerExampleGradients
from trackin_ooc.capturing.projection import factored_plan
from trackin_ooc.capturing.projection.factored import (
    factored_spec,
    plan_from_spec,
    project_gradients,
)
from trackin_ooc.capturing.projection.factored_plan import stored_dim
from trackin_ooc.capturing.projection.hooks import FactoredFeatures
from trackin_ooc.demo import digits_cnn, digits_mlp, train_with_checkpoints
from trackin_ooc.demo.text import EMBED, VOCAB, TokenClassifier, token_data

DIM = 8192
MIN_SPEARMAN = 0.9


def mean_row_spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return float(np.mean((ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))))


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def cap(trained, data, path, **kw):
    kw.setdefault("device", "cpu")
    return to.capture(trained.model, trained.checkpoints, data, path, **kw)


# ---- identity factors ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_identity_factors_reproduce_exact_influence(request, model_name, digits, digits_test, tmp_path):
    trained = request.getfixturevalue(model_name)
    n_params = sum(p.numel() for p in trained.model.parameters())
    n_layers = sum(1 for m in trained.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    # Biases are folded in as a constant input: the exact width is the parameter count.
    exact_tr = cap(trained, digits.train, tmp_path / "exact_train.zarr")
    exact_te = cap(trained, digits_test, tmp_path / "exact_test.zarr")
    fac_tr = cap(trained, digits.train, tmp_path / "fac_train.zarr", projection="factored", projection_dim=n_params)
    fac_te = cap(trained, digits_test, tmp_path / "fac_test.zarr", projection="factored", projection_dim=n_params)

    plan = plan_from_spec(fac_tr.spec)
    assert len(plan) == n_layers and all(x.kind in ("linear", "conv2d") for x in plan)
    assert all(x.in_identity and x.out_identity for x in plan)
    assert fac_tr.feature_dim == n_params

    assert rel_err(to.influence(fac_te, fac_tr).values, to.influence(exact_te, exact_tr).values) <= 1e-5
    assert rel_err(to.self_influence(fac_tr).values, to.self_influence(exact_tr).values) <= 1e-5
    assert (
        rel_err(
            to.influence(fac_te, fac_tr, normalize=True).values, to.influence(exact_te, exact_tr, normalize=True).values
        )
        <= 1e-5
    )
    # Same losses as exact mode (the hooked forward is the model's own).
    np.testing.assert_allclose(fac_tr.read_losses(), exact_tr.read_losses(), rtol=1e-6, atol=1e-7)


# ---- hooks vs the same linear map of exact gradients -------------------------------------------
class Mixed(nn.Module):
    """Every case the hooks handle: an Embedding with padding_idx, a Linear over tokens used twice,
    strided/padded and 'same'+reflect convolutions, in-place ReLUs on hooked outputs, and parameters
    that fall back to the dense projection (LayerNorm, a grouped conv, a bare Parameter)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(300, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.same = nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.grouped = nn.Conv2d(4, 4, 1, groups=2)
        self.norm = nn.LayerNorm(6)
        self.gate = nn.Parameter(torch.ones(6))
        self.head = nn.Linear(6 + 4 * 9, 5)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, image, tokens):
        h = self.relu(self.mix(self.embed(tokens)))
        h = self.norm(self.mix(h)) * self.gate
        c = self.grouped(self.relu(self.same(self.relu(self.conv(image)))))
        return self.head(torch.cat([h.mean(1), c.flatten(1)], dim=1))


def mixed_batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 2, 6, 6, generator=g)
    tokens = torch.randint(0, 300, (b, 7), generator=g)
    tokens[:, :2] = 0  # padding positions: the padding row gets no gradient
    tokens[1, 3:5] = 17  # a repeated token
    return (image, tokens), torch.randint(0, 5, (b,), generator=g)


@pytest.mark.parametrize("dim,wide", [(90, False), (300, True), (10**6, False)], ids=["hashed", "wide", "exact"])
def test_hooks_equal_factors_applied_to_exact_gradients(dim, wide, monkeypatch):
    if wide:  # every layer too large to hash whole: projected to its wide space first, then hashed
        monkeypatch.setattr(factored_plan, "HASH_ELEMENTS", 0)
        monkeypatch.setattr(factored_plan, "DENSE_ELEMENTS", 0)
    if dim == 90:  # dense maps for the smallest layers only (this model is small enough for all of them)
        monkeypatch.setattr(factored_plan, "DENSE_ELEMENTS", 90 * 250)
    torch.manual_seed(0)
    model = Mixed().eval()
    names = [n for n, _ in model.named_parameters()]
    spec = factored_spec(model, names, dim, seed=3)
    plan = plan_from_spec(spec)
    kinds = {x.module or "dense": x.kind for x in plan}
    assert kinds == {
        "embed": "embedding",
        "mix": "linear",
        "conv": "conv2d",
        "same": "conv2d",
        "head": "linear",
        "dense": "dense",
    }
    dense = next(x for x in plan if x.kind == "dense")
    assert set(dense.params) == {"gate", "grouped.weight", "grouped.bias", "norm.weight", "norm.bias"}
    if dim == 90:  # every layer's exact gradient hashed into the 90 shared dims, the smallest mapped densely
        assert all(x.mix == 90 and (x.hashed_whole or x.direct) for x in plan)
        assert any(x.hashed_whole for x in plan) and any(x.direct for x in plan)
    if wide:
        hooked = [x for x in plan if x.kind != "dense"]
        assert all(x.mix == 300 and not x.hashed_whole for x in hooked)
        assert any(x.blocks > 1 for x in hooked) and any(x.in_identity != x.out_identity for x in hooked)
    if dim == 10**6:
        assert spec.dim == sum(p.numel() for p in model.parameters())

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    inputs, targets = mixed_batch()
    feats = FactoredFeatures(model, spec)
    try:
        ours, losses, _ = feats.one(feats.prepare(state), inputs, targets)
    finally:
        feats.close()
    grads, ref_losses = PerExampleGradients(model, names)(state, inputs, targets)
    ref = project_gradients(spec, grads)
    assert ours.shape == ref.shape == (6, spec.dim)
    assert rel_err(ours, ref) <= 1e-5
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    if dim == 10**6:  # identity everywhere: ⟨f, f'⟩ is the exact gradient inner product
        flat = torch.cat([g.reshape(6, -1) for g in grads.values()], dim=1)
        assert rel_err(ours @ ours.T, flat @ flat.T) <= 1e-5
    # The hooks are gone afterwards: the model runs as before, with no captured state.
    assert not any(m._forward_hooks for m in model.modules())


class SequenceModel(nn.Module):
    """Linear layers over (batch, tokens, features), mean-pooled, then a Linear head."""

    def __init__(self):
        super().__init__()
        self.token = nn.Linear(12, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.token(x)).mean(1))


def test_sequence_inputs_to_linear_layers(tmp_path):
    torch.manual_seed(1)
    model = SequenceModel()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, 9, 12, generator=g), torch.randint(0, 3, (40,), generator=g)
    data = TensorDataset(x, y)
    ckpts = [{k: v + 0.01 * i for k, v in model.state_dict().items()} for i in range(2)]
    kw = dict(learning_rates=[0.1, 0.05], batch_size=16, device="cpu")
    exact = to.capture(model, ckpts, data, tmp_path / "exact.zarr", **kw)
    ident = to.capture(model, ckpts, data, tmp_path / "ident.zarr", projection="factored", projection_dim=10**5, **kw)
    assert rel_err(to.self_influence(ident).values, to.self_influence(exact).values) <= 1e-5
    assert rel_err(to.influence(ident, ident).values, to.influence(exact, exact).values) <= 1e-5

    small = to.capture(
        model, ckpts, data, tmp_path / "small.zarr", projection="factored", projection_dim=120, seed=5, **kw
    )
    assert small.feature_dim == 120
    plan = plan_from_spec(small.spec)
    assert [x.kind for x in plan] == ["linear", "linear"]
    assert all(x.mix == 120 for x in plan)  # both map into the 120 shared dims (small: dense maps)
    names = [n for n, _ in model.named_parameters()]
    for c, state in enumerate(ckpts):
        grads, _ = PerExampleGradients(model, names)(state, x, y)
        want = project_gradients(small.spec, grads).numpy()
        assert rel_err(small.read_grads(checkpoint=c), want) <= 1e-5


# ---- agreement with exact on trained models ------------------------------------------------------
@pytest.fixture(scope="module")
def wide_models(tmp_path_factory, digits):
    """Digits models whose exact gradients are wider than 8192: MLP 64-256-256-10 (85k
    parameters) and the CNN with 32 channels (14.7k), each with 3 SGD checkpoints."""
    out = {}
    for name, make, epochs in [
        ("mlp", lambda: digits_mlp((256, 256), seed=0), 12),
        ("cnn", lambda: digits_cnn(32, seed=0), 6),
    ]:
        model = make()
        paths = train_with_checkpoints(
            model,
            digits.train,
            tmp_path_factory.mktemp(f"wide_{name}"),
            epochs=epochs,
            lr=0.1,
            checkpoint_every=epochs // 3,
            seed=0,
        )
        out[name] = (model, paths)
    return out


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_factored_ranks_like_exact_on_digits(wide_models, model_name, digits, digits_test, tmp_path):
    model, ckpts = wide_models[model_name]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params > DIM
    train_ds = TensorDataset(*(t[:300] for t in digits.train.tensors))
    kw = dict(device="cpu", batch_size=128)
    stores = {}
    for mode, extra in [("exact", {}), ("factored", dict(projection="factored", projection_dim=DIM))]:
        stores[mode] = (
            to.capture(model, ckpts, digits_test, tmp_path / f"{mode}_te.zarr", **kw, **extra),
            to.capture(model, ckpts, train_ds, tmp_path / f"{mode}_tr.zarr", **kw, **extra),
        )
    assert stores["factored"][1].feature_dim == DIM
    plan = plan_from_spec(stores["factored"][1].spec)
    assert all(x.mix == DIM for x in plan)  # really projected (hashed into the shared dims), not exact
    exact = to.influence(*stores["exact"]).values
    fac = to.influence(*stores["factored"]).values
    rho = mean_row_spearman(fac, exact)
    assert rho >= MIN_SPEARMAN, f"{model_name}: mean per-row Spearman {rho:.3f} < {MIN_SPEARMAN}"
    si = mean_row_spearman(
        to.self_influence(stores["factored"][1]).values[None], to.self_influence(stores["exact"][1]).values[None]
    )
    assert si >= MIN_SPEARMAN


# ---- a text classifier with a 50k vocabulary ----------------------------------------------------
def exact_restricted(model, states, data, rows):
    """Exact per-example gradients with the embedding restricted to ``rows`` (the tokens that occur:
    every other row is zero in every gradient, so inner products are unchanged). (C, N, D)."""
    names = [n for n, _ in model.named_parameters()]
    per_example = PerExampleGradients(model, names)
    x, y = data.tensors
    out = []
    for state in states:
        parts = []
        for s in range(0, len(y), 32):
            g, _ = per_example(state, x[s : s + 32], y[s : s + 32])
            b = len(y[s : s + 32])
            parts.append(
                torch.cat([g["embed.weight"][:, rows].reshape(b, -1)] + [g[n].reshape(b, -1) for n in names[1:]], dim=1)
            )
        out.append(torch.cat(parts).numpy())
    return np.stack(out)


def test_text_classifier_with_large_vocabulary(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TokenClassifier()
    train_ds, test_ds = token_data(300, seed=0), token_data(40, seed=1)
    ckpts = train_with_checkpoints(model, train_ds, tmp_path / "ckpt", epochs=3, lr=2.0, checkpoint_every=1)
    lr = 2.0

    # The factored capture never forms a per-example gradient (of the 800k-parameter embedding or
    # anything else): every layer is hooked.
    def refuse(*a, **k):
        raise AssertionError("factored capture formed per-example gradients")

    with monkeypatch.context() as mp:
        mp.setattr(PerExampleGradients, "__call__", refuse)
        kw = dict(projection="factored", projection_dim=DIM, device="cpu", batch_size=100)
        train = to.capture(model, ckpts, train_ds, tmp_path / "train.zarr", **kw)
        test = to.capture(model, ckpts, test_ds, tmp_path / "test.zarr", **kw)
    plan = plan_from_spec(train.spec)
    embed = plan[0]
    assert (embed.kind, embed.d_in, embed.d_out) == ("embedding", VOCAB, EMBED)
    assert embed.hashed_whole and embed.mix == DIM  # its δ_t added at its tokens' buckets, G never formed
    assert train.feature_dim == DIM

    states = [torch.load(p, weights_only=True)["model_state_dict"] for p in ckpts]
    rows = torch.unique(torch.cat([train_ds.tensors[0].reshape(-1), test_ds.tensors[0].reshape(-1)]))
    g_tr, g_te = exact_restricted(model, states, train_ds, rows), exact_restricted(model, states, test_ds, rows)
    exact = lr * np.einsum("cif,cjf->ij", g_te, g_tr)
    fac = to.influence(test, train).values
    rho = mean_row_spearman(fac, exact)
    assert rho >= MIN_SPEARMAN, f"text classifier: mean per-row Spearman {rho:.3f} < {MIN_SPEARMAN}"
    # The hooks' features are the CountSketch of the exact gradient, at the full 50k vocabulary.
    names = [n for n, _ in model.named_parameters()]
    grads, _ = PerExampleGradients(model, names)(states[0], train_ds.tensors[0][:6], train_ds.tensors[1][:6])
    want = project_gradients(train.spec, grads).numpy()
    assert rel_err(train.read_grads(0, 6, checkpoint=0), want) <= 1e-5
    # Self-influence (on the diagonal of train × train) is estimated without bias: close in value.
    si = to.self_influence(train).values
    want = lr * np.einsum("cif,cif->i", g_tr, g_tr)
    assert np.corrcoef(si, want)[0, 1] > 0.95


# ---- spec, fingerprint and reproducibility -------------------------------------------------------
def test_spec_records_the_split_and_stores_combine_only_when_it_agrees(mlp, digits, digits_test, tmp_path):
    kw = dict(projection="factored", projection_dim=1024, seed=4)
    a = cap(mlp, digits.train, tmp_path / "a.zarr", **kw)
    b = cap(mlp, digits.train, tmp_path / "b.zarr", **kw)
    np.testing.assert_array_equal(a.read_grads(), b.read_grads())  # same spec: the same numbers
    assert a.fingerprint == b.fingerprint
    # The plan survives the store's JSON attributes and is part of the fingerprint.
    assert plan_from_spec(a.spec) == plan_from_spec(factored_spec(mlp.model, [n for n, _ in a.spec.layers], 1024, 4))
    assert a.spec.to_dict()["extra"]["factored"]["layers"] == [x.to_dict() for x in plan_from_spec(a.spec)]
    assert "factored projection to 1024 dims" in a.spec.describe()
    assert stored_dim(plan_from_spec(a.spec)) == a.feature_dim == 1024

    # A test store made with another loss (the paper allows any differentiable metric) combines.
    def logit_of_label(out, y):
        return -out.gather(1, y[:, None])[:, 0]

    t = cap(mlp, digits_test, tmp_path / "t.zarr", loss_fn=logit_of_label, **kw)
    assert to.influence(t, a).shape == (len(digits_test), len(digits.train))

    other_seed = cap(mlp, digits_test, tmp_path / "s.zarr", projection="factored", projection_dim=1024, seed=5)
    with pytest.raises(to.IncompatibleStoresError, match="seed"):
        to.influence(other_seed, a)
    dense = cap(mlp, digits_test, tmp_path / "d.zarr", projection="gaussian", projection_dim=1024, seed=4)
    with pytest.raises(to.IncompatibleStoresError, match="kind"):
        to.influence(dense, a)
    # Same width, another split (only the last layer): refused, and the message says why.
    last = cap(mlp, digits_test, tmp_path / "l.zarr", layers=[mlp.last_linear], **kw)
    with pytest.raises(to.IncompatibleStoresError):
        to.influence(last, a)
    s1 = factored_spec(mlp.model, [n for n, _ in a.spec.layers], 1024, 4)
    s2 = factored_spec(mlp.model, [n for n, _ in a.spec.layers], 1000, 4)
    assert s1.fingerprint != s2.fingerprint and "factored differ" in s1.difference(s2)


# ---- misuse ---------------------------------------------------------------------------------------
class TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.body(x.flatten(1)))
        return self.head(h) + F.linear(h, self.head.weight)  # the weight is also used functionally


def test_weight_used_outside_its_module_is_refused(digits, tmp_path):
    model = TiedHead()
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(to.CaptureError, match="head.weight"):
        to.capture(
            model,
            [ckpt],
            digits.train,
            tmp_path / "x.zarr",
            learning_rates=[0.1],
            projection="factored",
            projection_dim=512,
            device="cpu",
        )
    # Only the body selected: its hooks see all of its gradient.
    store = to.capture(
        model,
        [ckpt],
        digits.train,
        tmp_path / "y.zarr",
        learning_rates=[0.1],
        layers=["body"],
        projection="factored",
        projection_dim=512,
        device="cpu",
    )
    assert store.complete and store.feature_dim == 512


class SharedWeights(nn.Module):
    """An embedding tied to the output layer: the shared parameter takes the dense path."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(40, 8)
        self.out = nn.Linear(8, 40)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        return self.out(self.embed(ids).mean(1))


def test_shared_parameters_take_the_dense_path(tmp_path):
    torch.manual_seed(0)
    model = SharedWeights()
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 40, (30, 5), generator=g), torch.randint(0, 40, (30,), generator=g))
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(learning_rates=[1.0], device="cpu")
    fac = to.capture(model, [ckpt], data, tmp_path / "f.zarr", projection="factored", projection_dim=4096, **kw)
    plan = plan_from_spec(fac.spec)
    assert [x.kind for x in plan] == ["dense"] and set(plan[0].params) == {"embed.weight", "out.bias"}
    exact = to.capture(model, [ckpt], data, tmp_path / "e.zarr", **kw)
    assert rel_err(to.self_influence(fac).values, to.self_influence(exact).values) <= 1e-5


class SequenceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.proj(x.transpose(0, 1)).mean(0))  # the Linear sees (tokens, batch, features)


def test_layer_without_batch_first_is_refused(tmp_path):
    model = SequenceFirst()
    data = TensorDataset(torch.randn(8, 3, 4), torch.randint(0, 2, (8,)))
    with pytest.raises(to.CaptureError, match="batch"):
        to.capture(
            model,
            [model.state_dict()],
            data,
            tmp_path / "x.zarr",
            learning_rates=[1.0],
            projection="factored",
            projection_dim=20,
            batch_size=8,
            device="cpu",
        )


@pytest.mark.parametrize(
    "conv, patches",
    [
        (nn.Conv2d(3, 16, 3, stride=2, padding=1), True),  # 9 positions, 16 channels: the batched product
        (nn.Conv2d(3, 4, 3, padding=1, bias=False), False),  # 36 positions, 4 channels: the grouped gradient
        (nn.Conv2d(3, 40, 3, dilation=2, padding="same", padding_mode="reflect"), True),  # 36 positions
        (nn.Conv2d(3, 10, 1), True),  # 1×1: 36 positions, 10 channels
        (nn.Conv2d(3, 2, 1, stride=2), True),  # 1×1, strided: 9 positions, 2 channels, still the product
    ],
    ids=["few-positions", "many-positions", "reflect-dilated", "one-by-one", "one-by-one-strided"],
)
def test_formed_conv_gradients_equal_autograd(conv, patches):
    """Both ways ConvCall forms per-example gradients (chosen by kernel size and positions against output
    channels) equal autograd's, bias row last, and agree with each other, plain and preconditioned."""
    from trackin_ooc.capturing.projection.calls import ConvCall
    from trackin_ooc.capturing.projection.factors import LayerChoice
    from trackin_ooc.capturing.projection.preconditioner import LayerScale

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(5, 3, 6, 6, generator=gen)
    out = conv(x)
    delta = torch.randn(out.shape, generator=gen)
    has_bias = conv.bias is not None
    d_in, d_out = 3 * math.prod(conv.kernel_size) + has_bias, conv.out_channels
    params = ("c.weight", "c.bias") if has_bias else ("c.weight",)
    layer = LayerChoice("conv2d", "c", params, d_in, d_out, "factors").tap_layer()
    ref = []
    for i in range(5):
        conv.zero_grad()
        (conv(x[i : i + 1]) * delta[i : i + 1]).sum().backward()
        g = conv.weight.grad.reshape(d_out, -1).T
        ref.append(torch.cat([g, conv.bias.grad[None]]) if has_bias else g)
    call = ConvCall(layer, conv, x, delta)
    assert call.patches_first(d_out) is patches
    torch.testing.assert_close(call.formed(0, 5), torch.stack(ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call.formed(1, 4), call._grouped(1, 4, delta[1:4]), rtol=1e-5, atol=1e-5)
    p, q = torch.rand(d_out, generator=gen) + 0.5, torch.rand(d_in, generator=gen) + 0.5
    scale = LayerScale(q[:-1] / q[-1], p * q[-1]) if has_bias else LayerScale(q, p)
    scaled = ConvCall(layer, conv, x, delta, scale)
    want = torch.stack(ref) * q[None, :, None] * p[None, None, :]
    torch.testing.assert_close(scaled.formed(0, 5), want, rtol=1e-5, atol=1e-5)
