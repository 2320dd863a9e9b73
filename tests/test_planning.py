"""Block planning (pure arithmetic): budgets, coverage, alignment; and the store's chunk layout."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trackin_ooc.engine import planning
from trackin_ooc.engine.planning import PlanningError, blocks, plan_blocks, task_bytes, worker_bytes
from trackin_ooc.store import layout

SETTINGS = settings(max_examples=40, deadline=None)


def assert_partition(ranges: list[tuple[int, int]], n_rows: int, block_rows: int) -> None:
    """[start, stop) ranges: in order, non-empty, at most block_rows, covering 0..n_rows once."""
    assert all(start < stop for start, stop in ranges), "an empty block"
    assert all(stop - start <= block_rows for start, stop in ranges)
    covered = [r for start, stop in ranges for r in range(start, stop)]
    assert covered == list(range(n_rows))
    # Every block but the last is full.
    assert all(stop - start == block_rows for start, stop in ranges[:-1])


@st.composite
def problems(draw, max_rows: int = 200_000):
    n_checkpoints = draw(st.integers(1, 8))
    feature_dim = draw(st.integers(1, 4096))
    exponent = draw(st.integers(1, 40))  # budgets from far too small to generous
    return dict(
        n_test=draw(st.integers(1, max_rows)),
        n_train=draw(st.integers(1, max_rows)),
        n_checkpoints=n_checkpoints,
        feature_dim=feature_dim,
        itemsize=draw(st.sampled_from([2, 4])),
        threads=draw(st.integers(1, 16)),
        k=draw(st.integers(0, 100)),
        train_align=draw(st.one_of(st.integers(1, 64), st.integers(1, 40_000))),
        test_align=draw(st.one_of(st.integers(1, 64), st.integers(1, 40_000))),
        memory_limit=2**exponent + draw(st.integers(0, 2**exponent)),
    )


def smallest_bytes(p: dict) -> int:
    width = p["n_checkpoints"] * p["feature_dim"]
    return worker_bytes(1, 1, width, p["itemsize"], p["threads"], p["k"])


@SETTINGS
@given(p=problems())
def test_plan_fits_budget_or_refuses(p):
    if smallest_bytes(p) > p["memory_limit"]:
        with pytest.raises(PlanningError, match="memory_limit"):
            plan_blocks(**p)
        return
    plan = plan_blocks(**p)
    width = p["n_checkpoints"] * p["feature_dim"]
    assert plan.width == width
    assert plan.threads == p["threads"]
    assert plan.memory_limit == p["memory_limit"]
    assert 1 <= plan.test_rows <= min(p["n_test"], planning.MAX_TEST_ROWS)
    assert 1 <= plan.train_rows <= p["n_train"]
    assert plan.estimated_bytes == worker_bytes(
        plan.test_rows, plan.train_rows, width, p["itemsize"], p["threads"], p["k"]
    )
    assert plan.estimated_bytes <= p["memory_limit"]


@SETTINGS
@given(p=problems())
def test_plan_blocks_cover_rows_once(p):
    try:
        plan = plan_blocks(**p)
    except PlanningError:
        assert smallest_bytes(p) > p["memory_limit"]
        return
    assert_partition(plan.test_blocks(p["n_test"]), p["n_test"], plan.test_rows)
    assert_partition(plan.train_blocks(p["n_train"]), p["n_train"], plan.train_rows)


@SETTINGS
@given(p=problems())
def test_plan_aligns_train_blocks_to_store_chunks(p):
    """Train blocks start on store chunk boundaries whenever a chunk fits in a block."""
    try:
        plan = plan_blocks(**p)
    except PlanningError:
        return
    if p["train_align"] <= plan.train_rows:
        starts = [s for s, _ in plan.train_blocks(p["n_train"])]
        assert all(s % p["train_align"] == 0 for s in starts), (plan, p["train_align"])


@pytest.mark.parametrize(
    "case",
    [
        # The MIN_TRAIN_ROWS floor (1024) is used as is over 1000-row chunks.
        dict(
            n_test=60_000,
            n_train=100_000,
            n_checkpoints=1,
            feature_dim=512,
            itemsize=4,
            threads=1,
            memory_limit=1 << 28,
            train_align=1000,
        ),
        # The small-budget loop halves 6 -> 3 over 2-row chunks (2 rows would fit).
        dict(
            n_test=1, n_train=6, n_checkpoints=1, feature_dim=1, itemsize=2, threads=1, memory_limit=64, train_align=2
        ),
    ],
)
def test_plan_train_alignment_regressions(case):
    plan = plan_blocks(**case)
    assert plan.train_rows % case["train_align"] == 0, plan


@SETTINGS
@given(p=problems())
def test_plan_aligns_test_blocks_to_store_chunks(p):
    """Test blocks (when there is more than one) are multiples of the test store's chunk rows."""
    try:
        plan = plan_blocks(**p)
    except PlanningError:
        return
    if p["test_align"] <= plan.test_rows:
        starts = [s for s, _ in plan.test_blocks(p["n_test"])]
        assert all(s % p["test_align"] == 0 for s in starts), (plan, p["test_align"])


