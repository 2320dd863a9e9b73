"""What the active Dask scheduler offers: workers' memory limits and threads per worker."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import dask
import psutil
from threadpoolctl import ThreadpoolController

# Without a cluster, score with at most this much memory (and a quarter of the machine's).
LOCAL_FRACTION = 0.25
LOCAL_CAP = 1 << 30
# Of a distributed worker's memory_limit, plan blocks for this share: dask starts spilling at 60 %.
WORKER_FRACTION = 0.5


@dataclass(frozen=True)
class Resources:
    memory_limit: int  # bytes per worker for our blocks
    threads: int  # tasks at once per worker
    distributed: bool


def active_client():
    """The current ``distributed.Client``, or None when dask runs in-process."""
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def parse_memory(value) -> int:
    """Bytes from an int or a string such as '2GiB' or '500 MB'."""
    if isinstance(value, (int, float)):
        return int(value)
    from dask.utils import parse_bytes

    return int(parse_bytes(str(value)))


@functools.cache
def thread_pools() -> ThreadpoolController:
    """The process's BLAS and OpenMP thread pools, found once: ``threadpool_limits`` looks for them on
    every call (about 8 ms, a tenth of an indexed top-k query). A library loaded later is not among them;
    the engine's kernels use NumPy's BLAS, loaded with NumPy before any engine call."""
    return ThreadpoolController()


def local_threads() -> int:
    n = dask.config.get("num_workers", None)
    return int(n) if n else (os.cpu_count() or 1)


def detect(memory_limit=None, client=None) -> Resources:
    """Memory budget and threads per worker for planning, from ``client`` or the active scheduler."""
    client = client if client is not None else active_client()
    if client is not None:
        from ..cluster import worker_infos

        workers = worker_infos(client)
        threads = max((w.get("nthreads", 1) for w in workers), default=1)
        if memory_limit is None:
            limits = [w.get("memory_limit") or 0 for w in workers]
            known = [m for m in limits if m > 0]
            memory_limit = int(min(known) * WORKER_FRACTION) if known else _local_default()
        return Resources(parse_memory(memory_limit), int(threads), True)
    if memory_limit is None:
        memory_limit = _local_default()
    return Resources(parse_memory(memory_limit), local_threads(), False)


def _local_default() -> int:
    return int(min(psutil.virtual_memory().total * LOCAL_FRACTION, LOCAL_CAP))
