"""One writer per store: a second capture into a store being written is refused; the store stays intact."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from torch.utils.data import Dataset

import trackin_ooc as to


class SlowDigits(Dataset):
    """The digits train set, with a pause on one example so a capture is still running when we look."""

    def __init__(self, base, gate: threading.Event, release: threading.Event):
        self.base, self.gate, self.release = base, gate, release

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        if i == 100:
            self.gate.set()
            self.release.wait(60)
        return self.base[i]


def test_second_capture_into_a_live_store_is_refused(mlp, digits, tmp_path):
    path = tmp_path / "train.zarr"
    gate, release = threading.Event(), threading.Event()
    result: dict = {}

    def first():
        result["store"] = to.capture(
            mlp.model,
            mlp.checkpoints,
            SlowDigits(digits.train, gate, release),
            path,
            batch_size=50,
            chunk_rows=64,
            projection_dim=64,
            device="cpu",
        )

    t = threading.Thread(target=first)
    t.start()
    assert gate.wait(60)
    try:
        with pytest.raises(to.StoreLockedError, match="being written by another process") as e:
            to.capture(mlp.model, mlp.checkpoints, digits.train, path, projection_dim=64, overwrite=True, device="cpu")
        assert "\n" not in str(e.value)
    finally:
        release.set()
        t.join(120)
    store = result["store"]
    assert store.complete
    again = to.capture(
        mlp.model,
        mlp.checkpoints,
        digits.train,
        tmp_path / "again.zarr",
        batch_size=50,
        chunk_rows=64,
        projection_dim=64,
        device="cpu",
    )
    np.testing.assert_array_equal(to.open_store(path).read_grads(), again.read_grads())
    # The lock died with its holder: the same path can be written again.
    to.capture(mlp.model, mlp.checkpoints, digits.train, path, projection_dim=64, overwrite=True, device="cpu")


def test_failed_capture_stops_its_writer_thread(mlp, digits, tmp_path):
    class Broken(Dataset):
        def __len__(self):
            return 300

        def __getitem__(self, i):
            if i == 200:
                raise RuntimeError("disk gone")
            return digits.train[i]

    with pytest.raises(RuntimeError, match="disk gone"):
        to.capture(
            mlp.model, mlp.checkpoints, Broken(), tmp_path / "a.zarr", chunk_rows=64, batch_size=32, device="cpu"
        )
    assert not [t for t in threading.enumerate() if t.name.startswith("trackin-writer")]
    assert not to.open_store(tmp_path / "a.zarr").complete
