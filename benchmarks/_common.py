"""Shared pieces of the capture benchmarks: trained digits models, a 50k-vocabulary text model,
resampled digits, per-row Spearman and a stopwatch."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata
from torch.utils.data import TensorDataset

from trackin_ooc.demo import digits_cnn, digits_mlp, load_digits_split, train_with_checkpoints

DATA = Path(os.environ.get("TRACKIN_BENCH_DATA", Path(__file__).parent / "_data"))


def trained(kind: str, n_checkpoints: int = 3, *, epochs_per_checkpoint: int = 4, n_train: int = 1500):
    """(model, checkpoint paths, digits split) for "mlp" (64-256-256-10, 85k parameters) or "cnn"
    (32 channels, 14.7k), SGD on digits; checkpoints are kept under benchmarks/_data and reused."""
    make = {"mlp": lambda: digits_mlp((256, 256), seed=0), "cnn": lambda: digits_cnn(32, seed=0)}[kind]
    split = load_digits_split(n_train=n_train, seed=0)
    model = make()
    epochs = n_checkpoints * epochs_per_checkpoint
    where = DATA / f"ckpt_{kind}_{n_train}_{n_checkpoints}x{epochs_per_checkpoint}"
    paths = [where / f"epoch_{e:03d}.pt" for e in range(epochs_per_checkpoint, epochs + 1, epochs_per_checkpoint)]
    if all(p.is_file() for p in paths):
        model.load_state_dict(torch.load(paths[-1], weights_only=True)["model_state_dict"])
    else:
        paths = train_with_checkpoints(
            model, split.train, where, epochs=epochs, lr=0.1, checkpoint_every=epochs_per_checkpoint, seed=0
        )
    return model, [str(p) for p in paths], split


def resampled_digits(n: int, *, seed: int, noise: float = 0.05) -> TensorDataset:
    """``n`` digits drawn with replacement from all 1,797, plus Gaussian pixel noise."""
    split = load_digits_split(n_train=1500, seed=0)
    x = torch.cat([split.train.tensors[0], split.test.tensors[0]])
    y = torch.cat([split.train.tensors[1], split.test.tensors[1]])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(y), (n,), generator=g)
    xs = (x[idx] + noise * torch.randn(x[idx].shape, generator=g)).clamp_(0, 1)
    return TensorDataset(xs.contiguous(), y[idx].clone())


def mean_row_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of the Spearman rank correlation of a[i] and b[i]."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    return float(np.mean((ra * rb).sum(1) / np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))))


class Stopwatch:
    """``with sw("name"): ...`` records wall seconds per name."""

    def __init__(self):
        self.t: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
