"""``client=`` sends the work to that cluster even when it is not the default client."""

from __future__ import annotations

import numpy as np
from distributed import Client, LocalCluster

import trackin_ooc as to
import trackin_ooc.testing as tt


def test_explicit_client_runs_the_work(tmp_path):
    rng = np.random.default_rng(3)
    lrs = [0.2, 0.05]
    test = to.from_arrays(tmp_path / "te.zarr", rng.standard_normal((2, 7, 6)).astype(np.float32), lrs)
    train = to.from_arrays(tmp_path / "tr.zarr", rng.standard_normal((2, 50, 6)).astype(np.float32), lrs, chunk_rows=8)
    # In-process workers talk over inproc://, so nothing listens on a network port.
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        top = to.top_k(test, train, k=3, client=client, memory_limit=worker_limit(train))
        si = to.self_influence(train, client=client)
        out = to.influence(test, train, out=tmp_path / "inf.zarr", client=client)
        executed = sum(client.run(lambda dask_worker: len(dask_worker.state.log)).values())
    assert executed > 0
    expected = tt.reference_influence(test.read_grads(), train.read_grads(), lrs)
    tt.assert_top_k_equal(top, expected, 3)
    np.testing.assert_allclose(out.values, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(si.values, tt.reference_self_influence(train.read_grads(), lrs), rtol=1e-5)


def worker_limit(train) -> int:
    """Small: several train blocks, so the merge tree runs on the cluster too."""
    return 4_000
