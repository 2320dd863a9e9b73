"""Capture scaled out: row-block ranges of one store computed as Dask tasks on a cluster's workers.

Each task runs a :class:`~.job.CaptureJob` on a contiguous range of row blocks: it loads the model
and checkpoints once, then writes its blocks, which are whole chunks no other task touches. The
submitting process holds the store's lock and seals the store when every task is done.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from ..progress import progress_bar
from ..store.backends import StorageOptions
from .job import Block, CaptureJob

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


def _threads_per_host(client) -> dict[str, int]:
    workers = client.scheduler_info(**({"n_workers": -1} if _takes_n(client) else {}))["workers"]
    hosts: Counter = Counter()
    for w in workers.values():
        hosts[w.get("host", "")] += int(w.get("nthreads", 1))
    return dict(hosts)


def _takes_n(client) -> bool:
    from ..engine.resources import _takes_n as takes_n

    return takes_n(client)


def _run_task(job: CaptureJob, path: str, blocks: list[Block], storage_options, host_threads: dict) -> int:
    """On a worker: share the host's cores with the other tasks running there, then run the job."""
    import torch
    from distributed import get_worker

    try:
        host = get_worker().address.split("://")[-1].rsplit(":", 1)[0]
    except ValueError:
        host = ""
    threads = max(1, (os.cpu_count() or 1) // max(1, host_threads.get(host, 1)))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return job.run(path, blocks, storage_options=storage_options, skip_written=True)
    finally:
        torch.set_num_threads(before)


def run_on_cluster(client, job: CaptureJob, path: str, blocks: Sequence[Block], *,
                   storage_options: StorageOptions = None, progress: bool | None = None) -> int:
    """Run ``blocks`` as Dask tasks on ``client``'s workers; return the blocks written."""
    from distributed import as_completed

    host_threads = _threads_per_host(client)
    total_threads = max(1, sum(host_threads.values()))
    ranges = split_ranges(blocks, TASKS_PER_THREAD * total_threads)
    [shared_job] = client.scatter([job], broadcast=False, hash=False)
    futures = [
        client.submit(_run_task, shared_job, path, r, storage_options, host_threads,
                      key=f"trackin-capture-{r[0][0]}-{r[-1][1]}-{os.getpid()}", retries=1, pure=False)
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
        client.cancel(futures)
    return written
