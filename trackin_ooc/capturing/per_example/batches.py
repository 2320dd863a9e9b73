"""Model inputs as batches come: a tensor, a tuple of tensors (positional arguments), or a Mapping of
keyword arguments (Hugging Face style, ``model(**batch)``).

Every place that calls the model, slices a batch or moves it to a device goes through these, so a
model that takes dicts works on every capture path (vmap, the hooked batch, the per-example loop,
the factored hooks).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ...errors import CaptureError

# A batch's model inputs: one tensor, positional tensors, or keyword arguments.
Inputs = torch.Tensor | tuple | Mapping[str, Any]


def call_model(model: nn.Module, inputs: Inputs):
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)``, as the inputs come."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def call_functional(model: nn.Module, state: Mapping[str, torch.Tensor] | tuple, inputs: Inputs):
    """``torch.func.functional_call`` of ``model`` at ``state`` (a dict, or a tuple of dicts) on ``inputs``."""
    states: Any = dict(state) if isinstance(state, Mapping) else tuple(state)
    if isinstance(inputs, Mapping):
        return functional_call(model, states, (), dict(inputs))
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, states, tuple(inputs))
    return functional_call(model, states, (inputs,))


def split_batch(item, target_key: str = "labels") -> tuple[Inputs, torch.Tensor]:
    """(inputs, targets) of one collated batch: ``(inputs, targets)`` or a Mapping holding ``target_key``."""
    if isinstance(item, Mapping):
        if target_key not in item:
            keys = ", ".join(repr(k) for k in item) or "none"
            raise CaptureError(
                f"the batch has no {target_key!r} entry (keys: {keys}); give the targets under "
                f"{target_key!r} or name their key with target_key= (--target-key)"
            )
        return {k: v for k, v in item.items() if k != target_key}, torch.as_tensor(item[target_key])
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise CaptureError(
            f"each batch must be (inputs, targets) or a dict holding the targets under {target_key!r}, "
            f"got {type(item).__name__}; wrap the dataset to yield one of these"
        )
    inputs, targets = item
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    return inputs, torch.as_tensor(targets)


def to_device(inputs: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    """The tensors of ``inputs`` on ``device`` (other values of a Mapping unchanged)."""
    if isinstance(inputs, Mapping):
        return {
            k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for k, v in inputs.items()
        }
    if isinstance(inputs, (tuple, list)):
        return tuple(t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t for t in inputs)
    return inputs.to(device, non_blocking=non_blocking)


def _is_batched(value, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch


def slice_inputs(inputs: Inputs, start: int, stop: int, batch: int) -> Inputs:
    """Examples ``start:stop`` of a batch of ``batch`` examples.

    Only tensors whose first dimension is the batch are sliced; anything else (a shared (1, T) position
    tensor, a flag) is passed on as it is, as the model would broadcast it.
    """
    if isinstance(inputs, Mapping):
        return {k: (v[start:stop] if _is_batched(v, batch) else v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(t[start:stop] if _is_batched(t, batch) else t for t in inputs)
    return inputs[start:stop]


def batched_and_shared(inputs: Inputs, batch: int) -> tuple[Inputs, Inputs]:
    """Split ``inputs`` into (tensors with the batch first, everything else) for ``torch.func.vmap``.

    For a Mapping both parts are dicts; for positional inputs both are tuples of the same length
    with ``None`` where the other part holds the value.
    """
    if isinstance(inputs, Mapping):
        by_key = {k: v for k, v in inputs.items() if _is_batched(v, batch)}
        return by_key, {k: v for k, v in inputs.items() if k not in by_key}
    seq = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    batched = tuple(t if _is_batched(t, batch) else None for t in seq)
    shared = tuple(None if _is_batched(t, batch) else t for t in seq)
    return batched, shared


def join_batched_and_shared(batched: Inputs, shared: Inputs, positional: bool) -> Inputs:
    """Inverse of :func:`batched_and_shared` (``positional``: the inputs were a tensor or a tuple)."""
    if not positional:
        assert isinstance(shared, Mapping) and isinstance(batched, Mapping)
        return {**shared, **batched}
    assert isinstance(shared, tuple) and isinstance(batched, tuple)
    return tuple(b if b is not None else s for b, s in zip(batched, shared))


__all__ = [
    "Inputs",
    "call_model",
    "call_functional",
    "split_batch",
    "to_device",
    "slice_inputs",
    "batched_and_shared",
    "join_batched_and_shared",
]
