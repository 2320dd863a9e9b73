"""Plain SGD training that saves TracIn checkpoints (state dict + learning rate)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def train_with_checkpoints(
    model: nn.Module,
    dataset: Dataset,
    checkpoint_dir: str | os.PathLike,
    *,
    epochs: int = 30,
    lr: float = 0.1,
    batch_size: int = 32,
    checkpoint_every: int = 5,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> list[Path]:
    """Train with SGD (no momentum) and save ``checkpoint_dir/epoch_XXX.pt`` every few epochs.

    Batches are ``(inputs, targets)`` (cross-entropy) or, Hugging Face style, dicts whose model output
    carries its own ``loss`` (``model(**batch).loss``); ``collate_fn`` pads or stacks them.
    Each file is ``{"model_state_dict": ..., "learning_rate": lr, "epoch": e}``, the format
    :func:`trackin_ooc.capture` reads. Returns the checkpoint paths in order.
    """
    out = Path(checkpoint_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=collate_fn)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    paths: list[Path] = []
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in loader:
            opt.zero_grad()
            loss = model(**batch).loss if isinstance(batch, Mapping) else loss_fn(model(batch[0]), batch[1])
            loss.backward()
            opt.step()
        if epoch % checkpoint_every == 0 or epoch == epochs:
            path = out / f"epoch_{epoch:03d}.pt"
            torch.save({"model_state_dict": model.state_dict(), "learning_rate": lr, "epoch": epoch}, path)
            paths.append(path)
    model.eval()
    return paths