@SETTINGS
@given(p=problems())
def test_plan_test_blocks_are_as_tall_as_the_budget_allows(p):
    """Every test block reads the whole train store, so test blocks take all the memory they can."""
    try:
        plan = plan_blocks(**p)
    except PlanningError:
        return
    want = min(p["n_test"], planning.MAX_TEST_ROWS)
    if plan.test_rows == want:
        return
    aligned = plan.test_rows >= p["test_align"]
    step = p["test_align"] if aligned else 1
    assert (
        plan.test_rows + step > want
        or worker_bytes(plan.test_rows + step, plan.train_rows, plan.width, p["itemsize"], p["threads"], p["k"])
        > p["memory_limit"]
    )


def test_plan_with_ample_memory_is_one_test_block_and_target_train_blocks():
    plan = plan_blocks(
        n_test=5000,
        n_train=1_000_000,
        n_checkpoints=2,
        feature_dim=256,
        itemsize=4,
        memory_limit=1 << 34,
        threads=4,
        k=10,
        train_align=1024,
    )
    assert plan.test_rows == 5000
    assert plan.train_rows == planning.TARGET_TRAIN_ROWS


@given(n_train=st.integers(1, 200_000), threads=st.integers(1, 16), align=st.sampled_from([1, 16, 512, 1024]))
def test_a_small_job_is_cut_into_enough_tasks_for_every_thread(n_train, threads, align):
    """Few, large train blocks would leave threads idle while the last one finishes (20,000 rows in
    16,384 + 3,616 on two threads); the plan cuts at least MIN_TASKS_PER_THREAD per thread where the
    floor (MIN_TRAIN_ROWS, alignment) allows, and never makes blocks taller."""
    plan = plan_blocks(
        n_test=1000,
        n_train=n_train,
        n_checkpoints=5,
        feature_dim=2048,
        itemsize=4,
        memory_limit=1 << 36,
        threads=threads,
        k=10,
        train_align=align,
    )
    ample = plan_blocks(
        n_test=1000,
        n_train=n_train,
        n_checkpoints=5,
        feature_dim=2048,
        itemsize=4,
        memory_limit=1 << 36,
        threads=1,
        k=10,
        train_align=align,
    )
    tasks = len(plan.train_blocks(n_train)) * len(plan.test_blocks(1000))
    floor = min(n_train, planning.MIN_TRAIN_ROWS)
    assert plan.train_rows <= ample.train_rows
    assert tasks >= planning.MIN_TASKS_PER_THREAD * threads or plan.train_rows <= max(floor, align)
    if align <= plan.train_rows < n_train:
        assert plan.train_rows % align == 0


def test_plan_shrinks_train_blocks_for_taller_test_blocks():
    kw = dict(n_test=60_000, n_train=100_000, n_checkpoints=1, feature_dim=512, itemsize=4, threads=1, train_align=256)
    roomy = plan_blocks(memory_limit=1 << 36, **kw)
    tight = plan_blocks(memory_limit=1 << 30, **kw)
    assert tight.estimated_bytes <= 1 << 30
    assert tight.train_rows < roomy.train_rows
    assert tight.train_rows >= planning.MIN_TRAIN_ROWS


def test_plan_refuses_a_budget_below_one_row():
    need = worker_bytes(1, 1, 8 * 1000, 4, 2, 5)
    with pytest.raises(PlanningError, match="raise memory_limit"):
        plan_blocks(
            n_test=10, n_train=10, n_checkpoints=8, feature_dim=1000, itemsize=4, memory_limit=need - 1, threads=2, k=5
        )
    plan = plan_blocks(
        n_test=10, n_train=10, n_checkpoints=8, feature_dim=1000, itemsize=4, memory_limit=need, threads=2, k=5
    )
    assert (plan.test_rows, plan.train_rows) == (1, 1)


