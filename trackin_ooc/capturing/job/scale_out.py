"""Capture scaled out: row-block ranges of one store computed as Dask tasks on a cluster's workers.

Each task runs a :class:`~.job.CaptureJob` on a contiguous range of row blocks: it loads the model
and checkpoints once, then writes its blocks, which are whole chunks no other task touches. The
submitting process holds the store's lock and seals the store when every task is done.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from ...progress import progress_bar
from ...store.backends import StorageOptions
from .capture_job import Block, CaptureJob

# Tasks per worker thread: a few, so a slow or lost worker's share is small, but each task pays
# one model and checkpoint load.
TASKS_PER_THREAD = 2


def split_ranges(blocks: Sequence[Block], n_tasks: int) -> list[list[Block]]:
    """``blocks`` cut into at most ``n_tasks`` contiguous runs of near-equal length (pure)."""
    blocks = list(blocks)
    n = max(1, min(int(n_tasks), len(blocks)))
    size, extra = divmod(len(blocks), n)
    out, at = [], 0
    for i in range(n):
        take = size + (1 if i < extra else 0)
        out.append(blocks[at : at + take])
        at += take
    return [r for r in out if r]


def _identity(x):
    return x


def _run_task(job: CaptureJob, path: str, blocks: list[Block], storage_options) -> int:
    """On a worker. Like every Dask task it computes with one core per worker thread (the nanny sets
    OMP_NUM_THREADS=1, which torch follows): give workers ``--nthreads`` equal to their cores."""
    return job.run(path, blocks, storage_options=storage_options, skip_written=True)


def run_on_cluster(
    client,
    job: CaptureJob,
    path: str,
    blocks: Sequence[Block],
    *,
    storage_options: StorageOptions = None,
    progress: bool | None = None,
) -> int:
    """Run ``blocks`` as Dask tasks on ``client``'s workers; return the blocks written."""
    from distributed import as_completed

    from ...cluster import worker_infos

    threads = sum(w.get("nthreads", 1) for w in worker_infos(client))
    ranges = split_ranges(blocks, TASKS_PER_THREAD * max(1, threads))
    # The job (model, data) reaches the workers as the result of a task, not scattered data: if the worker
    # holding it dies, the scheduler recomputes it from the task instead of failing the capture.
    shared_job = client.submit(_identity, job, key=f"trackin-capture-job-{os.getpid()}-{id(job)}", pure=False)
    # On every worker before the ranges are submitted: otherwise they queue where the job is, and other
    # workers get a share only by stealing, which short tasks may never trigger.
    client.replicate([shared_job])
    futures = [
        client.submit(
            _run_task,
            shared_job,
            path,
            r,
            storage_options,
            key=f"trackin-capture-{r[0][0]}-{r[-1][1]}-{os.getpid()}",
            retries=1,
            pure=False,
        )
        for r in ranges
    ]
    rows = {f.key: sum(stop - start for start, stop in r) for f, r in zip(futures, ranges)}
    written = 0
    try:
        with progress_bar(total=sum(rows.values()), desc="capture", unit="ex", enabled=progress) as bar:
            for future in as_completed(futures):
                written += future.result()
                bar.update(rows[future.key])
    finally:
        client.cancel([*futures, shared_job])
    return written
