"""Shared test markers and helpers, made once (xarray-style)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

# OpenMP reads its thread count once, when torch loads it, and a thread that is not OpenMP's own (a
# Dask worker thread) runs its parallel regions with that count, not torch.set_num_threads's: the same
# count everywhere (tests/conftest.py sets torch's) keeps results bit for bit equal across threads.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("TRACKIN_OOC_TEST_TORCH_THREADS", "1"))

import pytest  # noqa: E402

from trackin_ooc.engine.array_module import cupy_usable

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


# ---- one LocalCluster at a time, shared by the tests of a module ---------------------------------------
_shared: dict = {}


def _shared_client():
    """The test process's LocalCluster of two single-thread worker processes on 127.0.0.1 and its
    Client, started on first use (not the default client: it is active only inside two_worker_client)."""
    if "client" not in _shared or _shared["client"].status != "running":
        from distributed import Client, LocalCluster

        close_shared_cluster()
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
        )
        _shared.update(cluster=cluster, client=Client(cluster, set_as_default=False))
    return _shared["client"]


def close_shared_cluster() -> None:
    """Shut the shared cluster down (conftest.py does at the end of the session)."""
    client, cluster = _shared.pop("client", None), _shared.pop("cluster", None)
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


@contextlib.contextmanager
def two_worker_client() -> Iterator:
    """A ``distributed.Client`` on a real LocalCluster of two single-thread worker processes on 127.0.0.1,
    active (what ``distributed.default_client()`` returns) inside the block.

    Callers share one cluster, started on first use and stopped by conftest.py after the last test of
    the module: tests that kill a worker leave it to the nanny, and the next caller waits until both
    workers are back. The ``local_cluster`` fixture (conftest.py) is this block around a test.
    """
    client = _shared_client()
    client.wait_for_workers(2, timeout=120)
    with client.as_current():
        yield client
