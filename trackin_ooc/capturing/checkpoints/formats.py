"""Checkpoint formats as training runs write them, read without running pickled code.

- a torch file (``torch.load(weights_only=True)``): a state dict, or a dict holding one under ``model``,
  ``state_dict`` or ``model_state_dict``, with a learning rate or an optimizer state beside it (Lightning's
  ``.ckpt`` files are of this kind);
- a ``.safetensors`` file (read with the safetensors library);
- a Hugging Face ``Trainer`` checkpoint folder (``model.safetensors``, sharded safetensors with
  ``model.safetensors.index.json``, or ``pytorch_model.bin``, possibly sharded), its learning rate in
  ``trainer_state.json``;
- a run folder holding ``checkpoint-N`` folders: :func:`expand_checkpoints` makes it all of them in step order;
- a state dict (or such a dict) in memory.

Besides the weights, a checkpoint may hold an optimizer state: the dict saved beside the weights
(``optimizer_state_dict``, ``optimizer``, Lightning's ``optimizer_states[0]``), or a Trainer folder's
``optimizer.pt``; :mod:`.moments` reads the Adam moments from it when a capture asks for them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import CheckpointError, CheckpointNotFoundError
from .learning_rates import FoundRate, from_saved_dict, from_trainer_state, optimizer_state_in

STATE_DICT_KEYS = ("model", "state_dict", "model_state_dict")
# The weights of a Hugging Face checkpoint folder, in the order from_pretrained prefers them.
SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
FOLDER_WEIGHTS = (SAFETENSORS_WEIGHTS, SAFETENSORS_INDEX, TORCH_WEIGHTS, TORCH_INDEX)
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")
# File names that say nothing on their own: a checkpoint named so is shown with its folder.
GENERIC_NAMES = {*FOLDER_WEIGHTS, "model.pt", "model.pth", "model.ckpt", "last.ckpt", "weights.pt"}
# The optimizer state a Trainer saves in each checkpoint folder (Trainer._save_optimizer_and_scheduler).
TRAINER_OPTIMIZER = "optimizer.pt"

CheckpointSource = str | Mapping[str, Any]


@dataclass
class RawCheckpoint:
    """A checkpoint's tensors as stored (not yet fitted to a model), what to call it, and its learning rate."""

    name: str
    where: str  # how messages refer to it: a path, or "#i (state dict)"
    tensors: dict[str, Any]
    rate: FoundRate
    # The optimizer state saved beside the weights: (how messages refer to it, the state dict), or None.
    optimizer: tuple[str, Mapping[str, Any]] | None = None
    # A Trainer folder's optimizer.pt (read only when the moments are asked for), or None.
    optimizer_file: str | None = None

    @property
    def from_trainer(self) -> bool:
        """A Hugging Face Trainer folder: its optimizer's parameter ids follow the Trainer's two groups."""
        return self.optimizer_file is not None


# ---- which checkpoints ---------------------------------------------------------------------------
def is_weights_folder(path: str) -> bool:
    """A folder holding one model's weights the way ``save_pretrained`` / ``Trainer`` write them."""
    return any(os.path.isfile(os.path.join(path, f)) for f in FOLDER_WEIGHTS)


def checkpoint_folders(run: str) -> list[str]:
    """The ``checkpoint-N`` folders directly inside ``run``, in step order."""
    found = []
    for entry in os.scandir(run):
        m = CHECKPOINT_FOLDER.fullmatch(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry.path))
    return [p for _, p in sorted(found)]


def expand_checkpoints(checkpoints: Any) -> list[CheckpointSource]:
    """The checkpoints one by one: paths as strings (a run folder replaced by its ``checkpoint-N`` folders
    in step order), state dicts as they are. A single path or state dict is a list of one."""
    if isinstance(checkpoints, (str, os.PathLike, Mapping)):
        checkpoints = [checkpoints]
    out: list[CheckpointSource] = []
    for ck in checkpoints:
        if isinstance(ck, Mapping):
            out.append(ck)
            continue
        path = os.fspath(ck)
        if os.path.isdir(path) and not is_weights_folder(path):
            inside = checkpoint_folders(path)
            if not inside:
                raise CheckpointError(
                    f"folder {path} holds neither model weights ({', '.join(FOLDER_WEIGHTS)}) nor checkpoint-N "
                    "folders; pass a checkpoint file, a Trainer checkpoint folder or a run folder of them"
                )
            out.extend(inside)
        else:
            out.append(path)
    return out


def checkpoint_name(path: str) -> str:
    """What a store calls a checkpoint: ``checkpoint-500``, ``epoch_005.pt``, ``checkpoint-500/model.safetensors``."""
    path = os.path.normpath(path)
    base = os.path.basename(path)
    if base in GENERIC_NAMES:
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        return f"{parent}/{base}" if parent else base
    return base


