"""The block-task seam: the Dask task functions a graph of :mod:`.graphs` calls, for either store layout.

:mod:`.tasks` (one gradient matrix) and :mod:`.factor_tasks` (per-layer factors, ``projection="factors"``)
are two modules with the same function names and signatures; ``graphs.block_tasks(store)`` picks one per
store. :class:`BlockTasks` writes that interface down: both modules satisfy it (a module is a structural
match for a Protocol), and ``tests/test_import_surface.py`` checks the names and parameters of each.
What a test block is differs (folded rows for a flat store, ``FactorRows`` for a factor store): graphs pass
what ``read_test_block`` returned, untouched, to the other functions of the same module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .tasks import StoreRef


@runtime_checkable
class BlockTasks(Protocol):
    """Task functions over row blocks [start, stop) of a store reopened from ``ref`` inside the task."""

    def read_test_block(self, ref: StoreRef, start: int, stop: int, weights: Sequence[float], normalize: bool) -> Any:
        """Test rows scaled by η_c (and normalised with ``normalize``), on the host."""
        ...

    def score_block(self, test: Any, ref: StoreRef, start: int, stop: int, normalize: bool, backend: str) -> np.ndarray:
        """One (test block × train block) influence block on the host."""
        ...

    def topk_block(self, test: Any, ref: StoreRef, start: int, stop: int, k: int, normalize: bool, backend: str) -> Any:
        """The k best and worst of one score block (which never leaves the task)."""
        ...

    def write_influence_block(
        self,
        test: Any,
        ref: StoreRef,
        start: int,
        stop: int,
        normalize: bool,
        backend: str,
        out_path: str,
        out_options: str,
        task: tuple[int, int],
        row0: int,
    ) -> int:
        """Score one block, write it as whole chunks of the output; rows × cols written."""
        ...

    def self_influence_block(
        self, ref: StoreRef, start: int, stop: int, weights: Sequence[float], backend: str
    ) -> np.ndarray:
        """Σ_c η_c ‖g_c‖² of rows [start, stop)."""
        ...

    def exact_self_influence_block(self, ref: StoreRef, start: int, stop: int, weights: Sequence[float]) -> np.ndarray:
        """The same from the exact squared norms a capture stored."""
        ...

    def merge_topk(self, parts: Iterable[Any], k: int) -> Any:
        """Merge top-k parts of several blocks into one."""
        ...

    def done(self, *counts: int) -> int:
        """The sum of what the write tasks report (a graph's last task)."""
        ...

    def getitem(self, obj: Any, i: int) -> Any:
        """``obj[i]``, as a task."""
        ...


#: The names every block-task module defines.
TASK_NAMES = (
    "read_test_block",
    "score_block",
    "topk_block",
    "write_influence_block",
    "self_influence_block",
    "exact_self_influence_block",
    "merge_topk",
    "done",
    "getitem",
)
