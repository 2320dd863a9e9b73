"""load_checkpoints: every checkpoint once, in any format a training run writes (formats.py), fitted to the
model (fitting.py), hashed (hashing.py), with its learning rate (learning_rates.py) and, when asked for, the
Adam moments of the selected parameters (moments.py)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CaptureError
from .fitting import fit_state_dict
from .formats import describe_sources, expand_checkpoints, read_checkpoint
from .hashing import state_dict_sha256
from .moments import FoundMoments, Moments, read_moments

Checkpoints = Sequence[str | os.PathLike | Mapping[str, torch.Tensor]] | str | os.PathLike | Mapping


@dataclass
class Checkpoint:
    """One loaded checkpoint: its tensors (named as the model's ``state_dict()``), learning rate, a name and
    a content hash of the tensors; ``moments``: the Adam moments read with it (None: not asked for)."""

    name: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    learning_rate: float
    moments: FoundMoments | None = None

    def recorded_sha256(self, with_moments: bool) -> str:
        """The hash a store records: of the tensors, or (a preconditioned capture) of the tensors and the
        moments it used, so that a changed optimizer state is noticed like changed weights."""
        if not with_moments:
            return self.sha256
        return hashlib.sha256(f"{self.sha256}+moments:{self.read_moments.sha256}".encode()).hexdigest()

    @property
    def read_moments(self) -> Moments:
        """The Adam moments read with this checkpoint; ValueError where there are none."""
        if self.moments is None or self.moments.value is None:
            raise ValueError(f"checkpoint {self.name} was loaded without moments")
        return self.moments.value

    @property
    def moments_error(self) -> str:
        """Why its moments do not fit ("" where they do or were not read)."""
        return "" if self.moments is None else (self.moments.error or "")


def _learning_rates(learning_rates, n: int, n_given: int, sources) -> list[float] | None:
    if learning_rates is None:
        return None
    rates = [float(x) for x in ([learning_rates] if isinstance(learning_rates, (int, float)) else learning_rates)]
    if len(rates) != n:
        expanded = f" (the checkpoints given expand to {n}: {describe_sources(sources)})" if n != n_given else ""
        raise CaptureError(
            f"{len(rates)} learning rates for {n} checkpoints{expanded}; "
            "give exactly one learning rate per checkpoint (learning_rates=[...], --lr)"
        )
    return rates


def load_checkpoints(
    model: nn.Module,
    checkpoints: Checkpoints,
    learning_rates: Sequence[float] | None = None,
    *,
    moments_for: Sequence[str] | None = None,
) -> list[Checkpoint]:
    """Load every checkpoint once (CPU tensors), with its learning rate.

    ``moments_for``: parameter names whose Adam moments to read too (:func:`.moments.read_moments`; each
    checkpoint's ``moments`` says what was found, or why nothing was); None reads none.

    A run folder counts as all its ``checkpoint-N`` folders, so ``learning_rates`` has one value per
    checkpoint after that expansion. Given learning rates win over stored ones; a checkpoint with neither
    is a :class:`CaptureError`, never a silent 1.0.
    """
    n_given = 1 if isinstance(checkpoints, (str, os.PathLike, Mapping)) else len(list(checkpoints))
    sources = expand_checkpoints(checkpoints)
    if not sources:
        raise CaptureError("no checkpoints given; pass at least one checkpoint path or state dict")
    rates = _learning_rates(learning_rates, len(sources), n_given, sources)
    loaded = []
    for i, source in enumerate(sources):
        raw = read_checkpoint(source, i)
        sd = fit_state_dict(model, raw.tensors, raw.where)
        if rates is not None:
            lr = rates[i]
        elif raw.rate.value is not None:
            lr = raw.rate.value
        else:
            why = raw.rate.problem or "it stores no 'learning_rate', 'lr' or optimizer state"
            raise CaptureError(
                f"no learning rate for checkpoint {raw.where}: {why}; "
                "pass learning_rates=[...] (--lr) with one value per checkpoint"
            )
        found = None if moments_for is None else read_moments(model, raw, moments_for)
        # Hash the fitted tensors, not the file: every format of the same weights hashes alike.
        loaded.append(
            Checkpoint(
                name=raw.name, sha256=state_dict_sha256(sd), state_dict=sd, learning_rate=float(lr), moments=found
            )
        )
    return loaded
