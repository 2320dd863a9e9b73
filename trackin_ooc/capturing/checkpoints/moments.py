"""Adam second moments saved with a checkpoint: read, mapped to the model's parameters, bias-corrected.

Where they are read from: the optimizer state saved beside the weights in a torch file (``optimizer_state_dict``,
``optimizer``, Lightning's ``optimizer_states[0]``), a state dict in memory holding one the same way, or a
Hugging Face ``Trainer`` folder's ``optimizer.pt`` (``torch.load(weights_only=True)`` in every case).

An optimizer state dict names its parameters by integer ids, numbered through its parameter groups in order.
They are mapped to the model's parameter names by the first rule that applies:

- the groups record ``param_names`` (an optimizer built from ``model.named_parameters()``): by name, a common
  prefix (a LightningModule's ``model.``) stripped when that makes the names fit;
- a ``Trainer`` folder: the Trainer's two groups, weight-decayed parameters first, then the others, each in
  ``named_parameters()`` order over the parameters that require grad (the rule of the installed transformers'
  ``Trainer.get_decay_parameter_names``; files of older versions, which decayed every parameter outside a
  LayerNorm whose name lacks "bias", fit the older rule, tried next);
- a torch file: the ids in ``model.parameters()`` order (every parameter, or those that require grad); with
  two groups also the Trainer's grouping. Where several of these fit the shapes and disagree, the file is
  refused as ambiguous.

Every mapped id's moment must have its parameter's shape; a moment that does not fit is a one-line
:class:`CheckpointError` naming the first parameter and the fix, and so is a selected parameter the
optimizer has no moments for. The moments kept are v̂ = v / (1 − β2^step) per selected parameter (v:
``exp_avg_sq``; ``max_exp_avg_sq`` with amsgrad, as torch's Adam divides by it), with ε and β2 from the
parameter's own group.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ...errors import CheckpointError
from .formats import TRAINER_OPTIMIZER, RawCheckpoint, torch_load
from .hashing import state_dict_sha256

SECOND_MOMENT = "exp_avg_sq"
AMSGRAD_MOMENT = "max_exp_avg_sq"
# What the Trainer (transformers ≥ 4.46) excludes from weight decay besides LayerNorm modules; matched
# against the lower-cased parameter name (Trainer.get_decay_parameter_names).
TRAINER_NO_DECAY = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
FIX_NAMES = (
    "save the state of an optimizer built over this model's parameters (model.parameters() in order, or "
    "model.named_parameters(), which records their names)"
)
FIX_SGD = "or pass preconditioner=None (--preconditioner none) for the SGD form"


@dataclass(frozen=True)
class ParamMoments:
    """One parameter's bias-corrected second moment v̂ (float32, the parameter's shape) and its group's ε."""

    v_hat: torch.Tensor
    eps: float


@dataclass
class Moments:
    """The Adam moments of one checkpoint for the selected parameters, where they came from, and a hash."""

    where: str
    params: dict[str, ParamMoments]
    amsgrad: bool = False

    @cached_property
    def sha256(self) -> str:
        """Content hash of what the preconditioner uses (every v̂ and ε, by parameter name)."""
        return state_dict_sha256(
            {
                **{f"{n}#v_hat": m.v_hat for n, m in self.params.items()},
                **{f"{n}#eps": float(m.eps) for n, m in self.params.items()},
            }
        )


@dataclass(frozen=True)
class FoundMoments:
    """Moments read from a checkpoint (``value``), or why there are none: ``absent`` (a phrase: the checkpoint
    holds no Adam moments) or ``error`` (a whole one-line message: they are there but do not fit)."""

    value: Moments | None = None
    absent: str | None = None
    error: str | None = None


