"""MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package: 1-D signals of 40 samples, 10 classes.

Nothing is downloaded: ``mnist1d.data.make_dataset`` builds the signals from its templates with a fixed
seed. ``pip install 'trackin-ooc[bench]'`` installs it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .digits import DigitsSplit


def load_mnist1d_split(
    *, n_train: int = 2000, n_test: int = 100, flip_fraction: float = 0.0, seed: int = 0, channel: bool = False
) -> DigitsSplit:
    """``n_train`` training and ``n_test`` test signals; ``flip_fraction`` of the training labels replaced
    by a different, random class. ``channel``: inputs (n, 1, 40) for Conv1d models, else (n, 40)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("MNIST-1D needs the mnist1d package: pip install 'trackin-ooc[bench]'") from e
    args = get_dataset_args()
    args.num_samples = int(np.ceil((n_train + n_test) / args.train_split)) + 1
    args.seed = 42 + seed
    data = make_dataset(args)
    x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"], np.int64)
    xt, yt = np.asarray(data["x_test"], np.float32), np.asarray(data["y_test"], np.int64)
    if len(x) < n_train or len(xt) < n_test:  # pragma: no cover - the sizes above make enough
        raise ValueError(f"MNIST-1D made {len(x)} train and {len(xt)} test signals")
    x, y, xt, yt = x[:n_train], y[:n_train], xt[:n_test], yt[:n_test]
    rng = np.random.default_rng(seed)
    noisy, flipped = y.copy(), np.zeros(n_train, dtype=bool)
    n_flip = int(round(flip_fraction * n_train))
    if n_flip:
        idx = rng.choice(n_train, size=n_flip, replace=False)
        noisy[idx] = (y[idx] + rng.integers(1, 10, size=n_flip)) % 10
        flipped[idx] = True
    shape = (1, 40) if channel else (40,)

    def ds(a, b):
        return TensorDataset(torch.from_numpy(a.reshape(len(a), *shape)).contiguous(), torch.from_numpy(b))

    return DigitsSplit(
        train=ds(x, noisy), test=ds(xt, yt), flipped=flipped, true_train_labels=y, train_images=x, test_images=xt
    )
