"""Zero-argument callables for ``MOD:FN`` options, on scikit-learn's digits.

    trackin-ooc capture --model trackin_ooc.demo.examples:digits_cnn_model \\
        --data trackin_ooc.demo.examples:digits_train --checkpoint ckpt/epoch_030.pt --out train.zarr

The split is the demo's: 1,500 shuffled training digits with 10 % of their labels flipped (seed 0)
and the other 297 as test digits. The ``*_small`` variants take the first 300 training and 100 test
digits of that same split, for quick runs.
"""

from __future__ import annotations

import functools

from torch.utils.data import Subset

from .digits import DigitsSplit, load_digits_split
from .models import digits_cnn, digits_mlp

N_TRAIN = 1500
FLIP_FRACTION = 0.1
SEED = 0
SMALL_TRAIN, SMALL_TEST = 300, 100


@functools.lru_cache(maxsize=4)
def digits_split(n_train: int = N_TRAIN, flip_fraction: float = FLIP_FRACTION, seed: int = SEED) -> DigitsSplit:
    """The demo's split (cached: every callable below sees the same examples)."""
    return load_digits_split(n_train=n_train, flip_fraction=flip_fraction, seed=seed)


def digits_train():
    """1,500 training digits, 10 % with flipped labels."""
    return digits_split().train


def digits_test():
    """The 297 held-out test digits (true labels)."""
    return digits_split().test


def digits_train_small():
    """The first 300 of :func:`digits_train`."""
    return Subset(digits_split().train, range(SMALL_TRAIN))


def digits_test_small():
    """The first 100 of :func:`digits_test`."""
    return Subset(digits_split().test, range(SMALL_TEST))


def digits_cnn_model():
    """The demo's small CNN (two 3×3 convolutions and a linear layer), freshly initialised."""
    return digits_cnn()


def digits_mlp_model():
    """A 64-32-10 MLP, freshly initialised."""
    return digits_mlp((32,))


# ---- retraining (trackin-ooc retrain --train-fn ...) --------------------------------------------
RETRAIN_EPOCHS = 30


def digits_mlp_recipe():
    """The recipe :func:`digits_retrain_small` retrains with: the 64-32-10 MLP, plain SGD."""
    from .recipes import Recipe

    return Recipe(
        make_model=functools.partial(digits_mlp, (32,)), optimizer="sgd", lr=0.1, epochs=RETRAIN_EPOCHS, n_checkpoints=2
    )


def digits_retrain_small(indices, seed):
    """``train_fn`` for ``trackin-ooc retrain --n-train 300``: the MLP trained on those of the first 300
    training digits, returning its losses on the 100 test digits of :func:`digits_test_small`."""
    from .recipes import RetrainFn

    x, y = digits_split().train.tensors
    xt, yt = digits_split().test.tensors
    fn = RetrainFn(digits_mlp_recipe(), x[:SMALL_TRAIN], y[:SMALL_TRAIN], xt[:SMALL_TEST], yt[:SMALL_TEST])
    return fn(indices, seed)
