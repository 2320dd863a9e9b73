"""Where a checkpoint keeps its learning rate: a key of the saved dict, the optimizer state saved beside
the weights, or a Hugging Face Trainer's ``trainer_state.json``.

Each reader returns a :class:`FoundRate`: a value, or why there is none. The reason is raised only when
the caller gave no ``learning_rates=`` (which always wins), so a checkpoint whose optimizer groups
disagree still loads when the caller says which rate to use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Keys of a saved dict that hold the learning rate itself.
LR_KEYS = ("learning_rate", "lr")
# Keys that hold an optimizer's state dict (``optimizer_states``: Lightning's list, one per optimizer).
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states")
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class FoundRate:
    """A learning rate read from a checkpoint (``value``), or why none was (``problem``, a phrase)."""

    value: float | None = None
    problem: str | None = None


def _as_float(x: Any) -> float | None:
    try:
        value = float(x)  # a Python number, a 0-dim or one-element tensor, a numeric string
    except (TypeError, ValueError, RuntimeError):
        return None
    return value if math.isfinite(value) else None


def from_saved_dict(obj: Mapping[str, Any], where: str) -> FoundRate:
    """``learning_rate``/``lr`` of a saved dict, else ``param_groups[0]["lr"]`` of its optimizer state."""
    for key in LR_KEYS:
        if key in obj:
            value = _as_float(obj[key])
            if value is None:
                return FoundRate(problem=f"{where} stores {key}={obj[key]!r}, not a finite number")
            return FoundRate(value)
    found = optimizer_state_in(obj)
    if found is not None:
        key, state = found
        return from_optimizer_state(state, f"{where} ({key})")
    return FoundRate()


def optimizer_state_in(obj: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]] | None:
    """(key, optimizer state dict) saved beside the weights (Lightning's ``optimizer_states[0]``), or None."""
    for key in OPTIMIZER_KEYS:
        state = obj.get(key)
        if key == "optimizer_states" and isinstance(state, Sequence) and not isinstance(state, (str, bytes)):
            state = state[0] if state else None
        if isinstance(state, Mapping) and "param_groups" in state:
            return key, state
    return None


def from_optimizer_state(state: Mapping[str, Any], where: str) -> FoundRate:
    """``param_groups[0]["lr"]``, provided every parameter group has the same learning rate."""
    groups = state.get("param_groups") or []
    rates = [_as_float(g.get("lr")) if isinstance(g, Mapping) else None for g in groups]
    if not rates or any(r is None for r in rates):
        return FoundRate(problem=f"the optimizer state in {where} has no numeric learning rate in param_groups")
    if len(set(rates)) > 1:
        shown = ", ".join(f"{r:g}" for r in rates[:6]) + (" ..." if len(rates) > 6 else "")
        return FoundRate(
            problem=f"the optimizer in {where} has parameter groups with different learning rates "
            f"({shown}), so no one rate applies to the checkpoint"
        )
    return FoundRate(rates[0])


def from_trainer_state(folder: str) -> FoundRate:
    """The ``learning_rate`` of the last ``log_history`` entry with ``step`` ≤ ``global_step``."""
    path = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(path):
        return FoundRate(problem=f"the checkpoint folder {folder} has no {TRAINER_STATE} to read it from")
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
        step = int(state.get("global_step", 0))
        history = list(state.get("log_history") or [])
    except (OSError, ValueError, TypeError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        return FoundRate(problem=f"{path} cannot be read ({type(e).__name__}: {first})")
    logged = [
        e
        for e in history
        if isinstance(e, Mapping)
        and "learning_rate" in e
        and _as_float(e.get("step", math.inf)) is not None
        and float(e["step"]) <= step
    ]
    if not logged:
        return FoundRate(
            problem=f"{path} logs no learning_rate at or before global_step {step} (logging_steps longer than the run?)"
        )
    value = _as_float(logged[-1]["learning_rate"])
    if value is None:
        return FoundRate(problem=f"{path} logs learning_rate={logged[-1]['learning_rate']!r}, not a number")
    return FoundRate(value)
