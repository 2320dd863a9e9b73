"""Shared pieces of the engine benchmarks: random stores, the NumPy GEMM yardstick, peak memory."""

from __future__ import annotations

import os
import threading
import time

import dask.array as da
import numpy as np
import psutil

import trackin_ooc as to

DATA = os.environ.get("TRACKIN_BENCH_DATA", os.path.join(os.path.dirname(__file__), "_data"))


def random_store(
    name: str, n_checkpoints: int, n_examples: int, features: int, *, dtype="float32", seed: int = 0, reuse: bool = True
) -> to.GradientStore:
    """A complete store of random features, generated and written one block at a time."""
    path = os.path.join(DATA, name)
    if reuse and os.path.exists(path):
        try:
            st = to.open_store(path)
            if (
                st.complete
                and (st.n_checkpoints, st.n_examples, st.feature_dim) == (n_checkpoints, n_examples, features)
                and st.dtype == dtype
            ):
                return st
        except to.TrackinError:
            pass
    rows = 16384
    grads = da.random.default_rng(seed).standard_normal(
        (n_checkpoints, n_examples, features), chunks=(n_checkpoints, rows, features), dtype=np.float32
    )
    lrs = np.linspace(0.1, 0.02, n_checkpoints)
    return to.from_arrays(path, grads, lrs, dtype=dtype, overwrite=True)


def gemm_rate(test_rows: int, train_rows: int, width: int, *, device: str = "cpu", seconds: float = 5.0) -> float:
    """FLOP/s of in-memory float32 ``A @ B.T`` for these block shapes: NumPy (all cores) or CuPy."""
    if device == "gpu":
        import cupy as xp

        sync = xp.cuda.Device().synchronize
    else:
        xp, sync = np, (lambda: None)
    rng = xp.random.default_rng(0)
    a = rng.standard_normal((test_rows, width), dtype=xp.float32)
    b = rng.standard_normal((train_rows, width), dtype=xp.float32)
    a @ b.T  # warm-up
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        a @ b.T
        n += 1
    sync()
    return 2.0 * test_rows * train_rows * width * n / (time.perf_counter() - t0)


def warm_page_cache(path: str) -> int:
    """Read every file under ``path`` once; returns bytes read."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                while chunk := fh.read(1 << 24):
                    total += len(chunk)
    return total


class PeakMemory:
    """Samples the resident memory of this process and all its children; keeps the peak."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process()
        total = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
