"""Shared test markers, made once (xarray-style)."""

import pytest

from trackin_ooc.engine.backend import cupy_usable

has_cupy = cupy_usable()
requires_cupy = pytest.mark.skipif(not has_cupy, reason="needs cupy and a CUDA device")


def stop_process_group(proc, timeout: float = 20) -> None:
    """SIGTERM a subprocess started with start_new_session=True and its group; SIGKILL if it lingers."""
    import os
    import signal
    import subprocess

    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
