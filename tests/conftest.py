"""Session fixtures: real digits data and small models trained with SGD, checkpoints on disk.

Everything is trained once per test session (a few seconds on two cores) and shared read-only.
Code that loads weights into a model itself (Captum) gets a new instance from ``TrainedModel.fresh()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trackin_ooc.demo import (
    DigitsSplit,
    digits_cnn,
    digits_mlp,
    load_digits_split,
    train_with_checkpoints,
)

# No progress bars in test output (read by trackin_ooc at call time, also by CLI subprocesses).
os.environ["TRACKIN_OOC_QUIET"] = "1"

# The test models are tiny: one torch thread is as fast, and on a shared two-core machine it avoids
# OpenMP threads spinning against other processes (measured: 3x less CPU for the Captum parity tests).
torch.set_num_threads(int(os.environ.get("TRACKIN_OOC_TEST_TORCH_THREADS", "1")))

# Sizes: small enough that Captum's reference computation and our captures take seconds.
N_TRAIN = 500
N_TEST = 60
MLP_HIDDEN = (64, 64)  # 8,970 parameters; the projection-quality test needs "(64,) or larger"
LEARNING_RATE = 0.1


@dataclass(frozen=True)
class TrainedModel:
    """A model trained by ``train_with_checkpoints`` and what is needed to rebuild it."""

    name: str
    model: nn.Module
    checkpoints: list[Path]
    make: Callable[[], nn.Module]  # a fresh, untrained instance of the same architecture
    last_linear: str  # module name of the final Linear layer (for layer selection)
    learning_rate: float

    def fresh(self) -> nn.Module:
        return self.make()


@pytest.fixture(scope="session")
def digits() -> DigitsSplit:
    """Clean digits: N_TRAIN train examples, the rest test."""
    return load_digits_split(n_train=N_TRAIN, seed=0)


@pytest.fixture(scope="session")
def digits_test(digits) -> TensorDataset:
    """The first N_TEST test examples as a TensorDataset (ids 0..N_TEST-1)."""
    x, y = digits.test.tensors
    return TensorDataset(x[:N_TEST].clone(), y[:N_TEST].clone())


def _train(tmp_path_factory, name, make, dataset, *, epochs, every, last_linear) -> TrainedModel:
    model = make()
    ckpt_dir = tmp_path_factory.mktemp(f"{name}_checkpoints")
    paths = train_with_checkpoints(
        model, dataset, ckpt_dir, epochs=epochs, lr=LEARNING_RATE, checkpoint_every=every, seed=0
    )
    assert len(paths) >= 3, f"fixture {name} needs at least 3 checkpoints, got {len(paths)}"
    assert all(p.is_file() for p in paths)
    return TrainedModel(name, model, paths, make, last_linear, LEARNING_RATE)


@pytest.fixture(scope="session")
def mlp(tmp_path_factory, digits) -> TrainedModel:
    """digits_mlp(hidden=(64, 64)), 12 epochs of SGD, checkpoints at epochs 4, 8, 12."""
    return _train(
        tmp_path_factory, "mlp", lambda: digits_mlp(MLP_HIDDEN, seed=0), digits.train,
        epochs=12, every=4, last_linear=str(2 * len(MLP_HIDDEN) + 1),
    )


@pytest.fixture(scope="session")
def cnn(tmp_path_factory, digits) -> TrainedModel:
    """digits_cnn (two 3x3 convs + Linear), 9 epochs of SGD, checkpoints at epochs 3, 6, 9."""
    return _train(
        tmp_path_factory, "cnn", lambda: digits_cnn(seed=0), digits.train,
        epochs=9, every=3, last_linear="fc",
    )


@pytest.fixture(scope="session")
def flipped_digits() -> DigitsSplit:
    """Digits with 10 % of the 1,500 training labels replaced by a wrong class."""
    split = load_digits_split(n_train=1500, flip_fraction=0.1, seed=0)
    assert split.flipped.sum() == 150
    return split


@pytest.fixture(scope="session")
def flipped_mlp(tmp_path_factory, flipped_digits) -> TrainedModel:
    """digits_mlp(hidden=(64,)) trained with SGD on the flipped labels; checkpoints at 10, 20, 30."""
    return _train(
        tmp_path_factory, "flipped_mlp", lambda: digits_mlp((64,), seed=0), flipped_digits.train,
        epochs=30, every=10, last_linear="3",
    )
