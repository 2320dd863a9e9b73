"""Content hashes of state dicts: a store records one per checkpoint, so a resumed or combined capture can
tell whether the weights changed. Any tensor hashes: 0-dim and integer buffers, bool, bfloat16, sparse."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's values (C order), whatever its dtype, layout or number of dimensions."""
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.cpu().contiguous()
    if not t.numel():
        return b""
    # A 0-dim tensor cannot be viewed as bytes (BatchNorm's num_batches_tracked); its 1-element form can.
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def state_dict_sha256(sd: Mapping[str, Any]) -> str:
    """sha256 over names, dtypes, shapes and values, in sorted name order (non-tensors by their repr).

    A file and the same state dict in memory hash alike: the hash is of tensors, never of a file.
    """
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key]
        h.update(key.encode())
        if isinstance(t, torch.Tensor):
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(tensor_bytes(t))
        else:
            h.update(repr(t).encode())
    return h.hexdigest()
