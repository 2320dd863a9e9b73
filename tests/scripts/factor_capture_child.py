"""``capture_child.py`` with ``projection="factors"``, for the kill-and-resume test of a factor store
(tests/test_factor_store.py).

    python factor_capture_child.py OUT CKPT [CKPT ...]

The same digits MLP, data, row blocks and kill hooks (``CHILD_SLEEP_AT``, ``CHILD_HOLD_LAST_WRITE``)
as ``capture_child.py``; the store holds per-layer factors (layout version 2). ``CHILD_SLEEP_AT``
blocks on the capture's read of the example, not on the probe that reads every example first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import capture_child  # noqa: E402

import trackin_ooc as to  # noqa: E402
from trackin_ooc.demo.examples import digits_mlp_model, digits_train_small  # noqa: E402


class PausedAfterProbe(capture_child.Paused):
    """Blocks on the second read of example ``at``: the first is the capture's probe of positions per layer
    (every example is read once before any block is computed, since this dataset is not a TensorDataset)."""

    def __init__(self, base, at):
        super().__init__(base, at)
        self.reads = 0

    def __getitem__(self, i):
        if i == self.at:
            self.reads += 1
            if self.reads == 1:
                return self.base[i]
        return super().__getitem__(i)


def main() -> None:
    out, ckpts = sys.argv[1], sys.argv[2:]
    at = os.environ.get("CHILD_SLEEP_AT")
    if os.environ.get("CHILD_HOLD_LAST_WRITE"):
        capture_child.hold_last_write(Path(os.environ["CHILD_HOLD_LAST_WRITE"]))
    data = PausedAfterProbe(digits_train_small(), None if at is None else int(at))
    to.capture(
        digits_mlp_model(),
        ckpts,
        data,
        out,
        projection="factors",
        chunk_rows=capture_child.CHUNK_ROWS,
        batch_size=capture_child.BATCH,
        progress=False,
    )


if __name__ == "__main__":
    main()