def test_plan_rejects_non_positive_sizes():
    base = dict(n_test=10, n_train=10, n_checkpoints=1, feature_dim=4, itemsize=4, memory_limit=1 << 20)
    for name in ("n_test", "n_train", "n_checkpoints", "feature_dim", "itemsize"):
        with pytest.raises(ValueError):
            plan_blocks(**{**base, name: 0})
    with pytest.raises(ValueError):
        plan_blocks(**base, threads=0)


# ---- byte estimates and block ranges -------------------------------------------------------------
@SETTINGS
@given(
    a=st.integers(0, 5000),
    b=st.integers(0, 5000),
    width=st.integers(1, 5000),
    itemsize=st.sampled_from([2, 4]),
    threads=st.integers(1, 16),
    k=st.integers(0, 100),
    which=st.sampled_from(["a", "b", "width", "threads", "k"]),
    more=st.integers(1, 1000),
)
def test_worker_bytes_grow_with_every_size(a, b, width, itemsize, threads, k, which, more):
    args = dict(test_rows=a, train_rows=b, width=width, itemsize=itemsize, threads=threads, k=k)
    key = {"a": "test_rows", "b": "train_rows"}.get(which, which)
    bigger = {**args, key: args[key] + more}
    assert worker_bytes(**bigger) >= worker_bytes(**args)
    # The worker holds at least one task's blocks and the test block.
    assert worker_bytes(**args) >= task_bytes(a, b, width, itemsize, k) + a * width * 4
    # A score block is float32 and counted at least once per thread.
    assert worker_bytes(**args) >= threads * a * b * 4


@SETTINGS
@given(n_rows=st.integers(0, 10_000), block_rows=st.integers(1, 3000))
def test_blocks_partition_rows(n_rows, block_rows):
    ranges = blocks(n_rows, block_rows)
    assert_partition(ranges, n_rows, block_rows)
    assert len(ranges) == -(-n_rows // block_rows)
    assert layout.row_blocks(n_rows, block_rows) == ranges


@pytest.mark.parametrize("fn", [blocks, layout.row_blocks])
def test_blocks_reject_non_positive_block_rows(fn):
    for bad in (0, -3):
        with pytest.raises(ValueError):
            fn(10, bad)


# ---- the store's chunk layout ----------------------------------------------------------------------
@SETTINGS
@given(
    feature_dim=st.integers(1, 1 << 22),
    n_checkpoints=st.integers(1, 16),
    dtype=st.sampled_from(layout.STORAGE_DTYPES),
    n_examples=st.integers(1, 1 << 20),
)
def test_default_chunk_rows(feature_dim, n_checkpoints, dtype, n_examples):
    rows = layout.default_chunk_rows(feature_dim, n_checkpoints, dtype, n_examples)
    row_bytes = feature_dim * layout.itemsize(dtype)
    assert 1 <= rows <= n_examples
    assert rows <= layout.MAX_CHUNK_ROWS
    if rows == n_examples:
        return  # clipped to the data
    # A power of two, at least MIN_CHUNK_ROWS, within the byte target unless the minimum forces more.
    assert rows & (rows - 1) == 0
    assert rows >= layout.MIN_CHUNK_ROWS
    if rows > layout.MIN_CHUNK_ROWS:
        assert rows * row_bytes <= layout.TARGET_CHUNK_BYTES
    # ... and as large as the target allows.
    if rows < layout.MAX_CHUNK_ROWS:
        assert 2 * rows * row_bytes > layout.TARGET_CHUNK_BYTES


def test_default_chunk_rows_examples():
    # float32, 1024 features: 4 KiB rows -> 2048 rows in 8 MiB.
    assert layout.default_chunk_rows(1024, 3, "float32", 10**6) == layout.TARGET_CHUNK_BYTES // 4096
    assert layout.default_chunk_rows(1024, 3, "float16", 10**6) == layout.TARGET_CHUNK_BYTES // 2048
    assert layout.default_chunk_rows(1024, 3, "float32", 100) == 100
    assert layout.default_chunk_rows(1, 1, "float32", 10**9) == layout.MAX_CHUNK_ROWS
    assert layout.default_chunk_rows(1 << 24, 1, "float32", 10**6) == layout.MIN_CHUNK_ROWS