# ---- reading one -----------------------------------------------------------------------------------
def read_checkpoint(source: CheckpointSource, index: int) -> RawCheckpoint:
    """Read checkpoint ``index`` (a path from :func:`expand_checkpoints`, or a state dict)."""
    if isinstance(source, Mapping):
        where = f"#{index} (state dict)"
        tensors, rate = split_saved_dict(source, where)
        return RawCheckpoint(f"state_dict_{index}", where, tensors, rate, _optimizer(source, where))
    path = os.fspath(source)
    if os.path.isdir(path):
        return _read_folder(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"checkpoint file not found: {path}; check the path")
    if path.endswith(".safetensors"):
        no_rate = FoundRate(problem="a .safetensors file stores tensors only")
        return RawCheckpoint(checkpoint_name(path), path, read_safetensors(path), no_rate)
    saved = torch_load(path)
    tensors, rate = split_saved_dict(saved, path)
    return RawCheckpoint(checkpoint_name(path), path, tensors, rate, _optimizer(saved, path))


def _optimizer(saved: Any, where: str) -> tuple[str, Mapping[str, Any]] | None:
    found = optimizer_state_in(saved) if isinstance(saved, Mapping) else None
    return None if found is None else (f"{where} ({found[0]})", found[1])


def _read_folder(folder: str) -> RawCheckpoint:
    files = {f: os.path.join(folder, f) for f in FOLDER_WEIGHTS if os.path.isfile(os.path.join(folder, f))}
    if SAFETENSORS_WEIGHTS in files:
        tensors = read_safetensors(files[SAFETENSORS_WEIGHTS])
    elif SAFETENSORS_INDEX in files:
        tensors = _read_sharded(files[SAFETENSORS_INDEX], read_safetensors)
    elif TORCH_WEIGHTS in files:
        tensors, _ = split_saved_dict(torch_load(files[TORCH_WEIGHTS]), files[TORCH_WEIGHTS])
    elif TORCH_INDEX in files:
        tensors = _read_sharded(files[TORCH_INDEX], lambda p: split_saved_dict(torch_load(p), p)[0])
    else:
        raise CheckpointError(
            f"checkpoint folder {folder} holds no model weights ({', '.join(FOLDER_WEIGHTS)}); "
            "pass the folder a Trainer or save_pretrained wrote, or the weights file itself"
        )
    optimizer = os.path.join(folder, TRAINER_OPTIMIZER)
    return RawCheckpoint(
        checkpoint_name(folder),
        folder,
        tensors,
        from_trainer_state(folder),
        optimizer_file=optimizer if os.path.isfile(optimizer) else None,
    )


def _read_sharded(index_path: str, read) -> dict[str, Any]:
    """Every shard an index's ``weight_map`` names, merged."""
    folder = os.path.dirname(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"cannot read the shard index {index_path} ({type(e).__name__}: {e}); "
            "it must be JSON with a weight_map of tensor name → shard file"
        ) from None
    tensors: dict[str, Any] = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise CheckpointNotFoundError(f"shard {path} named by {index_path} not found; copy every shard")
        tensors.update(read(path))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(
            f"the shards of {index_path} lack {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}; the checkpoint is incomplete"
        )
    return tensors


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file, on the CPU (the format holds tensors only, no code)."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: a corrupt or truncated file
        raise CheckpointError(
            f"cannot read safetensors file {path}: {_first_line(e)}; the file is damaged or not in safetensors format"
        ) from None


def torch_load(path: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, failures in one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(
            f"cannot load checkpoint {path} with weights_only=True: {_first_line(e)}; save it as a plain state "
            "dict (torch.save(model.state_dict(), path)), or allow the types it holds with "
            "torch.serialization.add_safe_globals([...]) if you trust the file"
        ) from None


def _first_line(e: Exception) -> str:
    """The informative line of an exception message (torch puts the unsupported type on a later line)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            return line.split(" Please use")[0]  # our own message says how to allow a type
    return lines[0] if lines else type(e).__name__


def split_saved_dict(obj: Any, where: str) -> tuple[dict[str, Any], FoundRate]:
    """(state dict, learning rate) of what ``torch.save`` saved: a bare state dict or a dict holding one."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict; save model.state_dict()")
    rate = from_saved_dict(obj, where)
    for key in STATE_DICT_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key]), rate
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"{where} has no tensors; expected a state dict or a dict with one under "
            f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}"
        )
    return tensors, rate


def describe_sources(sources: Sequence[CheckpointSource]) -> str:
    """A short list of checkpoint names for messages."""
    names = ["state dict" if isinstance(s, Mapping) else checkpoint_name(s) for s in sources]
    return ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
