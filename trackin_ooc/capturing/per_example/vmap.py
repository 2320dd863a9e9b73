"""Per-example loss gradients: ``torch.func`` (vmap over grad) with a per-example autograd fallback."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import grad, vmap

from .batches import batched_and_shared, call_functional, join_batched_and_shared, slice_inputs
from .losses import LossFn, default_loss

log = logging.getLogger("trackin_ooc")


class PerExampleGradients:
    """Gradients of each example's own loss with respect to the selected parameters.

    Tries ``vmap(grad(...))`` first; if the model cannot be vmapped (in-place ops on batched
    tensors, data-dependent control flow, ...) it logs why and loops over examples with autograd,
    which gives the same numbers more slowly.
    """

    def __init__(self, model: nn.Module, param_names: Sequence[str], loss_fn: LossFn | None = None):
        self.model = model
        self.param_names = list(param_names)
        self.loss_fn = loss_fn or default_loss
        self.method: str | None = None  # "vmap" or "loop", fixed after the first batch

        def single_loss(selected, rest, batched, shared, positional, y):
            one = {k: v.unsqueeze(0) for k, v in batched.items()} if not positional else \
                tuple(None if v is None else v.unsqueeze(0) for v in batched)
            out = call_functional(self.model, (selected, rest), join_batched_and_shared(one, shared, positional))
            loss = self.loss_fn(out, y.unsqueeze(0)).sum()
            return loss, loss.detach()

        self._single_loss = single_loss

    def _split(self, state: dict[str, torch.Tensor]):
        selected = {n: state[n] for n in self.param_names}
        rest = {k: v for k, v in state.items() if k not in selected}
        return selected, rest

    def __call__(
        self, state: dict[str, torch.Tensor], inputs, targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Return ({name: (batch, *shape)}, losses (batch,)) at the parameters in ``state``."""
        x = inputs
        if self.method in (None, "vmap"):
            try:
                grads, losses = self._vmap(state, x, targets)
                self.method = "vmap"
                return grads, losses
            except Exception as e:  # vmap refuses many models; the loop handles all of them
                if self.method == "vmap":
                    raise
                log.warning("per-example gradients: vmap failed (%s: %s); using the per-example loop",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.method = "loop"
        return self._loop(state, x, targets)

    def _vmap(self, state, inputs, targets):
        batch = targets.shape[0]
        positional = not isinstance(inputs, Mapping)
        batched, shared = batched_and_shared(inputs, batch)
        fn = vmap(grad(self._single_loss, has_aux=True), in_dims=(None, None, 0, None, None, 0))
        return fn(*self._split(state), batched, shared, positional, targets)

    def _loop(self, state, x, targets):
        selected, rest = self._split(state)
        leaves = {n: t.detach().requires_grad_(True) for n, t in selected.items()}
        per_param: dict[str, list[torch.Tensor]] = {n: [] for n in self.param_names}
        losses = []
        for i in range(targets.shape[0]):
            out = call_functional(self.model, (leaves, rest), slice_inputs(x, i, i + 1, targets.shape[0]))
            loss = self.loss_fn(out, targets[i : i + 1]).sum()
            gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            for (n, leaf), g in zip(leaves.items(), gs):
                per_param[n].append(torch.zeros_like(leaf) if g is None else g)
            losses.append(loss.detach())
        return {n: torch.stack(v) for n, v in per_param.items()}, torch.stack(losses)
