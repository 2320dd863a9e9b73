"""Running a graph on whatever scheduler is active, with a progress bar and sane BLAS threading."""

from __future__ import annotations

import contextlib
import os

import dask
from dask.callbacks import Callback
from tqdm import tqdm

from ..progress import progress_bar, progress_enabled
from .resources import active_client, local_threads, thread_pools


class _TqdmCallback(Callback):
    """Counts finished tasks of the local scheduler into a tqdm bar."""

    def __init__(self, desc: str):
        super().__init__()
        self.desc = desc
        self.bar: tqdm | None = None

    def _start_state(self, dsk, state):
        total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
        self.bar = progress_bar(total=total, desc=self.desc, unit="task", enabled=True)

    def _posttask(self, key, result, dsk, state, worker_id):
        if self.bar is not None:
            self.bar.update(1)

    def _finish(self, dsk, state, errored):
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _blas_threads_for_local_scheduler():
    """Dask threads × BLAS threads must not exceed the cores: give each task its share."""
    per_task = max(1, (os.cpu_count() or 1) // max(1, local_threads()))
    with thread_pools().limit(limits=per_task, user_api="blas"):
        yield


def compute(*collections, desc: str = "scoring", progress: bool | None = None, client=None):
    """Compute on ``client``, else on the active scheduler (a distributed Client if there is one)."""
    client = client if client is not None else active_client()
    show = progress_enabled(progress)
    if client is not None:
        from distributed import as_completed

        with client.as_current():
            futures = client.compute(list(collections))
            with progress_bar(total=len(futures), desc=desc, unit="part", enabled=show) as bar:
                for _ in as_completed(futures):
                    bar.update(1)
            return tuple(client.gather(futures))
    with _blas_threads_for_local_scheduler():
        if show:
            with _TqdmCallback(desc):
                return dask.compute(*collections)
        return dask.compute(*collections)
