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


def two_worker_client():
    """A ``distributed.Client`` on a real LocalCluster of two single-thread worker processes on 127.0.0.1
    (a context manager; used by module fixtures)."""
    import contextlib

    from distributed import Client, LocalCluster

    @contextlib.contextmanager
    def make():
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          host="127.0.0.1") as cluster, Client(cluster) as c:
            c.wait_for_workers(2, timeout=60)
            yield c

    return make()
