"""Non-finite gradients or losses: refused with the example ids, or (opt-in) stored as zeros and flagged.

A NaN in one train row would turn every score against it into NaN and break top-k's ordering, so it
never reaches the store silently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import NonFiniteError
from ...store.rows import RowBlock

NONFINITE_POLICIES = ("raise", "flag")
SHOWN = 8


def check_finite(block: RowBlock, start: int, policy: str, checkpoint_names: Sequence[str]) -> RowBlock:
    """Check a batch's rows (from ``start``) for NaN/inf features, losses, squared norms or factor arrays.

    ``policy="raise"`` raises :class:`NonFiniteError` naming the examples and checkpoints;
    ``"flag"`` zeroes the bad examples' features (and squared norms) at every checkpoint in place (their losses
    keep the NaN/inf) and sets ``block.nonfinite`` to their flags. Returns ``block``.
    """
    block.nonfinite = _flags(block.grads, block.losses, start, policy, checkpoint_names, block.sq_norms, block.factors)
    return block


def _flags(
    feats: np.ndarray,
    losses: np.ndarray | None,
    start: int,
    policy: str,
    checkpoint_names: Sequence[str],
    sq_norms: np.ndarray | None,
    factors: dict[str, np.ndarray] | None,
) -> np.ndarray | None:
    """Per-example flags (None when all finite); the bad rows zeroed in place under ``"flag"``."""
    bad_grad = ~np.isfinite(feats).all(axis=2)  # (C, b)
    values = [v for v in (factors or {}).values() if v.dtype.kind == "f"]  # token ids are integers
    for v in values:
        bad_grad |= ~np.isfinite(v).all(axis=(2, 3))
    if sq_norms is not None:
        bad_grad |= ~np.isfinite(sq_norms)
    bad = bad_grad if losses is None else bad_grad | ~np.isfinite(losses)
    if not bad.any():
        return None
    rows = bad.any(axis=0)
    if policy == "raise":
        ids = np.flatnonzero(rows) + start
        ckpts = [checkpoint_names[int(c)] for c in np.flatnonzero(bad.any(axis=1))]
        shown = ", ".join(str(int(i)) for i in ids[:SHOWN]) + (" ..." if len(ids) > SHOWN else "")
        raise NonFiniteError(
            f"non-finite gradients or losses for {len(ids)} example(s) (ids {shown}) at checkpoint(s) "
            f"{', '.join(ckpts)}; fix the data or model, or pass nonfinite='flag' (--allow-nonfinite) to "
            "store them as zeros and flag them"
        )
    feats[:, rows] = 0.0
    for v in values:
        v[:, rows] = 0.0
    if sq_norms is not None:
        sq_norms[:, rows] = 0.0
    return rows.astype(np.uint8)
