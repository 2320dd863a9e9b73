"""Where a capture computes: "auto" picks CUDA when torch sees a device."""

from __future__ import annotations

import torch

from ...errors import CaptureError


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "gpu":
        device = "cuda"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CaptureError("device 'cuda' was asked for but torch sees no CUDA device; use device='cpu'")
    return dev
