"""Losses and model outputs: what a per-example loss is computed from.

A model may return a tensor, a tuple (its first element holds the logits) or an object or Mapping with
``logits`` (a Hugging Face ``ModelOutput``). A custom ``loss_fn(outputs, targets) -> (batch,)`` gets
the output as it is; the default loss (:func:`default_loss`) reads the logits and picks per-example
cross-entropy or, for sequence logits, the causal language-modelling loss summed over tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from ...errors import CaptureError

LossFn = Callable[[object, torch.Tensor], torch.Tensor]

# Targets the causal LM loss ignores (Hugging Face's convention, also padding in its collators).
IGNORE_INDEX = -100


def model_output_logits(outputs) -> torch.Tensor:
    """The logits of a model output: a tensor, a tuple's first element, or ``logits`` of an object/Mapping."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise CaptureError(
        f"cannot find logits in the model's output ({type(outputs).__name__}); return a tensor, a tuple whose "
        "first element is the logits, or an object with .logits, or pass loss_fn=(outputs, targets) -> losses"
    )


def cross_entropy(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy of logits (B, C) against class indices (B,)."""
    return F.cross_entropy(model_output_logits(outputs), targets, reduction="none")


def causal_lm_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Per-example next-token loss as Hugging Face defines it (position t predicts token t+1, targets
    -100 ignored), summed over the tokens of each example: logits (B, T, V), targets (B, T) → (B,)."""
    logits = model_output_logits(outputs)
    shifted = logits[:, :-1, :]
    labels = targets[:, 1:]
    per_token = F.cross_entropy(shifted.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return per_token.sum(1)


def default_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """The loss when ``loss_fn`` is None: cross-entropy for logits (B, C) and integer targets (B,), the
    causal LM loss summed over tokens for logits (B, T, V) and targets (B, T); anything else refused."""
    logits = model_output_logits(outputs)
    integer = not torch.is_floating_point(targets) and not torch.is_complex(targets) and targets.dtype != torch.bool
    if logits.ndim == 2 and targets.ndim == 1 and integer and logits.shape[0] == targets.shape[0]:
        return cross_entropy(logits, targets)
    if logits.ndim == 3 and targets.ndim == 2 and integer and logits.shape[:2] == targets.shape:
        return causal_lm_loss(logits, targets)
    raise CaptureError(
        f"no default loss for logits of shape {tuple(logits.shape)} with {targets.dtype} targets of shape "
        f"{tuple(targets.shape)} (it needs logits (B, C) with integer targets (B,), or logits (B, T, V) with "
        "integer targets (B, T)); pass loss_fn=(outputs, targets) -> per-example losses of shape (B,)"
    )


def check_losses(losses: torch.Tensor, batch: int) -> torch.Tensor:
    """``losses`` if it holds one loss per example, else a one-line error."""
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise CaptureError(
            f"loss_fn returned shape {shape}; it must return one loss per example, shape ({batch},) "
            "(use reduction='none')"
        )
    return losses


def as_tuple(inputs) -> tuple[torch.Tensor, ...]:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
