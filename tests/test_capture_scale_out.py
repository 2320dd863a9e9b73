"""Capture scaled out: row-block ranges as Dask tasks on a real multi-process LocalCluster.

The store must be the same bytes as a one-process capture, every worker must have written part of
it, and a worker process that dies in the middle of its range must not change the result.
"""

from __future__ import annotations

import os

import pytest
from distributed import get_task_stream
from torch.utils.data import Dataset

import trackin_ooc as to
from trackin_ooc import testing as tt
from trackin_ooc.capturing.job.scale_out import split_ranges

from . import two_worker_client

pytestmark = pytest.mark.timeout(300)

KW = dict(projection_dim=24, chunk_rows=50, batch_size=32)


@pytest.fixture(scope="module")
def client():
    with two_worker_client() as c:
        yield c


@pytest.fixture(scope="module")
def whole(mlp, digits, tmp_path_factory):
    return to.capture(mlp.model, mlp.checkpoints, digits.train, tmp_path_factory.mktemp("one") / "s.zarr", **KW)


def test_split_ranges_covers_every_block_once_in_order():
    blocks = [(i * 10, i * 10 + 10) for i in range(11)]
    for n in (1, 2, 3, 4, 11, 50):
        ranges = split_ranges(blocks, n)
        assert [b for r in ranges for b in r] == blocks
        assert len(ranges) == min(n, 11) and max(map(len, ranges)) - min(map(len, ranges)) <= 1


def _writers(tasks) -> dict[str, int]:
    """Capture tasks each worker ran, from a ``distributed.get_task_stream`` record."""
    counts: dict[str, int] = {}
    for task in tasks.data:
        if "trackin-capture" in str(task["key"]):
            counts[task["worker"]] = counts.get(task["worker"], 0) + 1
    return counts


def test_scaled_out_capture_equals_one_process(client, mlp, digits, whole, tmp_path):
    with get_task_stream(client) as tasks:
        store = to.capture(mlp.model, mlp.checkpoints, digits.train, tmp_path / "s.zarr", client=client, **KW)
    assert store.complete
    tt.assert_stores_identical(store, whole)
    writers = _writers(tasks)
    assert len(writers) == 2 and all(n > 0 for n in writers.values()), (
        f"capture tasks per worker {writers}: capture did not scale out to both"
    )


def _dies_once(base, at: int, marker: str) -> Dataset:
    """Data whose example ``at`` kills the worker process reading it, once (made here so that
    cloudpickle ships it by value)."""

    class DiesOnce(Dataset):
        def __len__(self):
            return len(base)

        def __getitem__(self, i):
            if i == at:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return base[i]
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)
            return base[i]

    return DiesOnce()


def test_a_worker_dying_mid_capture_does_not_change_the_store(client, mlp, digits, whole, tmp_path):
    marker = tmp_path / "died"
    data = _dies_once(digits.train, 160, str(marker))  # inside the second task's range, after its 1st block
    store = to.capture(mlp.model, mlp.checkpoints, data, tmp_path / "s.zarr", client=client, **KW)
    assert marker.exists(), "no worker died"
    assert int(marker.read_text()) not in set(client.run(os.getpid).values())
    tt.assert_stores_identical(store, whole)
    client.wait_for_workers(2, timeout=60)
