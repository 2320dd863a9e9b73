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


def test_self_influence_finds_labels_a_model_has_memorised(tmp_path):
    """An MLP trained with AdamW until it fits the flipped labels: their last-checkpoint loss is small and
    misses them; self-influence (Adam-aware, from the checkpoints' moments; exact gradient norms) sums the
    checkpoints at which those examples still had large gradients, and finds them."""
    import functools

    import torch

    from trackin_ooc.demo import digits_mlp, load_digits_split
    from trackin_ooc.demo.pipeline import recall_at
    from trackin_ooc.demo.recipes import Recipe, train_run

    split = load_digits_split(n_train=400, flip_fraction=0.1, seed=0)
    recipe = Recipe(
        make_model=functools.partial(digits_mlp, (128, 128)), optimizer="adamw", lr=3e-3, epochs=50, n_checkpoints=6
    )
    x, y = split.train.tensors
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, checkpoints = train_run(recipe, x, y, tmp_path / "ckpts")
        with torch.no_grad():
            fitted = float((model(x).argmax(1) == y)[torch.from_numpy(split.flipped)].float().mean())
        store = to.capture(
            model,
            checkpoints,
            split.train,
            tmp_path / "train.zarr",
            projection_dim=64,
            projection="factored",
            progress=False,
        )
    finally:
        torch.set_num_threads(previous)
    assert fitted >= 0.8, f"the model fits only {fitted:.0%} of the flipped labels: it has not memorised them"
    assert "adam" in store.spec.describe(), "auto picks the Adam form for AdamW checkpoints"
    si = to.self_influence(store, exact_norms=True, progress=False).values
    loss = store.read_losses()[-1]
    si_recall, loss_recall = recall_at(si, split.flipped, 0.1), recall_at(loss, split.flipped, 0.1)
    assert si_recall >= 0.75 and si_recall >= loss_recall + 0.15, (si_recall, loss_recall)
