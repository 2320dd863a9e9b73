"""Array backends for block kernels: NumPy on the CPU, CuPy on a GPU, one code path for both.

CuPy is imported only when a GPU is asked for or auto-detected, never at package import.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import numpy as np

DEVICES = ("auto", "cpu", "gpu")


@functools.lru_cache(maxsize=1)
def cupy_usable() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@dataclass(frozen=True)
class ArrayBackend:
    """Moves blocks to the compute device and back; ``xp`` is numpy or cupy."""

    name: str  # "numpy" or "cupy"

    @property
    def xp(self) -> ModuleType:
        if self.name == "cupy":
            import cupy

            return cupy
        return np

    def asarray(self, host: np.ndarray):
        return self.xp.asarray(host)

    def to_host(self, arr) -> np.ndarray:
        if self.name == "cupy":
            return arr.get()
        return np.asarray(arr)


def resolve_backend(device: str = "auto") -> ArrayBackend:
    """``auto``: CuPy where a CUDA device and cupy exist, else NumPy; ``gpu`` insists on CuPy."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return ArrayBackend("numpy")
    if cupy_usable():
        return ArrayBackend("cupy")
    if device == "gpu":
        raise RuntimeError(
            "device='gpu' needs cupy and a CUDA device (pip install 'trackin-ooc[gpu]'); use device='cpu'"
        )
    return ArrayBackend("numpy")
