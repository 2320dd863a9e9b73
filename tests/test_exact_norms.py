"""Exact self-influence from any capture: the squared gradient norms stored next to the features.

Compared with the self-influence of an exact (unprojected) capture, which tests/test_captum_parity.py
ties to Captum: the same numbers within float32 rounding for factored (Linear, Conv2d, Embedding with
sequences and repeated tokens) and dense projections.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trackin_ooc as to
from trackin_ooc.capturing.per_example.norms import factored_sq_norms
from trackin_ooc.demo import train_with_checkpoints
from trackin_ooc.demo.text import TokenClassifier, token_data

from .test_cli import ok, run_cli


def exact_self_influence(model, ckpts, data, path) -> np.ndarray:
    return to.self_influence(to.capture(model, ckpts, data, path)).values


@pytest.mark.parametrize("which", ["mlp", "cnn"])
@pytest.mark.parametrize(("projection", "dim"), [("factored", 256), ("gaussian", 64)])
def test_exact_norms_give_the_exact_self_influence(which, projection, dim, request, digits, tmp_path, captured):
    trained = request.getfixturevalue(which)
    want = to.self_influence(captured(which, "train")).values  # the session's exact store (conftest.py)
    store = to.capture(
        trained.model, trained.checkpoints, digits.train, tmp_path / "p.zarr", projection=projection, projection_dim=dim
    )
    assert store.has_exact_norms
    got = to.self_influence(store, exact_norms=True)
    np.testing.assert_allclose(got.values, want, rtol=1e-5)
    assert got.attrs["exact_norms"] is True
    projected = to.self_influence(store).values  # the features' norms: close, not equal
    assert not np.allclose(projected, want, rtol=1e-5)


def test_embedding_and_sequence_layers(tmp_path):
    """Embedding (tokens repeat within a sequence) and a Linear over 16 positions: Gram matrices."""
    torch.manual_seed(0)
    model = TokenClassifier()
    data = token_data(120, seed=0)
    x, y = data.tensors
    x[:, 1] = x[:, 0]  # a repeated token in every sequence: the embedding rows add up
    ckpts = train_with_checkpoints(model, data, tmp_path / "ckpt", epochs=2, checkpoint_every=1, lr=0.5, seed=0)
    want = exact_self_influence(model, ckpts, data, tmp_path / "exact.zarr")
    store = to.capture(model, ckpts, data, tmp_path / "f.zarr", projection="factored", projection_dim=512)
    np.testing.assert_allclose(to.self_influence(store, exact_norms=True).values, want, rtol=1e-4)


def test_gram_chunks_agree_with_one_pass(monkeypatch):
    """Long sequences are done in batch chunks of Gram matrices; the chunking changes nothing."""
    from trackin_ooc.capturing.per_example import norms

    g = torch.Generator().manual_seed(1)
    a, d = torch.randn(9, 7, 5, generator=g), torch.randn(9, 7, 3, generator=g)
    explicit = torch.einsum("bti,bto->bio", torch.cat([a, torch.ones(9, 7, 1)], 2), d).pow(2).sum((1, 2))
    whole = factored_sq_norms([a], [d], bias=True, embedding=False)
    monkeypatch.setattr(norms, "GRAM_ELEMENTS", 50)  # one example per chunk
    np.testing.assert_allclose(
        factored_sq_norms([a[:, :3], a[:, 3:]], [d[:, :3], d[:, 3:]], bias=True, embedding=False), explicit, rtol=1e-5
    )
    np.testing.assert_allclose(whole, explicit, rtol=1e-5)


def test_a_store_without_norms_says_so(tmp_path):
    store = to.from_arrays(tmp_path / "s.zarr", np.ones((1, 4, 3), np.float32), [0.1])
    with pytest.raises(to.StoreError, match="no exact gradient norms"):
        to.self_influence(store, exact_norms=True)


def test_cli_exact_norms(mlp, digits, tmp_path):
    store = to.capture(
        mlp.model, mlp.checkpoints, digits.train, tmp_path / "s.zarr", projection="factored", projection_dim=128
    )
    ok(run_cli("self-influence", "s.zarr", "--exact-norms", "--out", "si.csv", cwd=tmp_path))
    import pandas as pd

    table = pd.read_csv(tmp_path / "si.csv")
    want = to.self_influence(store, exact_norms=True)
    got = table.set_index("example").loc[want.example.values, "self_influence"].to_numpy()
    np.testing.assert_allclose(got, want.values, rtol=1e-6)
