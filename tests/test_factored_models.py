"""Factored projection on the architectures users bring: a BatchNorm ResNet at 32×32, Hugging Face BERT
(padded dict batches, position ids shared by the batch) and GPT-2 (Conv1D layers, tied head, causal LM loss).

For each, a factored capture must be the factored map of the exact per-example gradients (an exact
capture, itself checked against autograd in tests/test_hooked_gradients.py), rank like exact influence,
store exact gradient norms, and use batched methods only (never the per-example loop).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import trackin_ooc as to
from trackin_ooc.capturing.projection import factored_plan, hooks
from trackin_ooc.capturing.projection.factored import (
    FactorLayer,
    factored_spec,
    plan_from_spec,
    project_gradients,
)
from trackin_ooc.capturing.projection.hooks import FactoredFeatures
from trackin_ooc.demo import architectures as arch
from trackin_ooc.demo import load_digits_split, train_with_checkpoints

from .test_factored import mean_row_spearman, rel_err

N_TRAIN, N_TEST = 64, 16


def _digits():
    return load_digits_split(n_train=200, seed=5)


def _resnet(root):
    split = _digits()
    train_all, test_all = arch.digits_rgb32(split.train), arch.digits_rgb32(split.test)
    model = arch.cifar_resnet(seed=0)
    ckpts = train_with_checkpoints(
        model, Subset(train_all, range(128)), root / "ckpt", epochs=3, lr=0.05, batch_size=16, checkpoint_every=1
    )
    return dict(
        make=lambda: arch.cifar_resnet(seed=0),
        ckpts=ckpts,
        dim=4096,
        min_spearman=0.95,
        train=Subset(train_all, range(N_TRAIN)),
        test=Subset(test_all, range(N_TEST)),
        data=lambda ds: ds,
    )


def _hf(root, task):
    split = _digits()
    train_all = arch.digit_token_dicts(split.train, task=task)
    test_all = arch.digit_token_dicts(split.test, task=task)
    make = arch.tiny_bert if task == "classify" else arch.tiny_gpt2
    ckpts = arch.train_dict_batches(
        make(), Subset(train_all, range(128)), root / "ckpt", epochs=3, lr=0.05, batch_size=16, checkpoint_every=1
    )
    return dict(
        make=make,
        ckpts=ckpts,
        dim=2048,
        min_spearman=0.9,
        train=Subset(train_all, range(N_TRAIN)),
        test=Subset(test_all, range(N_TEST)),
        data=lambda ds: DataLoader(ds, batch_size=16, collate_fn=arch.pad_collate),
    )


BUILDERS = {"resnet": _resnet, "bert": lambda root: _hf(root, "classify"), "gpt2": lambda root: _hf(root, "lm")}


@pytest.fixture(scope="module", params=list(BUILDERS))
def stores(request, tmp_path_factory):
    """Exact and factored stores of the train and test examples, with the model case."""
    root = tmp_path_factory.mktemp(request.param)
    case = BUILDERS[request.param](root)
    out = dict(case, name=request.param)
    kw = dict(device="cpu", batch_size=16)
    for split in ("train", "test"):
        data = case["data"](case[split])
        out[f"exact_{split}"] = to.capture(case["make"](), case["ckpts"], data, root / f"exact_{split}.zarr", **kw)
        out[f"factored_{split}"] = to.capture(
            case["make"](),
            case["ckpts"],
            data,
            root / f"factored_{split}.zarr",
            projection="factored",
            projection_dim=case["dim"],
            seed=1,
            **kw,
        )
    return out


def split_flat(spec, flat: np.ndarray) -> dict[str, torch.Tensor]:
    """(N, D) exact gradients as {parameter: (N, *shape)} in the exact spec's layer order."""
    out, start = {}, 0
    for name, shape in spec.layers:
        size = math.prod(shape)
        out[name] = torch.from_numpy(flat[:, start : start + size].reshape(len(flat), *shape).copy())
        start += size
    return out


