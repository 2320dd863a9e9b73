"""Row blocks assembled from batches and written in the background while the next ones compute."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ...errors import CaptureError
from ...store import GradientStore
from ...store.layout import NO_TOKEN


class BlockWriter:
    """Collects per-batch rows into whole store row blocks and writes them on a writer thread.

    Rows arrive in the order of ``blocks`` (a subset of the store's row blocks: the ones still to
    write). At most ``max_pending`` blocks wait to be written, which bounds memory to a few blocks.
    """

    def __init__(self, store: GradientStore, blocks, with_labels: bool, max_pending: int = 2):
        self.store = store
        self.blocks = list(blocks)
        self.with_labels = with_labels
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trackin-writer")
        self._pending: list[Future] = []
        self._index = 0
        self._fill = 0
        self._grads = None
        self._parts: dict[str, np.ndarray] | None = None
        # Factor arrays of a projection="factors" store: name -> positions in the layout.
        self._positions = {}
        for f in store.factor_arrays:
            self._positions[f.name] = f.positions
            if f.tokens:
                self._positions[f.tokens_name] = f.positions

    def _new_buffers(self) -> None:
        """Buffers for the current block, made only when a block is assembled from several batches."""
        start, stop = self.blocks[self._index]
        rows = stop - start
        s = self.store
        self._grads = np.empty((s.n_checkpoints, rows, s.feature_dim), dtype=np.float32)
        self._losses = np.empty((s.n_checkpoints, rows), dtype=np.float32)
        self._labels = np.empty(rows, dtype=s.label_dtype) if self.with_labels else None
        self._flags = np.zeros(rows, dtype=np.uint8)
        self._norms = np.full((s.n_checkpoints, rows), np.nan, dtype=np.float32)
        self._parts = {}
        for f in s.factor_arrays:
            self._parts[f.name] = np.zeros((s.n_checkpoints, rows, f.positions, f.width), dtype=np.float32)
            if f.tokens:
                self._parts[f.tokens_name] = np.full((rows, f.positions), NO_TOKEN, dtype=np.int64)

    def _padded(self, parts: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """Factor arrays with positions padded (zeros, token NO_TOKEN) to the store's layout."""
        if not self._positions:
            return None
        out = {}
        for name, want in self._positions.items():
            x = parts[name]
            axis = x.ndim - 2 if x.ndim == 4 else 1  # (C, b, T, w) or token ids (b, T)
            have = x.shape[axis]
            if have > want:
                raise CaptureError(
                    f"a batch has {have} positions at {name} but the store was laid out for {want} (the most "
                    "the data had when the capture began); the data must yield the same examples every time"
                )
            if have < want:
                pad = [(0, 0)] * x.ndim
                pad[axis] = (0, want - have)
                x = np.pad(x, pad, constant_values=NO_TOKEN if x.ndim == 2 else 0)
            out[name] = x
        return out

    def add(self, grads: np.ndarray, losses: np.ndarray, labels: np.ndarray | None,
            flags: np.ndarray | None = None, norms: np.ndarray | None = None,
            parts: dict[str, np.ndarray] | None = None) -> None:
        """Append rows (C, b, F), (C, b), (b,), non-finite flags (b,) or None, exact squared norms
        (C, b) or None, and a factor store's per-layer arrays ({name: (C, b, T, w) or ids (b, T)}, padded
        here to the store's positions); whole blocks are sent to the writer as they fill."""
        parts = self._padded(parts)
        b, done = grads.shape[1], 0
        while done < b:
            if self._index >= len(self.blocks):
                raise ValueError("more rows than the store holds")
            start, stop = self.blocks[self._index]
            take = min(b - done, stop - start - self._fill)
            if self._fill == 0 and take == stop - start:  # a whole block in this batch: no copy
                self._submit(start, grads[:, done : done + take], losses[:, done : done + take],
                             None if labels is None or not self.with_labels else labels[done : done + take],
                             None if flags is None else flags[done : done + take],
                             None if norms is None else norms[:, done : done + take],
                             None if parts is None else {k: _rows(v, done, done + take) for k, v in parts.items()})
                done += take
                continue
            if self._grads is None:
                self._new_buffers()
            sl = slice(self._fill, self._fill + take)
            self._grads[:, sl] = grads[:, done : done + take]
            self._losses[:, sl] = losses[:, done : done + take]
            if self._labels is not None:
                self._labels[sl] = labels[done : done + take]
            self._flags[sl] = 0 if flags is None else flags[done : done + take]
            if norms is not None:
                self._norms[:, sl] = norms[:, done : done + take]
            for k, v in (parts or {}).items():
                target = self._parts[k]
                if v.ndim == 2:
                    target[sl] = v[done : done + take]
                else:
                    target[:, sl] = v[:, done : done + take]
            self._fill += take
            done += take
            if self._fill == stop - start:
                self._submit(start, self._grads, self._losses, self._labels, self._flags, self._norms,
                             self._parts or None)
                self._grads = None

    def _submit(self, start: int, grads, losses, labels, flags, norms, parts=None) -> None:
        self._drain(self.max_pending - 1)
        flags = flags if flags is not None and flags.any() else None
        self._pending.append(self._pool.submit(self.store.write_block, start, grads, losses, labels, flags, norms,
                                               parts))
        self._index += 1
        self._fill = 0

    def _drain(self, keep: int) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()

    def close(self) -> int:
        """Wait for all writes; return the number of complete blocks written."""
        try:
            self._drain(0)
        finally:
            self._pool.shutdown(wait=True)
        return self._index


def _rows(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a factor array: axis 1 of (C, b, T, w), axis 0 of token ids (b, T)."""
    return x[start:stop] if x.ndim == 2 else x[:, start:stop]
