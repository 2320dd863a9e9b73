"""The engine on a real multi-process ``distributed`` cluster: same results as in-process, and exact
results when a worker process dies in the middle of a top-k run."""

from __future__ import annotations

import os

import dask
import numpy as np
import psutil
import pytest
import xarray as xr
from distributed import Client, WorkerPlugin

import trackin_ooc as to
from trackin_ooc import testing as tt
from trackin_ooc.engine import resources
from trackin_ooc.engine.planning import worker_bytes
from trackin_ooc.store import layout

from . import two_worker_client

pytestmark = pytest.mark.timeout(180)

LRS = [0.7, 0.2, 1.1]


@pytest.fixture(scope="module")
def client():
    with two_worker_client() as c:
        yield c


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(31)
    te = to.from_arrays(
        root / "test.zarr", rng.standard_normal((3, 21, 8)).astype(np.float32), LRS, chunk_rows=5, dtype="float16"
    )
    tr = to.from_arrays(
        root / "train.zarr", rng.standard_normal((3, 130, 8)).astype(np.float32), LRS, chunk_rows=16, dtype="float16"
    )
    return te, tr


def executed(client: Client) -> int:
    """Tasks executed so far by all workers of the cluster."""
    return sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())


def in_process(fn):
    """Run ``fn`` with the local threaded scheduler although a Client is active."""
    with dask.config.set(scheduler="threads"):
        assert resources.active_client() is None
        return fn()


def test_the_engine_sees_the_cluster(client):
    res = resources.detect()
    assert res.distributed and res.threads == 1
    info = client.scheduler_info()["workers"].values()
    assert res.memory_limit == int(min(w["memory_limit"] for w in info) * resources.WORKER_FRACTION)


@pytest.mark.parametrize("normalize", [False, True])
def test_distributed_results_equal_in_process_results(client, stores, tmp_path, normalize):
    te, tr = stores
    limit = worker_bytes(4, 16, 3 * 8, layout.itemsize(tr.dtype), 1, 5)  # several blocks each way
    expected = tt.reference_influence(te.read_grads(), tr.read_grads(), LRS, normalize=normalize)

    local_inf = in_process(lambda: to.influence(te, tr, normalize=normalize, memory_limit=limit).compute())
    local_top = in_process(lambda: to.top_k(te, tr, k=5, normalize=normalize, memory_limit=limit))
    local_self = in_process(lambda: to.self_influence(tr))

    before = executed(client)
    with tt.count_tasks() as local_tasks:
        lazy = to.influence(te, tr, normalize=normalize, memory_limit=limit)
        assert lazy.data.numblocks[0] > 1 and lazy.data.numblocks[1] > 1
        dist_inf = lazy.compute()
        dist_out = to.influence(te, tr, out=tmp_path / "inf.zarr", normalize=normalize, memory_limit=limit)
        dist_top = to.top_k(te, tr, k=5, normalize=normalize, memory_limit=limit)
        dist_self = to.self_influence(tr)
    assert local_tasks.tasks == 0  # nothing ran in this process ...
    assert executed(client) - before >= lazy.data.npartitions  # ... the workers ran it

    tt.assert_influence_equal(dist_inf, expected)
    np.testing.assert_allclose(dist_inf.values, local_inf.values, rtol=1e-6, atol=1e-6)
    tt.assert_influence_equal(dist_out, expected)
    np.testing.assert_allclose(dist_out.values, local_inf.values, rtol=1e-6, atol=1e-6)
    assert xr.open_zarr(tmp_path / "inf.zarr").attrs[layout.ATTRS_KEY]["complete"] is True
    tt.assert_top_k_equal(dist_top, expected, 5)
    tt.assert_top_k_equal(local_top, expected, 5)
    for name in ("proponent_score", "opponent_score"):
        np.testing.assert_allclose(dist_top[name].values, local_top[name].values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dist_self.values, local_self.values, rtol=1e-6)
    tt.assert_self_influence_equal(dist_self, tt.reference_self_influence(tr.read_grads(), LRS))


def _exit_after(n_tasks: int, marker: str, prefix: str) -> WorkerPlugin:
    """A plugin that makes the first worker to finish ``n_tasks`` tasks named ``prefix...`` die
    (os._exit, as a crash or the OOM killer would), once per ``marker`` file. Defined in a
    function so that cloudpickle ships it by value to the worker processes."""

    class ExitAfter(WorkerPlugin):
        def setup(self, worker):
            self.done = 0

        def transition(self, key, start, finish, **kwargs):
            name = key[0] if isinstance(key, tuple) else key
            if finish != "memory" or not str(name).startswith(prefix):
                return
            self.done += 1
            if self.done == n_tasks:
                try:
                    fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return  # another worker died already
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os._exit(1)

    return ExitAfter()


def test_top_k_survives_a_worker_dying(client, tmp_path):
    rng = np.random.default_rng(8)
    n_test, n_train, c, f, k = 6, 6000, 2, 16, 7
    te = to.from_arrays(
        tmp_path / "test.zarr", rng.standard_normal((c, n_test, f)).astype(np.float32), LRS[:2], chunk_rows=3
    )
    tr = to.from_arrays(
        tmp_path / "train.zarr", rng.standard_normal((c, n_train, f)).astype(np.float32), LRS[:2], chunk_rows=16
    )
    limit = worker_bytes(3, 16, c * f, 4, 1, k)
    plan = to.plan_for(te, tr, memory_limit=limit, k=k)
    n_parts = len(plan.test_blocks(n_test)) * len(plan.train_blocks(n_train))
    assert n_parts >= 600  # many short tasks: the death lands in the middle of the run
    expected = tt.reference_influence(te.read_grads(), tr.read_grads(), LRS[:2])
    local = in_process(lambda: to.top_k(te, tr, k=k))  # in one block: the plan does not change results

    pids = set(client.run(os.getpid).values())
    assert len(pids) == 2
    marker = str(tmp_path / "killed")
    kill_after = n_parts // 6  # about a third of the victim's share
    client.register_plugin(_exit_after(kill_after, marker, "trackin-topk-part"), name="exit-after")
    try:
        res = to.top_k(te, tr, k=k, memory_limit=limit)
    finally:
        client.unregister_worker_plugin("exit-after")

    assert os.path.exists(marker), "no worker died: the run finished before the planned death"
    victim = int(open(marker).read())
    assert victim in pids
    proc_gone = not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    assert proc_gone
    tt.assert_top_k_equal(res, expected, k)
    tt.assert_top_k_equal(local, expected, k)
    for name in ("proponent_score", "opponent_score"):
        np.testing.assert_allclose(res[name].values, local[name].values, rtol=1e-6, atol=1e-6)
    # The nanny replaced the dead worker; the cluster is whole again for whoever comes next.
    client.wait_for_workers(2, timeout=60)
    assert victim not in set(client.run(os.getpid).values())
