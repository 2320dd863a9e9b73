"""Pure planning: row-block sizes from feature width, dtype, checkpoints and a memory budget.

No I/O and no arrays here, so the arithmetic is tested on its own (tests/test_planning.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import PlanningError

# A train block this tall keeps a GEMM efficient; beyond it, more rows buy nothing.
TARGET_TRAIN_ROWS = 16384
MIN_TRAIN_ROWS = 1024
# Test blocks are as tall as memory allows (each test block streams the train store once).
MAX_TEST_ROWS = 1 << 16


@dataclass(frozen=True)
class BlockPlan:
    """Row-block sizes for one scoring job and the memory they need per worker."""

    test_rows: int
    train_rows: int
    width: int  # checkpoints × features: the GEMM's inner dimension
    threads: int  # tasks running at once per worker
    memory_limit: int  # bytes per worker
    estimated_bytes: int  # what the plan needs per worker at most

    def test_blocks(self, n_test: int) -> list[tuple[int, int]]:
        return blocks(n_test, self.test_rows)

    def train_blocks(self, n_train: int) -> list[tuple[int, int]]:
        return blocks(n_train, self.train_rows)


def blocks(n_rows: int, block_rows: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of ``block_rows`` covering 0..n_rows once, in order."""
    if block_rows <= 0:
        raise ValueError("block_rows must be positive")
    return [(s, min(s + block_rows, n_rows)) for s in range(0, n_rows, block_rows)]


@dataclass(frozen=True)
class Scratch:
    """Temporaries a kernel holds per task beyond the blocks themselves: ``fixed`` bytes plus
    ``per_train_row`` bytes for each train row of the block (the factor kernels' tiles and strips)."""

    fixed: int = 0
    per_train_row: int = 0

    def bytes(self, train_rows: int) -> int:
        return self.fixed + self.per_train_row * train_rows


NO_SCRATCH = Scratch()


def task_bytes(
    test_rows: int, train_rows: int, width: int, itemsize: int, k: int = 0, scratch: Scratch = NO_SCRATCH
) -> int:
    """Peak bytes one scoring task holds: the train block as read and folded, the score block,
    its partition copy and candidate mask, the top-k partials and the kernel's ``scratch``."""
    train = train_rows * width * (itemsize + 4)
    score = test_rows * train_rows * 4
    select = test_rows * train_rows * 5  # partition copy (float32) + boolean mask
    partial = 4 * test_rows * max(k, 0) * 16
    return train + score + select + partial + scratch.bytes(train_rows)


def worker_bytes(
    test_rows: int, train_rows: int, width: int, itemsize: int, threads: int, k: int = 0, scratch: Scratch = NO_SCRATCH
) -> int:
    """Peak bytes per worker: the folded test block (and its raw read) plus ``threads`` tasks."""
    test = test_rows * width * (4 + 4)
    return test + threads * task_bytes(test_rows, train_rows, width, itemsize, k, scratch)


def _round_down(x: int, align: int) -> int:
    return max(align, (x // align) * align) if x >= align else x


# Tasks per thread a small job is cut into at least, so that no thread idles while one big block finishes.
MIN_TASKS_PER_THREAD = 4


def _balance(b: int, floor: int, n_train: int, n_test_blocks: int, threads: int, align: int) -> int:
    """Shorter train blocks when the job has too few tasks to keep every thread busy (smaller blocks
    only lower the memory needed); never below ``floor`` nor off the store's chunk alignment."""
    want = MIN_TASKS_PER_THREAD * threads
    if n_test_blocks * -(-n_train // b) >= want:
        return b
    per_test_block = -(-want // n_test_blocks)
    rows = -(-n_train // per_test_block)
    if align > 1:
        rows = (rows // align) * align
    return min(b, max(rows, floor, 1))


def plan_blocks(
    *,
    n_test: int,
    n_train: int,
    n_checkpoints: int,
    feature_dim: int,
    itemsize: int,
    memory_limit: int,
    threads: int = 1,
    k: int = 0,
    train_align: int = 1,
    test_align: int = 1,
    scratch: Scratch = NO_SCRATCH,
) -> BlockPlan:
    """Choose (test_rows, train_rows) that fit ``memory_limit`` bytes per worker.

    Train blocks are multiples of ``train_align`` (the store's chunk rows) where possible, and no
    taller than needed for an efficient GEMM; test blocks then take as many rows as the budget
    allows, since every test block reads the whole train store once. When a large test set cannot
    fit, train blocks shrink (down to MIN_TRAIN_ROWS) to make room for taller test blocks.
    ``feature_dim``: values per example and checkpoint as stored (a factor store's ``row_width``);
    ``scratch``: the kernel's temporaries per task.
    """
    if min(n_test, n_train, n_checkpoints, feature_dim, itemsize, threads) <= 0:
        raise ValueError("sizes, itemsize and threads must be positive")
    width = n_checkpoints * feature_dim
    want_test = min(n_test, MAX_TEST_ROWS)

    def max_test_rows(b: int) -> int:
        fixed = threads * task_bytes(0, b, width, itemsize, 0, scratch)
        per_row = worker_bytes(1, b, width, itemsize, threads, k, scratch) - worker_bytes(
            0, b, width, itemsize, threads, 0, scratch
        )
        return (memory_limit - fixed) // per_row if memory_limit > fixed else 0

    b = min(n_train, _round_down(TARGET_TRAIN_ROWS, train_align) if train_align <= TARGET_TRAIN_ROWS else train_align)
    floor = min(n_train, max(1, min(MIN_TRAIN_ROWS, b)))
    if train_align <= floor < n_train:
        floor = _round_down(floor, train_align)
    a = max_test_rows(b)
    while a < want_test and b > floor:
        b = max(floor, _round_down(b // 2, train_align) if b // 2 >= train_align else b // 2)
        a = max_test_rows(b)
    # A budget too small for an aligned block may still fit smaller, unaligned ones.
    while a < 1 and b > 1:
        b = max(1, _round_down(b // 2, train_align) if b // 2 >= train_align else b // 2)
        a = max_test_rows(b)
    if a < 1:
        raise PlanningError(
            f"memory_limit={memory_limit} bytes cannot hold one test row and one train row of width "
            f"{width}; raise memory_limit (about {worker_bytes(1, 1, width, itemsize, threads, k, scratch)} bytes)"
        )
    a = min(a, want_test)
    if a >= test_align and a < n_test:
        a = _round_down(a, test_align)
    b = _balance(b, floor, n_train, -(-n_test // a), threads, train_align)
    est = worker_bytes(a, b, width, itemsize, threads, k, scratch)
    return BlockPlan(
        test_rows=int(a),
        train_rows=int(b),
        width=width,
        threads=threads,
        memory_limit=int(memory_limit),
        estimated_bytes=int(est),
    )
