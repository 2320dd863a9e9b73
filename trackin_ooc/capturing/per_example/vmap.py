"""Per-example gradients of any parameters: ``torch.func`` (vmap over grad), and a per-example autograd
loop for models that vmap refuses (the last resort: exact, but one forward and backward per example).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from .batches import Inputs, batched_and_shared, call_functional, join_batched_and_shared, slice_inputs
from .losses import LossFn, check_losses


def _split(state: Mapping[str, torch.Tensor], names: Sequence[str]):
    selected = {n: state[n] for n in names}
    rest = {k: v for k, v in state.items() if k not in selected}
    return selected, rest


def vmap_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    state: Mapping[str, torch.Tensor],
    names: Sequence[str],
    inputs: Inputs,
    targets: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({name: (B, *shape)}, losses (B,)) by ``vmap(grad(loss of one example))``; raises what vmap raises."""
    positional = not isinstance(inputs, Mapping)
    batched, shared = batched_and_shared(inputs, targets.shape[0])

    def one_loss(selected, rest, example, y):
        one = (
            tuple(None if v is None else v.unsqueeze(0) for v in example)
            if positional
            else {k: v.unsqueeze(0) for k, v in example.items()}
        )
        out = call_functional(model, (selected, rest), join_batched_and_shared(one, shared, positional))
        loss = check_losses(loss_fn(out, y.unsqueeze(0)), 1).sum()
        return loss, loss.detach()

    fn: Any = vmap(grad(one_loss, has_aux=True), in_dims=(None, None, 0, 0))  # torch types it with no arguments
    return fn(*_split(state, names), batched, targets)


def loop_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    state: Mapping[str, torch.Tensor],
    names: Sequence[str],
    inputs: Inputs,
    targets: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The same as :func:`vmap_gradients`, one example at a time with autograd."""
    selected, rest = _split(state, names)
    leaves = {n: t.detach().requires_grad_(True) for n, t in selected.items()}
    per_param: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    losses = []
    batch = targets.shape[0]
    for i in range(batch):
        with torch.enable_grad():
            out = call_functional(model, (leaves, rest), slice_inputs(inputs, i, i + 1, batch))
            loss = check_losses(loss_fn(out, targets[i : i + 1]), 1).sum()
            gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for (n, leaf), g in zip(leaves.items(), gs):
            per_param[n].append(torch.zeros_like(leaf) if g is None else g)
        losses.append(loss.detach())
    return {n: torch.stack(v) for n, v in per_param.items()}, torch.stack(losses)


def __getattr__(name: str):
    # PerExampleGradients (which picks among hooks, vmap and the loop) lives in .gradients.
    if name == "PerExampleGradients":
        from .gradients import PerExampleGradients

        return PerExampleGradients
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
