"""scikit-learn's bundled digits (1,797 real 8×8 images), split, optionally with flipped labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass
class DigitsSplit:
    """Train/test datasets of (1, 8, 8) float images and integer labels."""

    train: TensorDataset
    test: TensorDataset
    flipped: np.ndarray  # bool per train example: its label was replaced by a wrong one
    true_train_labels: np.ndarray
    train_images: np.ndarray  # (n, 8, 8) in [0, 1], for plotting
    test_images: np.ndarray


def _load_sklearn_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the digits examples need scikit-learn: pip install 'trackin-ooc[demo]'") from e
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def load_digits_split(*, n_train: int = 1500, flip_fraction: float = 0.0, seed: int = 0) -> DigitsSplit:
    """Shuffle digits with ``seed``, take ``n_train`` for training and the rest for test.

    ``flip_fraction`` of the training labels are replaced by a different, random class (the
    TracIn paper's mislabel experiment).
    """
    images, labels = _load_sklearn_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    images, labels = images[order], labels[order]
    if not 0 < n_train < len(labels):
        raise ValueError(f"n_train must be between 1 and {len(labels) - 1}")
    tr_img, te_img = images[:n_train], images[n_train:]
    tr_lab, te_lab = labels[:n_train].copy(), labels[n_train:]
    flipped = np.zeros(n_train, dtype=bool)
    n_flip = int(round(flip_fraction * n_train))
    if n_flip:
        idx = rng.choice(n_train, size=n_flip, replace=False)
        offset = rng.integers(1, 10, size=n_flip)
        noisy = tr_lab.copy()
        noisy[idx] = (tr_lab[idx] + offset) % 10
        flipped[idx] = True
    else:
        noisy = tr_lab

    def to_ds(img, lab):
        return TensorDataset(torch.from_numpy(img[:, None]).contiguous(), torch.from_numpy(lab))

    return DigitsSplit(
        train=to_ds(tr_img, noisy),
        test=to_ds(te_img, te_lab),
        flipped=flipped,
        true_train_labels=tr_lab,
        train_images=tr_img,
        test_images=te_img,
    )