def test_factored_capture_is_the_factor_map_of_exact_gradients(stores):
    exact, fac = stores["exact_train"], stores["factored_train"]
    assert fac.feature_dim == stores["dim"]
    for c in range(exact.n_checkpoints):
        want = project_gradients(fac.spec, split_flat(exact.spec, exact.read_grads(checkpoint=c))).numpy()
        assert rel_err(fac.read_grads(checkpoint=c), want) <= 1e-4, f"{stores['name']}, checkpoint {c}"
    # Exact squared norms through the factored capture (Gram or formed, per layer and batch).
    np.testing.assert_allclose(
        to.self_influence(fac, exact_norms=True).values, to.self_influence(exact).values, rtol=1e-4
    )
    # Batched methods only: hooked factored layers, the dense group by hooks, never vmap or the loop.
    methods = fac.attrs["per_example_methods"]
    assert set(methods.values()) <= {"factored", "hooks"}, methods


def test_factored_ranks_like_exact_influence(stores):
    exact = to.influence(stores["exact_test"], stores["exact_train"]).values
    fac = to.influence(stores["factored_test"], stores["factored_train"]).values
    rho = mean_row_spearman(fac, exact)
    assert rho >= stores["min_spearman"], f"{stores['name']}: mean per-row Spearman {rho:.3f}"


def test_plans_of_the_real_layers(stores):
    plan = {x.module or "dense": x for x in plan_from_spec(stores["factored_train"].spec)}
    assert stores["factored_test"].fingerprint == stores["factored_train"].fingerprint
    dense = set(plan["dense"].params)
    if stores["name"] == "resnet":
        # Convolutions at 32×32, 16×16 and 8×8 form their gradients; BatchNorm affine goes to the dense group.
        assert all(plan[m].formed for m in ("stages.0.0.conv1", "stages.1.0.conv2", "stages.2.0.conv2"))
        norms = {
            f"{m}.{p}"
            for m, mod in stores["make"]().named_modules()
            if isinstance(mod, nn.BatchNorm2d)
            for p in ("weight", "bias")
        }
        assert dense == norms
    elif stores["name"] == "bert":
        # Position ids of shape (1, T): the embedding is factored (its output expanded per example).
        assert plan["bert.embeddings.position_embeddings"].kind == "embedding"
        assert plan["bert.encoder.layer.0.attention.self.query"].kind == "linear"
        assert all("LayerNorm" in n for n in dense)
    else:
        assert plan["transformer.h.0.attn.c_attn"].kind == "hf_conv1d"
        assert plan["transformer.h.1.mlp.c_proj"].kind == "hf_conv1d"
        assert plan["transformer.wpe"].kind == "embedding"
        # wte is also lm_head's weight: never factored, it takes the dense group (hooked over both uses).
        assert "transformer.wte.weight" in dense


# ---- the two ways of computing a wide layer's features -------------------------------------------
@pytest.mark.parametrize("force", ["per position", "formed"])
def test_per_position_and_formed_computation_agree(force, monkeypatch):
    """The hooks pick, per batch, how to compute a layer's factor map; both ways give the same numbers."""
    monkeypatch.setattr(factored_plan, "HASH_ELEMENTS", 0)  # wide factor maps only: computable either way
    monkeypatch.setattr(factored_plan, "DENSE_ELEMENTS", 0)
    torch.manual_seed(0)
    model = arch.cifar_resnet((8, 16, 16), seed=0).eval()
    names = [n for n, _ in model.named_parameters()]
    spec = factored_spec(model, names, 600, 2)
    assert not any(x.formed or x.hashed_whole for x in plan_from_spec(spec) if x.kind != "dense")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))

    def run():
        with FactoredFeatures(model, spec) as feats:
            f, _, sq = feats.one(feats.prepare(state), x, y)
            return f, sq, dict(feats.paths)

    natural = run()
    original = FactorLayer.cost

    def forced(layer, positions):
        per, formed = original(layer, positions)
        return (0.0, math.inf) if force == "per position" else (math.inf, 0.0)

    monkeypatch.setattr(FactorLayer, "cost", forced)
    monkeypatch.setattr(hooks, "norm_cost", lambda *a: ("gram", 0.0) if force == "per position" else ("formed", 0.0))
    f, sq, paths = run()
    assert set(paths.values()) == {force}
    assert rel_err(f, natural[0]) <= 1e-5
    np.testing.assert_allclose(sq, natural[1], rtol=1e-4)