# ---- the optimizer state of a checkpoint --------------------------------------------------------------
def optimizer_state(raw: RawCheckpoint) -> tuple[str, Mapping[str, Any]] | None:
    """(where, optimizer state dict) of a checkpoint, loading a Trainer folder's optimizer.pt; None if none."""
    if raw.optimizer is not None:
        return raw.optimizer
    if raw.optimizer_file is None:
        return None
    state = torch_load(raw.optimizer_file)
    if not isinstance(state, Mapping) or "param_groups" not in state or "state" not in state:
        raise CheckpointError(
            f"{raw.optimizer_file} holds no optimizer state dict (state, param_groups); "
            f"save optimizer.state_dict() there, {FIX_SGD}"
        )
    return raw.optimizer_file, state


def _absent_reason(raw: RawCheckpoint) -> str:
    if os.path.isdir(raw.where):
        return f"the checkpoint folder {raw.where} has no {TRAINER_OPTIMIZER}"
    if raw.where.endswith(".safetensors"):
        return f"{raw.where} is a .safetensors file, which stores tensors only"
    return f"{raw.where} holds no optimizer state (optimizer_state_dict, optimizer or optimizer_states)"


def _has_adam_moments(state: Mapping[str, Any]) -> bool:
    entries = state.get("state") or {}
    return isinstance(entries, Mapping) and any(isinstance(e, Mapping) and SECOND_MOMENT in e for e in entries.values())


# ---- parameter ids → names --------------------------------------------------------------------------
def decay_parameter_names(model: nn.Module, legacy: bool = False) -> set[str]:
    """The parameters a Hugging Face Trainer puts in its weight-decay group.

    As ``Trainer.get_decay_parameter_names``: every parameter outside ``nn.LayerNorm`` modules whose
    lower-cased name matches none of :data:`TRAINER_NO_DECAY`. ``legacy``: the rule of transformers before
    4.46 (outside ``nn.LayerNorm`` modules, "bias" not in the name).
    """
    in_norm = {
        f"{m}.{n}"
        for m, mod in model.named_modules()
        if m and isinstance(mod, nn.LayerNorm)
        for n, _ in mod.named_parameters()
    }
    patterns = [re.compile(p) for p in TRAINER_NO_DECAY]
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)} - in_norm
    if legacy:
        return {n for n in names if "bias" not in n}
    return {n for n in names if not any(p.search(n.lower()) for p in patterns)}


def trainer_groups(model: nn.Module, legacy: bool = False) -> list[list[str]]:
    """The Trainer's two parameter groups (``Trainer.create_optimizer``): decayed, then the others, each in
    ``named_parameters()`` order, parameters that require grad only."""
    decay = decay_parameter_names(model, legacy)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]


def _group_ids(state: Mapping[str, Any], where: str) -> list[list[int]]:
    groups: Any = state.get("param_groups")
    try:
        return [[int(i) for i in g["params"]] for g in groups]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(
            f"the optimizer state in {where} has malformed param_groups (each needs a 'params' "
            f"list of ids); {FIX_NAMES}, {FIX_SGD}"
        ) from None


def _by_recorded_names(model: nn.Module, state: Mapping[str, Any], where: str) -> dict[int, str] | None:
    """{id: model parameter name} from the groups' ``param_names``; None when the groups record none."""
    groups = state["param_groups"]
    if not all(isinstance(g, Mapping) and "param_names" in g for g in groups):
        return None
    pairs = [(int(i), str(n)) for g in groups for i, n in zip(g["params"], g["param_names"])]
    params = dict(model.named_parameters())
    if all(n in params for _, n in pairs):
        return dict(pairs)
    for prefix in _prefixes([n for _, n in pairs]):
        stripped = {i: n[len(prefix) :] for i, n in pairs if n.startswith(prefix)}
        if stripped and all(n in params for n in stripped.values()):
            return stripped  # names outside the prefix: parameters outside the model (a LightningModule's own)
    first = next(n for _, n in pairs if n not in params)
    raise CheckpointError(
        f"the optimizer state in {where} names parameter {first!r}, which the model does not "
        f"have (nor after stripping a prefix); pass the model the optimizer trained, {FIX_SGD}"
    )


