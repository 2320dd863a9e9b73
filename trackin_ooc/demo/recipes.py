"""Training recipes that save TracIn checkpoints with optimizer state, and retrain on subsets for the LDS.

    recipe = Recipe(make_model=functools.partial(digits_mlp, (64,)), optimizer="adamw", lr=2e-3, epochs=20)
    model, checkpoints = train_run(recipe, x, y, "ckpts")           # 6 checkpoints with AdamW moments
    runs = to.retrain(RetrainFn(recipe, x, y, x_test, y_test), len(x))   # test losses of 64 half-data models

Checkpoints are ``{"model_state_dict", "optimizer_state_dict", "learning_rate", "epoch"}``: what
:func:`trackin_ooc.capture` reads, moments included (``preconditioner="adam"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Recipe:
    """How one model is trained: architecture, optimizer, schedule (constant learning rate)."""

    make_model: Callable[..., nn.Module]  # make_model(seed=...) -> a freshly initialised model
    optimizer: str = "sgd"  # "sgd" (plain, no momentum) or "adamw"
    lr: float = 0.1
    epochs: int = 24
    batch_size: int = 32
    weight_decay: float = 0.0
    n_checkpoints: int = 6

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)

    def checkpoint_epochs(self) -> list[int]:
        """Epochs after which a checkpoint is saved: ``n_checkpoints`` evenly spaced, the last one last."""
        n = max(1, min(self.n_checkpoints, self.epochs))
        return sorted({int(round(self.epochs * (i + 1) / n)) for i in range(n)})


def train_run(
    recipe: Recipe, x: torch.Tensor, y: torch.Tensor, checkpoint_dir: str | os.PathLike | None = None, *, seed: int = 0
) -> tuple[nn.Module, list[Path]]:
    """Train ``recipe`` on (x, y) from ``seed``; save checkpoints to ``checkpoint_dir`` if given.

    Deterministic on the CPU for a given seed (initialisation and batch order both follow it).
    """
    torch.manual_seed(seed)
    model = recipe.make_model(seed=seed)
    opt = recipe.make_optimizer(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    save_at = set(recipe.checkpoint_epochs()) if checkpoint_dir is not None else set()
    out = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    n = len(x)
    for epoch in range(1, recipe.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        if out is not None and epoch in save_at:
            path = out / f"epoch_{epoch:03d}.pt"
            torch.save(
                {
                    "model_state_dict": model.state_dict(),
                    "optimizer_state_dict": opt.state_dict(),
                    "learning_rate": recipe.lr,
                    "epoch": epoch,
                },
                path,
            )
            paths.append(path)
    model.eval()
    return model, paths


def example_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example cross-entropy of ``model`` on (x, y), float64."""
    model.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), y, reduction="none").double().numpy()


class RetrainFn:
    """``train_fn(indices, seed)`` for :func:`trackin_ooc.retrain`: ``recipe`` on the training examples at
    ``indices``, returning the test losses. Picklable (runs on cluster workers); torch held to
    ``torch_threads`` threads while it trains (small models gain nothing from more)."""

    def __init__(
        self,
        recipe: Recipe,
        x: torch.Tensor,
        y: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        *,
        torch_threads: int | None = 1,
    ):
        self.recipe, self.x, self.y, self.x_test, self.y_test = recipe, x, y, x_test, y_test
        self.torch_threads = torch_threads

    def __call__(self, indices: np.ndarray, seed: int) -> np.ndarray:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        previous = torch.get_num_threads()
        if self.torch_threads:
            torch.set_num_threads(int(self.torch_threads))
        try:
            model, _ = train_run(self.recipe, self.x[idx], self.y[idx], seed=int(seed))
            return example_losses(model, self.x_test, self.y_test)
        finally:
            torch.set_num_threads(previous)
