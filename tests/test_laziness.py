"""Building a result computes nothing; computing it runs the block tasks, and top-k never holds a
whole score block beyond its own task."""

from __future__ import annotations

import re

import dask
import numpy as np
import pytest

import trackin_ooc as to
from trackin_ooc import testing as tt
from trackin_ooc.engine import resources
from trackin_ooc.engine.planning import worker_bytes
from trackin_ooc.store import GradientStore, layout

N_TEST, N_TRAIN, C, F = 11, 37, 2, 5  # width C·F = 10 differs from every block size used below
LRS = [0.4, 1.3]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("lazy")
    rng = np.random.default_rng(12)
    te = to.from_arrays(root / "test.zarr", rng.standard_normal((C, N_TEST, F)).astype(np.float32), LRS, chunk_rows=3)
    tr = to.from_arrays(root / "train.zarr", rng.standard_normal((C, N_TRAIN, F)).astype(np.float32), LRS, chunk_rows=4)
    return te, tr


@pytest.fixture
def reads(monkeypatch):
    """Counts gradient reads: building a graph must not touch the gradient data either."""
    calls = []
    original = GradientStore.read_grads

    def counting(self, *args, **kwargs):
        calls.append(args)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientStore, "read_grads", counting)
    return calls


def small_budget(te, tr, test_rows: int, train_rows: int, k: int = 0) -> int:
    return worker_bytes(test_rows, train_rows, C * F, layout.itemsize(tr.dtype), resources.detect().threads, k)


def reference_scores(te, tr, normalize=False):
    return tt.reference_influence(te.read_grads(), tr.read_grads(), tr.learning_rates, normalize=normalize)


@pytest.mark.parametrize("normalize", [False, True])
def test_influence_is_lazy_until_computed(stores, reads, normalize):
    te, tr = stores
    limit = small_budget(te, tr, 4, 8)
    with tt.count_tasks() as built:
        res = to.influence(te, tr, normalize=normalize, memory_limit=limit)
    assert (built.tasks, built.computes) == (0, 0)
    assert reads == []
    tt.assert_lazy(res)
    plan = to.plan_for(te, tr, memory_limit=limit)
    n_i, n_j = len(plan.test_blocks(N_TEST)), len(plan.train_blocks(N_TRAIN))
    assert n_i > 1 and n_j > 1
    assert res.data.numblocks == (n_i, n_j)

    expected = reference_scores(te, tr, normalize)
    reads.clear()
    with tt.count_tasks() as run:
        computed = res.compute()
    # One read per test block, one score task per (test block, train block).
    assert run.computes == 1
    assert run.tasks >= n_i + n_i * n_j
    assert len(reads) == n_i + n_i * n_j
    tt.assert_influence_equal(computed, expected, lazy=False)
    # The lazy result is still lazy, and computes again to the same values.
    tt.assert_lazy(res)
    np.testing.assert_array_equal(res.values, computed.values)


def test_self_influence_is_lazy_until_computed(stores, reads):
    _, tr = stores
    with tt.count_tasks() as built:
        res = to.self_influence(tr, compute_now=False)
    assert (built.tasks, built.computes) == (0, 0)
    assert reads == []
    tt.assert_lazy(res)
    with tt.count_tasks() as run:
        values = res.compute()
    n_blocks = len(tr.row_blocks())
    assert run.tasks >= n_blocks and len(reads) == n_blocks
    tt.assert_self_influence_equal(values, tt.reference_self_influence(tr.read_grads(), LRS))
    # compute_now=True computes (and so is not lazy).
    with tt.count_tasks() as eager:
        now = to.self_influence(tr)
    assert eager.tasks >= n_blocks
    assert not dask.is_dask_collection(now.data)
    np.testing.assert_array_equal(now.values, values.values)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_is_lazy_until_computed(stores, reads, k):
    te, tr = stores
    limit = small_budget(te, tr, 4, 8, k=k)
    with tt.count_tasks() as built:
        res = to.top_k(te, tr, k=k, memory_limit=limit, compute_now=False)
    assert (built.tasks, built.computes) == (0, 0)
    assert reads == []
    tt.assert_lazy(res)
    with tt.count_tasks() as run:
        values = res.compute()
    assert run.tasks > 0
    tt.assert_top_k_equal(values, reference_scores(te, tr), k)
    assert all(not dask.is_dask_collection(values[v].data) for v in values.data_vars)


def _name(key) -> str:
    return str(key[0] if isinstance(key, tuple) else key)


KEY_NAME = re.compile(r"^trackin-(test-block|topk-part|topk-merge\d+|topk|topk-field\d)-[0-9a-f]+$")


def test_top_k_graph_is_part_and_merge_tasks(stores):
    """The top-k graph holds test-block reads, per-block top-k parts and merges: no score-block task."""
    te, tr = stores
    k = 2
    limit = small_budget(te, tr, 1, 4, k=k)  # 4-row train blocks (one store chunk each): 10 parts
    plan = to.plan_for(te, tr, memory_limit=limit, k=k)
    n_i, n_j = len(plan.test_blocks(N_TEST)), len(plan.train_blocks(N_TRAIN))
    assert n_j > 8  # more parts than one merge task takes: a tree of merges
    res = to.top_k(te, tr, k=k, memory_limit=limit, compute_now=False)
    graph = {}
    for v in res.data_vars:
        graph.update(dict(res[v].data.__dask_graph__()))
    names = {_name(key) for key in graph}
    assert names and all(KEY_NAME.match(n) for n in names), sorted(names)
    assert not any("influence" in n for n in names)
    parts = [key for key in graph if "topk-part" in key[0]]
    assert len(parts) == n_i * n_j
    assert any("topk-merge2" in n for n in names)


def test_top_k_tasks_never_return_score_blocks(stores):
    """At run time no task's result is as wide as a train block (k < train rows): score blocks stay
    inside the task that made them."""
    te, tr = stores
    k = 2
    limit = small_budget(te, tr, 3, 6, k=k)
    plan = to.plan_for(te, tr, memory_limit=limit, k=k)
    assert k < plan.train_rows and plan.train_rows not in (C * F, N_TRAIN)
    res = to.top_k(te, tr, k=k, memory_limit=limit, compute_now=False)
    with tt.count_tasks(record_shapes=True) as run:
        values = res.compute()
    tt.assert_top_k_equal(values, reference_scores(te, tr), k)
    assert run.tasks > 0
    ours = [shapes for key, shapes in run.result_shapes.items() if _name(key).startswith("trackin-")]
    assert len(ours) >= len(plan.test_blocks(N_TEST)) * len(plan.train_blocks(N_TRAIN))
    widths = {shape[-1] for shapes in ours for shape in shapes if len(shape) == 2}
    assert all(w <= k or w == C * F for w in widths), widths
    biggest = max(int(np.prod(s)) for shapes in ours for s in shapes)
    assert biggest <= plan.test_rows * max(k, C * F)
    # The same check sees score blocks where they are the result: the influence matrix's tasks.
    with tt.count_tasks(record_shapes=True) as inf:
        to.influence(te, tr, memory_limit=small_budget(te, tr, 3, 6)).compute()
    widths = {
        shape[-1]
        for key, shapes in inf.result_shapes.items()
        for shape in shapes
        if len(shape) == 2 and _name(key).startswith("trackin-")
    }
    assert to.plan_for(te, tr, memory_limit=small_budget(te, tr, 3, 6)).train_rows in widths