def _prefixes(names: Sequence[str]) -> list[str]:
    found = {".".join(n.split(".")[:d]) + "." for n in names for d in range(1, n.count(".") + 1)}
    return sorted(found, key=lambda p: (p.count("."), p))


def _moment_shape(entry: Any) -> tuple[int, ...] | None:
    if isinstance(entry, Mapping) and isinstance(entry.get(SECOND_MOMENT), torch.Tensor):
        return tuple(entry[SECOND_MOMENT].shape)
    return None


def _misfit(order: Any, ids: list[list[int]], entries: Mapping, params) -> str | None:
    """Why ``order`` (per group, or one flat list for all ids) does not map the ids; None when it does."""
    flat_ids = [i for g in ids for i in g]
    if order and isinstance(order[0], list):
        if len(order) != len(ids):
            return f"it has {len(ids)} parameter groups where {len(order)} were expected"
        for k, (names, group) in enumerate(zip(order, ids)):
            if len(names) != len(group):
                return f"parameter group {k} holds {len(group)} ids where {len(names)} parameters were expected"
        names = [n for g in order for n in g]
    else:
        names = list(order)
        if len(names) != len(flat_ids):
            missing = f" (first without one: {names[len(flat_ids)]})" if len(names) > len(flat_ids) else ""
            return f"it holds {len(flat_ids)} parameter ids, the model {len(names)} parameters{missing}"
    for i, n in zip(flat_ids, names):
        shape = _moment_shape(entries.get(i))
        if shape is not None and shape != tuple(params[n].shape):
            return f"param id {i} holds {SECOND_MOMENT} of shape {shape} but parameter {n} is {tuple(params[n].shape)}"
    return None


def map_parameter_ids(model: nn.Module, state: Mapping[str, Any], where: str, trainer: bool) -> dict[int, str]:
    """{optimizer param id: model parameter name} (see the module docstring for the rules); raises
    CheckpointError naming the first misfit."""
    named = _by_recorded_names(model, state, where)
    if named is not None:
        return named
    ids = _group_ids(state, where)
    entries = state.get("state") or {}
    entries = {int(k): v for k, v in entries.items()} if isinstance(entries, Mapping) else {}
    params = dict(model.named_parameters())
    every = list(params)
    trainable = [n for n, p in params.items() if p.requires_grad]
    candidates: list[Any]  # flat name orders, or one list of names per parameter group
    if trainer:
        candidates = [trainer_groups(model), trainer_groups(model, legacy=True)]
    else:
        candidates = [every, *([trainable] if trainable != every else [])]
        if len(ids) == 2:
            candidates += [trainer_groups(model), trainer_groups(model, legacy=True)]
    flat_ids = [i for g in ids for i in g]
    fitting: list[dict[int, str]] = []
    first_problem = None
    for order in candidates:
        problem = _misfit(order, ids, entries, params)
        if problem is None:
            names = [n for g in order for n in g] if order and isinstance(order[0], list) else list(order)
            mapping = dict(zip(flat_ids, names))
            if mapping not in fitting:
                fitting.append(mapping)
        elif first_problem is None:
            first_problem = problem
    if not fitting:
        how = "the Trainer's parameter groups" if trainer else "the model's parameters"
        raise CheckpointError(
            f"the optimizer state in {where} does not fit {how}: {first_problem}; {FIX_NAMES}, {FIX_SGD}"
        )
    if len(fitting) > 1 and not trainer:
        raise CheckpointError(
            f"the optimizer state in {where} fits the model's parameters in more than one order "
            "(its parameter groups may follow the model or the Trainer's decay grouping); "
            f"{FIX_NAMES}, {FIX_SGD}"
        )
    return fitting[0]


# ---- v̂ per selected parameter ------------------------------------------------------------------------
def _number(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError, RuntimeError):
        return None
    return v if math.isfinite(v) else None


