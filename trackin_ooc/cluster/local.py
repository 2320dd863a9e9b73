"""A Dask client on an existing scheduler (by address or scheduler file) or on a local cluster on 127.0.0.1.

:func:`trackin_ooc.cluster.cluster_client` picks this or a batch-system cluster (:mod:`.jobqueue`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import ClusterError

if TYPE_CHECKING:
    from . import ClusterSpec

log = logging.getLogger("trackin_ooc")


def worker_infos(client: Any) -> list[dict[str, Any]]:
    """The scheduler's record of every worker of ``client`` (threads, memory limit, host).

    Recent ``distributed`` lists only the first few workers unless asked for all (``n_workers=-1``).
    """
    import inspect

    takes_n = "n_workers" in inspect.signature(client.scheduler_info).parameters
    info = client.scheduler_info(n_workers=-1) if takes_n else client.scheduler_info()
    return list(info.get("workers", {}).values())


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def local_client(spec: ClusterSpec, *, timeout: float | str | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client`` (made the default) on a local cluster or an existing scheduler.

    ``workers=N`` starts a ``LocalCluster`` of N worker processes bound to 127.0.0.1 with the given
    per-worker ``memory_limit``; it is closed on exit. A scheduler address or file connects to an
    existing cluster, which is left running. ``timeout`` for connecting defaults to Dask's
    ``distributed.comm.timeouts.connect`` setting (env DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT).
    """
    import dask
    from distributed import Client, LocalCluster

    if timeout is None:
        timeout = dask.config.get("distributed.comm.timeouts.connect", "30s")
    cluster = None
    try:
        if spec.workers is not None and spec.gpu:
            cluster = _local_cuda_cluster(spec)
            client = Client(cluster, timeout=timeout)
        elif spec.workers is not None:
            threads = spec.threads_per_worker or max(1, (os.cpu_count() or 1) // int(spec.workers))
            cluster = LocalCluster(
                n_workers=int(spec.workers),
                threads_per_worker=threads,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                memory_limit=spec.memory_limit if spec.memory_limit is not None else "auto",
            )
            client = Client(cluster, timeout=timeout)
        elif spec.scheduler_file is not None:
            if not os.path.isfile(spec.scheduler_file):
                raise ClusterError(
                    f"scheduler file {spec.scheduler_file} does not exist; give the file the scheduler "
                    "wrote (dask scheduler --scheduler-file FILE)"
                )
            client = Client(scheduler_file=spec.scheduler_file, timeout=timeout)
        else:
            client = Client(spec.scheduler_address, timeout=timeout)
    except ClusterError:
        if cluster is not None:
            cluster.close()
        raise
    except Exception as e:
        if cluster is not None:
            cluster.close()
        raise ClusterError(
            f"cannot use the {spec.describe()}: {_short(e)}; check that the scheduler is running "
            "and reachable, or drop the option to score in-process"
        ) from e
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _local_cuda_cluster(spec: ClusterSpec) -> Any:
    """dask-cuda's LocalCUDACluster: one worker per visible GPU (capped at ``workers``), on 127.0.0.1."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        raise ClusterError(
            "--device gpu with --workers needs dask-cuda (conda install -c rapidsai -c conda-forge dask-cuda, "
            "or pip install dask-cuda); or drop --workers to score on this process's GPU"
        ) from None
    import cupy

    n_gpus = cupy.cuda.runtime.getDeviceCount()
    visible = ",".join(str(i) for i in range(min(n_gpus, int(spec.workers or 1))))
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=visible,
        ip="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        memory_limit=spec.memory_limit if spec.memory_limit is not None else "auto",
    )


def dashboard_link(client: Any) -> str | None:
    """The dashboard URL of a client's scheduler (None where none is served)."""
    try:
        link = client.dashboard_link
        return None if link is None else str(link)
    except Exception:
        return None
