"""Which tokens carry an example's gradient: per-token gradient mass at the embedding layer.

For an embedding layer E (vocabulary × width) the per-example gradient is Σ_t e_{token_t} δ_tᵀ, with δ_t
the gradient of the example's loss with respect to the embedding's output at position t. Token t's
share of that gradient is δ_t, so its **gradient mass** is

    mass(t) = Σ_c η_c ‖δ_{c,t}‖²

over the checkpoints, weighted as TracIn weighs them. Where an example's tokens are distinct, the masses
add up to the example's self-influence restricted to the embedding (Σ_c η_c ‖∂ℓ_c/∂E‖²): the tokens with
the largest mass are the ones through which the example moves the embedding most. ``to.show(...,
token_weights=...)`` highlights them. This needs the model and its checkpoints (one forward and backward
per example and checkpoint); stores hold no per-token information.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .examples import ViewError, dataset_of


def _embedding_module(model: Any, name: str | None):
    from torch import nn

    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
            raise ViewError(f"model has no module {name!r}; its embeddings: {', '.join(embeddings) or 'none'}")
        return modules[name]
    found = [(n, m) for n, m in modules.items() if isinstance(m, nn.Embedding)]
    if len(found) != 1:
        names = ", ".join(n for n, _ in found) or "none"
        raise ViewError(
            f"the model has {len(found)} nn.Embedding modules ({names}); name the token embedding with embedding='...'"
        )
    return found[0][1]


def token_gradient_mass(
    model: Any,
    checkpoints: Any,
    data: Any,
    positions: Iterable[int],
    *,
    embedding: str | None = None,
    learning_rates: Sequence[float] | None = None,
    loss_fn: Callable | None = None,
    target_key: str = "labels",
    device: str = "cpu",
) -> dict[int, np.ndarray]:
    """Per-token gradient mass Σ_c η_c ‖∂ℓ_c/∂(embedding output at t)‖² of the examples at ``positions``.

    Parameters
    ----------
    model, checkpoints, learning_rates, loss_fn, target_key
        As in ``to.capture`` (the same checkpoints and loss as the stores).
    data
        The dataset (items as ``capture`` reads them: ``(input_ids, target)`` or a Mapping).
    positions
        Which examples (dataset positions, e.g. the proponents a top-k result lists).
    embedding
        The token embedding's module name; None: the model's only ``nn.Embedding``.
    device
        Where the forward and backward run.

    Returns
    -------
    dict
        position -> float64 array, one value per token of that example (0 where the loss does not see the
        token, e.g. padding). Pass ``{"train": ..., "test": ...}`` of these to ``show(token_weights=)``.

    Raises
    ------
    ViewError
        No (or more than one unnamed) embedding layer.
    CaptureError
        Checkpoints without learning rates, or that do not fit the model.
    """
    import torch
    from torch.utils.data import default_collate

    from ..capturing.checkpoints.loading import load_checkpoints
    from ..capturing.per_example.batches import call_model, split_batch, to_device
    from ..capturing.per_example.losses import default_loss

    module = _embedding_module(model, embedding)
    loaded = load_checkpoints(model, checkpoints, learning_rates)
    ds = dataset_of(data)
    wanted = [int(p) for p in positions]
    loss_of = loss_fn or default_loss
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    mass: dict[int, Any] = {p: None for p in wanted}
    try:
        model.to(device).eval()
        for ckpt in loaded:
            model.load_state_dict(ckpt.state_dict, strict=False)
            for p in wanted:
                inputs, targets = split_batch(default_collate([ds[p]]), target_key)
                seen.clear()
                out = call_model(model, to_device(inputs, device))
                if len(seen) != 1:
                    raise ViewError(
                        f"the embedding ran {len(seen)} times in one forward; name the token embedding "
                        "with embedding='...'"
                    )
                loss = loss_of(out, targets.to(device)).sum()
                (grad,) = torch.autograd.grad(loss, seen[0])
                m = ckpt.learning_rate * grad.detach().double().pow(2).sum(-1).reshape(-1).cpu().numpy()
                mass[p] = m if mass[p] is None else mass[p] + m
    finally:
        hook.remove()
        model.load_state_dict(saved)
        model.train(was_training)
    return {p: np.asarray(v) for p, v in mass.items()}