def bias_corrected(entry: Mapping[str, Any], group: Mapping[str, Any]) -> torch.Tensor | None:
    """v̂ = v / (1 − β2^step) as torch's Adam divides by it (v = ``max_exp_avg_sq`` with amsgrad), float32;
    None when the entry or its group lacks what that needs. A group with ``correct_bias=False`` (transformers'
    own AdamW) is not bias-corrected."""
    amsgrad = bool(group.get("amsgrad", False)) and AMSGRAD_MOMENT in entry
    v = entry.get(AMSGRAD_MOMENT if amsgrad else SECOND_MOMENT)
    step = _number(entry.get("step"))
    betas = group.get("betas")
    beta2 = _number(betas[1]) if isinstance(betas, Sequence) and len(betas) == 2 else None
    if not isinstance(v, torch.Tensor) or step is None or step <= 0 or beta2 is None:
        return None
    v = v.detach().to(torch.float64)
    if group.get("correct_bias", True) is not False:
        v = v / (1.0 - beta2**step)
    return v.to(torch.float32)


def read_moments(model: nn.Module, raw: RawCheckpoint, names: Sequence[str]) -> FoundMoments:
    """The bias-corrected second moments of parameters ``names`` stored with checkpoint ``raw``.

    Returns ``FoundMoments(absent=...)`` when the checkpoint holds no Adam-family optimizer state, and
    ``FoundMoments(error=...)`` when it holds one that does not fit (a shape, a missing parameter) or cannot be
    read (an ``optimizer.pt`` that ``weights_only=True`` refuses).
    """
    try:
        found = optimizer_state(raw)
    except CheckpointError as e:  # an optimizer.pt that cannot be read: "adam" raises it, "auto" says it
        return FoundMoments(error=str(e))
    if found is None:
        return FoundMoments(absent=_absent_reason(raw))
    where, state = found
    if not _has_adam_moments(state):
        return FoundMoments(
            absent=f"the optimizer state in {where} holds no Adam second moments ({SECOND_MOMENT}): "
            "not an Adam-family optimizer"
        )
    try:
        ids = map_parameter_ids(model, state, where, trainer=raw.from_trainer)
    except CheckpointError as e:
        return FoundMoments(error=str(e))
    group_of = {int(i): g for g in state["param_groups"] for i in g["params"]}
    entries = {int(k): v for k, v in state["state"].items()}
    by_name = {n: i for i, n in ids.items()}
    params = dict(model.named_parameters())
    out: dict[str, ParamMoments] = {}
    amsgrad = False
    for n in names:
        i = by_name.get(n)
        if i is None or i not in entries:
            why = "is not among its parameters" if i is None else f"(param id {i}) has no state there (never updated)"
            return FoundMoments(
                error=f"the optimizer state in {where} has no Adam moments for parameter {n}: it "
                f"{why}; leave {n} out of layers, {FIX_SGD}"
            )
        group = group_of[i]
        v_hat = bias_corrected(entries[i], group)
        eps = _number(group.get("eps"))
        if v_hat is None or eps is None:
            return FoundMoments(
                error=f"the optimizer state in {where} lacks {SECOND_MOMENT}, step, betas or eps for "
                f"parameter {n} (param id {i}); save the state of an Adam-family optimizer, "
                f"{FIX_SGD}"
            )
        if tuple(v_hat.shape) != tuple(params[n].shape):
            return FoundMoments(
                error=f"the optimizer state in {where} holds {SECOND_MOMENT} of shape "
                f"{tuple(v_hat.shape)} for parameter {n} of shape {tuple(params[n].shape)}; "
                f"{FIX_NAMES}, {FIX_SGD}"
            )
        amsgrad = amsgrad or bool(group.get("amsgrad", False))
        out[n] = ParamMoments(v_hat, eps)
    return FoundMoments(Moments(where, out, amsgrad))
