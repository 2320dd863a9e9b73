"""A capture run in its own process, for the kill-and-resume tests (tests/test_resume_capture.py).

    python capture_child.py OUT CKPT [CKPT ...]

The digits MLP of ``trackin_ooc.demo.examples`` over its small train split, 10 row blocks of 30
rows. Two environment variables make the run stop where the test wants to kill it:

- ``CHILD_SLEEP_AT=i``: reading example ``i`` blocks (the test kills the process meanwhile);
- ``CHILD_HOLD_LAST_WRITE=FILE``: the last row block's gradients are written, then FILE is created
  and the process waits before its losses, labels and block flag (a kill in the middle of a write).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from torch.utils.data import Dataset

import trackin_ooc as to
from trackin_ooc.demo.examples import digits_mlp_model, digits_train_small
from trackin_ooc.store import gradient_store, layout

CHUNK_ROWS = 30
BATCH = 16  # does not divide the block: batches are cut per block


class Paused(Dataset):
    def __init__(self, base, at: int | None):
        self.base, self.at = base, at

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == self.at:
            time.sleep(600)
        return self.base[i]


def hold_last_write(marker: Path) -> None:
    original = gradient_store.GradientStore.write_block

    def write_block(self, start, block):
        if start == self.row_blocks()[-1][0]:
            self._writable()
            grads = block.grads
            self._array(layout.GRADS)[:, start : start + grads.shape[1], :] = layout.encode(grads, self.dtype)
            marker.touch()
            time.sleep(600)
        return original(self, start, block)

    gradient_store.GradientStore.write_block = write_block


def main() -> None:
    out, ckpts = sys.argv[1], sys.argv[2:]
    at = os.environ.get("CHILD_SLEEP_AT")
    if os.environ.get("CHILD_HOLD_LAST_WRITE"):
        hold_last_write(Path(os.environ["CHILD_HOLD_LAST_WRITE"]))
    data = Paused(digits_train_small(), None if at is None else int(at))
    to.capture(
        digits_mlp_model(), ckpts, data, out, projection_dim=24, chunk_rows=CHUNK_ROWS, batch_size=BATCH, progress=False
    )


if __name__ == "__main__":
    main()
