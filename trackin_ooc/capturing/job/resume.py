"""Resuming a capture: what an existing store must agree on, and which row blocks are left to write.

Progress lives in the store itself (its ``block_complete`` flags), never in a side file that could
disagree with it; a store started by a different capture is refused with the differences in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import CaptureError
from ...store import GradientStore
from ...store.layout import FactorArray


@dataclass(frozen=True)
class StoreSettings:
    """What a capture lays out: a resumed store must have been laid out with the same."""

    n_checkpoints: int
    n_examples: int
    feature_dim: int
    fingerprint: str
    learning_rates: tuple[float, ...]
    checkpoint_hashes: tuple[str, ...]
    dtype: str
    loss_name: str | None
    label_dtype: str | None
    chunk_rows: int | None  # None: whatever the store chose
    factors: tuple[FactorArray, ...] = ()  # per-layer factor arrays (projection="factors")
    preconditioner: str = "none"  # also in the fingerprint; compared on its own to say so in words

    @property
    def row_width(self) -> int:
        """Values per example and checkpoint: the flat features and every factor array's."""
        return self.feature_dim + sum(f.row_values for f in self.factors)

    @classmethod
    def of(cls, store: GradientStore) -> StoreSettings:
        label = store.label_dtype
        return cls(
            n_checkpoints=store.n_checkpoints,
            n_examples=store.n_examples,
            feature_dim=store.feature_dim,
            fingerprint=store.fingerprint,
            learning_rates=tuple(float(x) for x in store.learning_rates),
            checkpoint_hashes=tuple(str(h) for h in store.checkpoint_hashes),
            dtype=store.dtype,
            loss_name=store.loss_name,
            label_dtype=None if label is None else str(np.dtype(label)),
            chunk_rows=store.chunk_rows,
            factors=tuple(store.factor_arrays),
            preconditioner=store.spec.preconditioner,
        )


_WORDS = {
    "n_checkpoints": "checkpoint count",
    "n_examples": "number of examples",
    "feature_dim": "feature width",
    "fingerprint": "projection (fingerprint)",
    "learning_rates": "learning rates",
    "checkpoint_hashes": "checkpoint contents (sha256)",
    "dtype": "storage dtype",
    "loss_name": "loss function",
    "label_dtype": "label dtype",
    "chunk_rows": "rows per chunk",
    "factors": "factor layers (positions per layer)",
    "preconditioner": "preconditioner",
}


def _short(value: Any) -> str:
    if isinstance(value, tuple) and value and isinstance(value[0], FactorArray):
        return "[" + ", ".join(f"{f.module}: {f.positions}" for f in value) + "]"
    if isinstance(value, tuple) and value and isinstance(value[0], str) and len(value[0]) == 64:
        return "[" + ", ".join(v[:12] for v in value) + "]"
    if isinstance(value, str) and len(value) > 24:
        return value[:16] + "…"
    return str(list(value) if isinstance(value, tuple) else value)


def differences(existing: StoreSettings, wanted: StoreSettings) -> list[str]:
    """Human-readable differences, e.g. ``"learning rates: store [0.1, 0.1] vs this capture [0.1, 0.05]"``."""
    out = []
    for name, words in _WORDS.items():
        have, want = getattr(existing, name), getattr(wanted, name)
        if name == "chunk_rows" and want is None:
            continue
        if name == "learning_rates" and len(have) == len(want) and np.allclose(have, want, rtol=1e-12, atol=0):
            continue
        if have != want:
            out.append(f"{words}: store {_short(have)} vs this capture {_short(want)}")
    return out


def check_resumable(store: GradientStore, wanted: StoreSettings) -> list[tuple[int, int]]:
    """Row blocks still to write in ``store``; refuses a store laid out by a different capture."""
    diff = differences(StoreSettings.of(store), wanted)
    if diff:
        raise CaptureError(
            f"cannot resume {store.path}: it was started by a different capture ({'; '.join(diff)}); "
            "rerun with the original settings, or pass overwrite=True (--overwrite) to start over"
        )
    done = store.blocks_done()
    return [b for b, ok in zip(store.row_blocks(), done) if not ok]
