"""Fit a stored state dict to the model it is loaded into, the way ``load_state_dict`` and Hugging Face's
``from_pretrained`` would, so that any state dict a training run wrote works:

- tied weights stored once (safetensors keeps one of GPT-2's ``lm_head.weight`` / ``transformer.wte.weight``)
  are filled from their twin;
- entries the model does not keep are dropped: non-persistent buffers (older files stored GPT-2's attention
  masks) and the names a Hugging Face model lists in ``_keys_to_ignore_on_load_unexpected``;
- BatchNorm's ``num_batches_tracked`` (absent from files older than PyTorch 0.4.1) is taken from the model;
- a prefix that every key (or exactly one block of keys) carries, such as a LightningModule's ``model.``,
  DDP's ``module.`` or ``torch.compile``'s ``_orig_mod.``, is stripped when that makes the keys fit;
- floating tensors are cast to the model's dtype (a bfloat16 file loads into a float32 model).

Anything else that does not fit is a one-line :class:`CheckpointError`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError

BATCHNORM_COUNTER = "num_batches_tracked"


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one tensor (tied parameters or buffers), each group in the model's order."""
    by_id: dict[int, list[str]] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        by_id.setdefault(id(t), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _twins(model: nn.Module) -> dict[str, list[str]]:
    return {n: [t for t in group if t != n] for group in tied_groups(model) for n in group}


def _ignored_unexpected(model: nn.Module, expected: Mapping[str, Any]):
    """A predicate: is this key, absent from the model's state dict, one the model never keeps?"""
    non_persistent = {n for n, _ in model.named_buffers(remove_duplicate=False)} - set(expected)
    patterns = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    return lambda key: key in non_persistent or any(p.search(key) for p in patterns)


@dataclass
class Misfit:
    """How a state dict fails to fit a model (empty lists: it fits)."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def describe(self) -> str:
        def few(names: list[str], n: int = 4) -> str:
            return ", ".join(names[:n]) + (" ..." if len(names) > n else "")

        parts = []
        if self.missing:
            parts.append(f"missing {few(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {few(self.unexpected)}")
        if self.shapes:
            parts.append(f"shape mismatch {'; '.join(self.shapes[:3])}")
        return "; ".join(parts)


def misfit(model: nn.Module, sd: Mapping[str, Any]) -> Misfit:
    """What keeps ``sd`` from loading into ``model``, after the tolerances of this module."""
    expected = model.state_dict()
    twins = _twins(model)
    ignored = _ignored_unexpected(model, expected)
    missing = [
        k
        for k in expected
        if k not in sd and not any(t in sd for t in twins.get(k, ())) and not k.endswith(BATCHNORM_COUNTER)
    ]
    unexpected = [k for k in sd if k not in expected and not ignored(k)]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd
        and isinstance(sd[k], torch.Tensor)
        and isinstance(v, torch.Tensor)
        and tuple(sd[k].shape) != tuple(v.shape)
    ]
    return Misfit(missing, unexpected, shapes)


def check_fits(model: nn.Module, sd: Mapping[str, Any], where: str) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped entries (tied weights stored once,
    non-persistent buffers and ignorable keys are fine)."""
    problems = misfit(model, sd)
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not fit the model ({problems.describe()}); "
            "pass the model architecture the checkpoint was saved from"
        )


def _prefix_candidates(keys: list[str], n_expected: int) -> list[str]:
    """Dotted prefixes ("model.", "model.net.") that at least ``n_expected`` keys carry, shortest first."""
    counts: Counter[str] = Counter()
    for k in keys:
        parts = k.split(".")
        for depth in range(1, len(parts)):
            counts[".".join(parts[:depth]) + "."] += 1
    return sorted((p for p, c in counts.items() if c >= max(n_expected, 1)), key=lambda p: (p.count("."), p))


def strip_prefix(model: nn.Module, sd: Mapping[str, Any], where: str) -> dict[str, Any] | None:
    """``sd`` without the one prefix that makes it fit ``model`` (other keys dropped), or None if none does.

    Every key carrying the prefix is preferred; a prefix carried by only part of the keys (a LightningModule
    holding the model under ``model.`` besides, say, a loss with a weight buffer) must be the only one that fits.
    """
    keys = list(sd)
    fitting = []
    for prefix in _prefix_candidates(keys, len(model.state_dict()) // 2):
        stripped = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not misfit(model, stripped):
            fitting.append((prefix, stripped))
    if not fitting:
        return None
    whole = [f for f in fitting if len(f[1]) == len(keys)]
    if whole:
        return whole[0][1]
    if len(fitting) > 1:
        raise CheckpointError(
            f"checkpoint {where} holds several state dicts that fit the model (under "
            f"{', '.join(p for p, _ in fitting[:4])}); select one yourself and pass it as a state dict"
        )
    return fitting[0][1]


def fit_state_dict(model: nn.Module, tensors: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The state dict to load into ``model``: every name of its ``state_dict()``, model dtypes, nothing else.

    Raises CheckpointError when the tensors do not fit, even after the tolerances of this module.
    """
    sd = dict(tensors)
    problems = misfit(model, sd)
    if problems:
        stripped = strip_prefix(model, sd, where)
        if stripped is None:
            raise CheckpointError(
                f"checkpoint {where} does not fit the model ({problems.describe()}); "
                "pass the model architecture the checkpoint was saved from"
            )
        sd = stripped
    expected, twins = model.state_dict(), _twins(model)
    out = {}
    for k, want in expected.items():
        if k in sd:
            v = sd[k]
        else:
            twin = next((t for t in twins.get(k, ()) if t in sd), None)
            v = sd[twin] if twin is not None else want.detach().clone()  # a twin, else the BatchNorm counter
        if (
            isinstance(v, torch.Tensor)
            and isinstance(want, torch.Tensor)
            and v.dtype != want.dtype
            and v.is_floating_point()
            and want.is_floating_point()
        ):
            v = v.to(want.dtype)
        out[k] = v
    return out


def drop_tied_duplicates(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per tied parameter or buffer (the one ``named_parameters`` reports).

    A loaded checkpoint holds separate tensors under every name of a tied weight, which
    ``functional_call`` refuses; given the first name it sets all of them. A group stored under
    another of its names only (a safetensors file keeps one) is kept under the first name.
    """
    state = dict(state)
    for group in tied_groups(model):
        canonical = group[0]
        if canonical not in state:
            twin = next((t for t in group[1:] if t in state), None)
            if twin is not None:
                state[canonical] = state[twin]
        for name in group[1:]:
            state.pop(name, None)
    return state
