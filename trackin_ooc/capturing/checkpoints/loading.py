"""Checkpoints: load safely (``weights_only=True``), check they fit the model, find learning rates."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import CaptureError, CheckpointError, CheckpointNotFoundError

STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
LR_KEYS = ("learning_rate", "lr")


@dataclass
class Checkpoint:
    """One loaded checkpoint: its tensors, learning rate, a name and a content hash."""

    name: str
    sha256: str
    state_dict: dict[str, torch.Tensor]
    learning_rate: float


def _sha256_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        h.update(key.encode())
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(t).encode())
    return h.hexdigest()


def _split(obj, where: str) -> tuple[dict[str, torch.Tensor], float | None]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    lr = next((obj[k] for k in LR_KEYS if k in obj), None)
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key]), None if lr is None else float(lr)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{where} has no tensors; expected a state dict or a dict with one under "
            f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}"
        )
    return tensors, None if lr is None else float(lr)


def check_fits(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise CheckpointError naming missing, unexpected or mis-shaped entries."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and isinstance(sd[k], torch.Tensor) and tuple(sd[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    if shapes:
        problems.append(f"shape mismatch {'; '.join(shapes[:3])}")
    if problems:
        raise CheckpointError(
            f"checkpoint {where} does not fit the model ({'; '.join(problems)}); "
            "pass the model architecture the checkpoint was saved from"
        )


def load_checkpoints(
    model: nn.Module,
    checkpoints: Sequence[str | os.PathLike | Mapping[str, torch.Tensor]],
    learning_rates: Sequence[float] | None = None,
) -> list[Checkpoint]:
    """Load every checkpoint once (CPU tensors), with its learning rate."""
    if isinstance(checkpoints, (str, os.PathLike, Mapping)):
        checkpoints = [checkpoints]
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise CaptureError("no checkpoints given; pass at least one checkpoint path or state dict")
    if learning_rates is not None:
        learning_rates = [float(x) for x in (
            [learning_rates] if isinstance(learning_rates, (int, float)) else learning_rates
        )]
        if len(learning_rates) != len(checkpoints):
            raise CaptureError(
                f"{len(learning_rates)} learning rates for {len(checkpoints)} checkpoints; "
                "give exactly one learning rate per checkpoint"
            )
    loaded = []
    for i, ck in enumerate(checkpoints):
        if isinstance(ck, Mapping):
            where = f"#{i} (state dict)"
            sd, lr = _split(ck, where)
            name = f"state_dict_{i}"
        else:
            path = os.fspath(ck)
            where = path
            if not os.path.isfile(path):
                raise CheckpointNotFoundError(f"checkpoint file not found: {path}; check the path")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises many types for corrupt or unsafe files
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(
                    f"cannot load checkpoint {path} with weights_only=True: {first}; "
                    "save it as a plain state dict (torch.save(model.state_dict(), path))"
                ) from None
            sd, lr = _split(obj, path)
            name = os.path.basename(path)
        check_fits(model, sd, where)
        # Hash the tensors, not the file: a path and the same state dict in memory agree.
        digest = _sha256_state_dict(sd)
        if learning_rates is not None:
            lr = learning_rates[i]
        if lr is None:
            raise CaptureError(
                f"no learning rate for checkpoint {where}: it stores no 'learning_rate' or 'lr'; "
                "pass learning_rates=[...] (--lr) with one value per checkpoint"
            )
        loaded.append(Checkpoint(name=name, sha256=digest, state_dict=sd, learning_rate=float(lr)))
    return loaded


def drop_tied_duplicates(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per tied parameter or buffer (the one ``named_parameters`` reports).

    A loaded checkpoint holds separate tensors under every name of a tied weight, which
    ``functional_call`` refuses; given the first name it sets all of them.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    canonical.update({id(b): n for n, b in model.named_buffers()})
    drop = {
        n for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
        if canonical.get(id(t), n) != n
    }
    return {k: v for k, v in state.items() if k not in drop}
