"""Exact TracInCP agrees with Captum's reference implementation on real digits models.

Captum's ``TracInCP`` with ``sample_wise_grads_per_batch=True`` and a "sum" cross-entropy computes
the same per-example gradients as ``to.capture`` (projection_dim=None); influence, self-influence
and top-5 proponents/opponents must match it within 1e-4 of the largest magnitude.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from captum.influence import TracInCP
from torch import nn

import trackin_ooc as to

RTOL = 1e-4  # relative to the largest absolute value of Captum's result
K = 5


def load_checkpoint(model: nn.Module, path: str) -> float:
    """Captum's checkpoints_load_func: load the weights, return the learning rate."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model_state_dict"])
    return float(ckpt["learning_rate"])


def captum_results(trained, train_ds, test_ds, layers=None) -> dict[str, np.ndarray]:
    """Captum's influence matrix, self-influence and top-K proponents/opponents."""
    tracin = TracInCP(
        trained.fresh(),  # Captum loads every checkpoint into this model itself
        train_ds,
        [str(p) for p in trained.checkpoints],
        checkpoints_load_func=load_checkpoint,
        layers=layers,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=128,
        sample_wise_grads_per_batch=True,
    )
    batch = tuple(test_ds.tensors)  # (x, y): Captum takes the labels last
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Input Tensor 0 did not already require gradients"
        inf = tracin.influence(batch)
        self_inf = tracin.self_influence()
        prop = tracin.influence(batch, k=K, proponents=True)
        opp = tracin.influence(batch, k=K, proponents=False)
    return {
        "influence": inf.detach().numpy(),
        "self_influence": self_inf.detach().numpy(),
        "proponent_index": prop[0].numpy(),
        "proponent_score": prop[1].detach().numpy(),
        "opponent_index": opp[0].numpy(),
        "opponent_score": opp[1].detach().numpy(),
    }


def assert_close(ours, ref, what: str, scale: float | None = None) -> None:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs Captum {ref.shape}"
    scale = float(np.abs(ref).max()) if scale is None else scale
    assert scale > 0, f"{what}: Captum's values are all zero, the comparison would be vacuous"
    err = float(np.abs(ours - ref).max()) / scale
    assert err <= RTOL, f"{what}: max relative error {err:.2e} > {RTOL:.0e}"


def assert_topk_matches(index, score, ref_index, ref_score, ref_full, what: str) -> None:
    """Same ranks as Captum's top-k; an index may differ only where Captum's scores tie within RTOL."""
    scale = float(np.abs(ref_full).max())
    assert index.shape == ref_index.shape == (ref_full.shape[0], K), what
    assert_close(score, ref_score, f"{what} scores", scale)
    for row in range(index.shape[0]):
        assert len(set(index[row].tolist())) == K, f"{what}: repeated index in test row {row}"
    # Where an index differs from Captum's, our pick must score the same as Captum's pick (a tie).
    rows, ranks = np.nonzero(index != ref_index)
    picked = ref_full[rows, index[rows, ranks]]
    gap = np.abs(picked - ref_score[rows, ranks]) / scale
    assert np.all(gap <= RTOL), f"{what}: {len(rows)} ranks pick a different train example than Captum"
    assert len(rows) <= 0.02 * index.size, f"{what}: {len(rows)} of {index.size} ranks differ from Captum"


def check_parity(model_name, train_ds, test_ds, captum_reference, captured, layers=None):
    """Our exact stores of ``train_ds``/``test_ds`` (device="cpu": Captum runs on the CPU, and a GPU's TF32
    convolutions would not meet 1e-4; captured once per session, conftest.py) against Captum's results."""
    ref = captum_reference(model_name, layers)
    kw = {"layers": layers} if layers else {}
    test, train = captured(model_name, "test", **kw), captured(model_name, "train", **kw)
    assert train.n_examples == len(train_ds) and test.n_examples == len(test_ds)

    inf = to.influence(test, train)
    assert inf.dims == ("test", "train")
    assert inf.shape == (len(test_ds), len(train_ds))
    np.testing.assert_array_equal(inf["train"].values, np.arange(len(train_ds)))
    np.testing.assert_array_equal(inf["test"].values, np.arange(len(test_ds)))
    assert_close(inf.values, ref["influence"], "influence")

    si = to.self_influence(train)
    assert si.dims == ("example",)
    np.testing.assert_array_equal(si["example"].values, np.arange(len(train_ds)))
    assert_close(si.values, ref["self_influence"], "self_influence")

    best = to.top_k(test, train, k=K)
    assert best.sizes == {"test": len(test_ds), "rank": K}
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
    # Proponents descend, opponents ascend.
    assert np.all(np.diff(best.proponent_score.values, axis=1) <= 0)
    assert np.all(np.diff(best.opponent_score.values, axis=1) >= 0)
    return test, train


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
def test_all_parameters_match_captum(model_name, digits, digits_test, captum_reference, captured):
    check_parity(model_name, digits.train, digits_test, captum_reference, captured)


@pytest.mark.parametrize(
    "model_name, layer",
    [("mlp", None), ("cnn", None), ("cnn", "conv2")],
    ids=["mlp-last-linear", "cnn-last-linear", "cnn-conv2"],
)
def test_one_layer_matches_captum(request, model_name, layer, digits, digits_test, captum_reference, captured):
    trained = request.getfixturevalue(model_name)
    layer = layer or trained.last_linear
    _, store = check_parity(model_name, digits.train, digits_test, captum_reference, captured, layers=[layer])
    # The layer selection really restricted the gradients: only that module's parameters.
    module = dict(trained.model.named_modules())[layer]
    assert store.feature_dim == sum(p.numel() for p in module.parameters())
    assert {name for name, _ in store.spec.layers} == {f"{layer}.weight", f"{layer}.bias"}
