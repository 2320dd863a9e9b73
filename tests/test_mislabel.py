"""The TracIn paper's mislabel experiment on real digits: self-influence finds flipped labels."""

from __future__ import annotations

import numpy as np

import trackin_ooc as to

TOP_FRACTION = 0.20
MIN_RECALL = 0.80


def test_self_influence_finds_flipped_labels(flipped_mlp, flipped_digits, tmp_path):
    split = flipped_digits
    n = len(split.train)
    assert len(flipped_mlp.checkpoints) >= 3
    store = to.capture(flipped_mlp.model, flipped_mlp.checkpoints, split.train, tmp_path / "train.zarr")
    assert store.n_checkpoints == len(flipped_mlp.checkpoints)
    np.testing.assert_allclose(store.learning_rates, flipped_mlp.learning_rate)
    # The store keeps the (noisy) labels it was given.
    np.testing.assert_array_equal(store.labels(), split.train.tensors[1].numpy())
    assert (store.labels() != split.true_train_labels).sum() == split.flipped.sum()

    si = to.self_influence(store)
    assert si.dims == ("example",) and si.sizes["example"] == n
    assert np.all(si.values >= 0)  # a sum of learning-rate-weighted squared norms

    n_top = int(TOP_FRACTION * n)
    suspects = si.sortby(si, ascending=False)["example"].values[:n_top]
    found = int(split.flipped[suspects].sum())
    recall = found / int(split.flipped.sum())
    assert recall >= MIN_RECALL, f"only {found} of {split.flipped.sum()} flipped labels in the top {n_top}"

    # Random ranking would find ~20 %: the signal is real, and flipped examples score higher on average.
    assert np.median(si.values[split.flipped]) > np.quantile(si.values[~split.flipped], 0.9)
