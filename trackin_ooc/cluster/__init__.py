"""Where scoring runs: an existing Dask scheduler, a local cluster, a batch system's jobs, or in-process.

    with cluster_client(workers=2, memory_limit="1GiB") as client:
        to.self_influence("train.zarr")     # runs on the local cluster's workers
    with cluster_client(batch="slurm", batch_config="jobqueue.yaml", jobs=4):
        to.top_k("test.zarr", "train.zarr", k=10)   # on the Slurm jobs' workers

The scoring functions use whatever ``distributed.Client`` is active, so this package only has to
make one (or none) for the duration of a block: :mod:`.local` for a scheduler or a ``LocalCluster``,
:mod:`.jobqueue` for Slurm, PBS and LSF through dask-jobqueue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ClusterError, JobqueueError
from . import jobqueue
from .local import dashboard_link, local_client, worker_infos

__all__ = [
    "ClusterSpec",
    "cluster_client",
    "ClusterError",
    "JobqueueError",
    "dashboard_link",
    "worker_infos",
    "jobqueue",
]


@dataclass(frozen=True)
class ClusterSpec:
    """Which cluster to use; at most one of the four ways (address, file, local workers, batch) may be given.

    Parameters
    ----------
    scheduler_address, scheduler_file
        An existing scheduler, by address or by the file it wrote; left running on exit.
    workers
        Start a ``LocalCluster`` of this many worker processes on 127.0.0.1.
    memory_limit, threads_per_worker
        Per local worker (LocalCluster's ``memory_limit``).
    gpu
        With ``workers``: one dask-cuda worker per GPU (LocalCUDACluster).
    batch
        ``"slurm"``, ``"pbs"`` or ``"lsf"``: submit worker jobs through dask-jobqueue.
    batch_config
        A YAML file (or mapping) with a ``jobqueue:`` section, for ``batch``.
    jobs, minimum_jobs, maximum_jobs
        With ``batch``: that many jobs now, or adapt between the bounds.
    job_options
        With ``batch``: dask-jobqueue options by Python name (``cores``, ``memory``, ``walltime``...).
    wait
        With ``batch``: wait for this many workers to join before yielding.
    """

    scheduler_address: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    memory_limit: str | int | None = None  # per local worker (LocalCluster memory_limit)
    threads_per_worker: int | None = None
    gpu: bool = False  # with workers: one dask-cuda worker per GPU (LocalCUDACluster)
    batch: str | None = None  # slurm | pbs | lsf: a dask-jobqueue cluster
    batch_config: Any = None
    jobs: int | None = None
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    job_options: Mapping[str, Any] | None = None
    wait: int | None = None

    def __post_init__(self) -> None:
        given = [
            n
            for n, v in (
                ("scheduler_address", self.scheduler_address),
                ("scheduler_file", self.scheduler_file),
                ("workers", self.workers),
                ("batch", self.batch),
            )
            if v is not None
        ]
        if len(given) > 1:
            raise ClusterError(f"give only one of {', '.join(given)}")
        if self.workers is not None and int(self.workers) < 1:
            raise ClusterError(f"workers must be at least 1, got {self.workers}")

    @property
    def in_process(self) -> bool:
        return (
            self.scheduler_address is None
            and self.scheduler_file is None
            and self.workers is None
            and self.batch is None
        )

    def describe(self) -> str:
        if self.scheduler_address:
            return f"scheduler at {self.scheduler_address}"
        if self.scheduler_file:
            return f"scheduler from {self.scheduler_file}"
        if self.workers:
            return "a local cluster on 127.0.0.1"
        if self.batch:
            return f"a {self.batch} cluster"
        return "in-process threads"


@contextlib.contextmanager
def cluster_client(
    spec: ClusterSpec | None = None, *, timeout: float | str | None = None, **kwargs: Any
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` (made the default) for ``spec``, or None for in-process.

    Parameters
    ----------
    spec
        Where to run; without it, ``kwargs`` are the fields of a :class:`ClusterSpec`.
    timeout
        Connecting to a scheduler: defaults to Dask's ``distributed.comm.timeouts.connect``. With
        ``batch`` and ``wait``: how long to wait for the workers (by default as long as the jobs queue).

    Raises
    ------
    ClusterError
        The scheduler cannot be reached, the local cluster cannot start, or the batch system refuses
        the jobs (:class:`~trackin_ooc.errors.JobqueueError`).
    """
    spec = spec or ClusterSpec(**kwargs)
    if spec.in_process:
        yield None
    elif spec.batch is not None:
        with jobqueue.batch_client(
            spec.batch,
            config=spec.batch_config,
            jobs=spec.jobs,
            minimum=spec.minimum_jobs,
            maximum=spec.maximum_jobs,
            wait=spec.wait,
            timeout=timeout,
            **dict(spec.job_options or {}),
        ) as client:
            yield client
    else:
        with local_client(spec, timeout=timeout) as client:
            yield client
