"""Row blocks assembled from batches and written in the background while the next ones compute."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ...errors import CaptureError
from ...store import GradientStore
from ...store.layout import NO_TOKEN
from ...store.rows import RowBlock


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
        self._buffer: RowBlock | None = None
        # Factor arrays of a projection="factors" store: name -> positions in the layout.
        self._positions = {}
        for f in store.factor_arrays:
            self._positions[f.name] = f.positions
            if f.tokens_name is not None:
                self._positions[f.tokens_name] = f.positions

    def _new_buffer(self) -> RowBlock:
        """A buffer for the current block, made only when a block is assembled from several batches."""
        start, stop = self.blocks[self._index]
        rows = stop - start
        s = self.store
        factors = {}
        for f in s.factor_arrays:
            factors[f.name] = np.zeros((s.n_checkpoints, rows, f.positions, f.width), dtype=np.float32)
            if f.tokens_name is not None:
                factors[f.tokens_name] = np.full((rows, f.positions), NO_TOKEN, dtype=np.int64)
        return RowBlock(
            grads=np.empty((s.n_checkpoints, rows, s.feature_dim), dtype=np.float32),
            losses=np.empty((s.n_checkpoints, rows), dtype=np.float32),
            labels=np.empty(rows, dtype=s.label_dtype) if self.with_labels else None,
            nonfinite=np.zeros(rows, dtype=np.uint8),
            sq_norms=np.full((s.n_checkpoints, rows), np.nan, dtype=np.float32),
            factors=factors or None,
        )

    def _padded(self, parts: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
        """Factor arrays with positions padded (zeros, token NO_TOKEN) to the store's layout."""
        if not self._positions:
            return None
        assert parts is not None, "a factors store's featurizer returns its factor arrays"
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

    def add(self, block: RowBlock) -> None:
        """Append a batch's rows (factor arrays padded here to the store's positions); whole store row blocks
        are sent to the writer as they fill."""
        block = dataclasses.replace(
            block, factors=self._padded(block.factors), labels=block.labels if self.with_labels else None
        )
        b, done = block.n_rows, 0
        while done < b:
            if self._index >= len(self.blocks):
                raise ValueError("more rows than the store holds")
            start, stop = self.blocks[self._index]
            take = min(b - done, stop - start - self._fill)
            rows = block.select(done, done + take)
            if self._fill == 0 and take == stop - start:  # a whole block in this batch: no copy
                self._submit(start, rows)
                done += take
                continue
            if self._buffer is None:
                self._buffer = self._new_buffer()
            buf, sl = self._buffer, slice(self._fill, self._fill + take)
            buf.grads[:, sl] = rows.grads
            assert buf.losses is not None and rows.losses is not None
            buf.losses[:, sl] = rows.losses
            if buf.labels is not None and rows.labels is not None:
                buf.labels[sl] = rows.labels
            assert buf.nonfinite is not None
            buf.nonfinite[sl] = 0 if rows.nonfinite is None else rows.nonfinite
            if rows.sq_norms is not None and buf.sq_norms is not None:
                buf.sq_norms[:, sl] = rows.sq_norms
            for k, v in (rows.factors or {}).items():
                target = (buf.factors or {})[k]
                if v.ndim == 2:
                    target[sl] = v
                else:
                    target[:, sl] = v
            self._fill += take
            done += take
            if self._fill == stop - start:
                self._submit(start, buf)
                self._buffer = None

    def _submit(self, start: int, block: RowBlock) -> None:
        self._drain(self.max_pending - 1)
        if block.nonfinite is not None and not block.nonfinite.any():
            block = dataclasses.replace(block, nonfinite=None)
        self._pending.append(self._pool.submit(self.store.write_block, start, block))
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
