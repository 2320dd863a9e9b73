"""RowBlock: the rows of a gradient store as a capture makes them, in one value from featurizer to disk.

A featurizer makes one per batch (:meth:`~trackin_ooc.capturing.projection.featurizer.Featurizer.rows`),
the capture checks it for non-finite values and adds its labels, the block writer assembles whole store
row blocks of them, and :meth:`~trackin_ooc.store.GradientStore.write_block` writes one. A new per-row
array is a new field here, not a new positional argument in every function on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass
class RowBlock:
    """Consecutive rows of a gradient store, every checkpoint at once (host NumPy arrays).

    Parameters
    ----------
    grads
        (checkpoint, rows, feature) float32: the features; in a factor store, the flat part (maybe 0 wide).
    losses
        (checkpoint, rows): per-example losses, or None (a store made from arrays without them).
    labels
        (rows,): per-example targets where they are scalars, else None.
    nonfinite
        (rows,) uint8: examples stored as zeros because their gradients or loss were NaN/inf; None: none.
    sq_norms
        (checkpoint, rows): exact squared gradient norms before projection, where the capture measures them.
    factors
        A factor store's per-layer arrays by store array name: ``factors_<i>`` (checkpoint, rows,
        positions, width) and ``tokens_<i>`` (rows, positions); None for a flat store.
    """

    grads: np.ndarray
    losses: np.ndarray | None = None
    labels: np.ndarray | None = None
    nonfinite: np.ndarray | None = None
    sq_norms: np.ndarray | None = None
    factors: dict[str, np.ndarray] | None = None

    @property
    def n_rows(self) -> int:
        return int(self.grads.shape[1])

    def select(self, start: int, stop: int) -> RowBlock:
        """Rows [start, stop) of this block (views, no copies)."""
        return replace(
            self,
            grads=self.grads[:, start:stop],
            losses=None if self.losses is None else self.losses[:, start:stop],
            labels=None if self.labels is None else self.labels[start:stop],
            nonfinite=None if self.nonfinite is None else self.nonfinite[start:stop],
            sq_norms=None if self.sq_norms is None else self.sq_norms[:, start:stop],
            factors=None if self.factors is None else {k: factor_rows(v, start, stop) for k, v in self.factors.items()},
        )


def factor_rows(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a factor array: axis 1 of values (C, b, T, w), axis 0 of token ids (b, T)."""
    return x[start:stop] if x.ndim == 2 else x[:, start:stop]
