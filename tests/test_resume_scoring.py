"""influence(out=) killed with SIGKILL mid-run, then rerun: only missing blocks are written, result exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import zarr

import trackin_ooc as to
from trackin_ooc.engine import resources
from trackin_ooc.engine.planning import worker_bytes

N_TEST, N_TRAIN, C, F = 60, 4000, 2, 16

SCRIPT = textwrap.dedent(
    """
    import sys, dask, trackin_ooc as to
    dask.config.set(scheduler="synchronous")
    to.influence(sys.argv[1], sys.argv[2], out=sys.argv[3], memory_limit=int(sys.argv[4]), progress=False)
    """
)


def test_killed_influence_resumes_to_the_same_matrix(tmp_path):
    rng = np.random.default_rng(0)
    lrs = [0.3, 0.1]
    test = to.from_arrays(tmp_path / "test.zarr", rng.standard_normal((C, N_TEST, F)).astype(np.float32), lrs,
                          chunk_rows=16)
    train = to.from_arrays(tmp_path / "train.zarr", rng.standard_normal((C, N_TRAIN, F)).astype(np.float32),
                           lrs, chunk_rows=16)
    # A budget for 16-row test blocks and 16-row train blocks: 4 × 250 tasks, slow enough to interrupt.
    limit = worker_bytes(16, 16, C * F, 4, resources.detect().threads)
    plan = to.plan_for(test, train, memory_limit=limit)
    n_tasks = len(plan.test_blocks(N_TEST)) * len(plan.train_blocks(N_TRAIN))
    assert n_tasks >= 200
    out = tmp_path / "influence.zarr"

    kills = 0
    for attempt in range(3):  # kill at a few different points, resuming each time
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, test.path, train.path, str(out), str(limit)],
                                env={**os.environ, "TRACKIN_OOC_QUIET": "1"})
        target = (attempt + 1) * n_tasks // 4
        deadline = time.monotonic() + 120
        done = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                done = int(zarr.open_group(str(out), mode="r")["task_complete"][:].sum())
            except Exception:  # not laid out yet, or a flag chunk read while it is being written: poll again
                pass
            if done >= target:
                break
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        meta = zarr.open_group(str(out), mode="r").attrs["trackin_ooc"]
        if done < n_tasks:
            assert meta["complete"] is False  # never marked complete while blocks are missing
    assert kills >= 1

    before = zarr.open_group(str(out), mode="r")["task_complete"][:].astype(bool)
    resumed = to.influence(test, train, out=out, memory_limit=limit)
    assert resumed.attrs["complete"] is True
    uninterrupted = to.influence(test, train, out=tmp_path / "uninterrupted.zarr", memory_limit=limit)
    np.testing.assert_array_equal(resumed.values, uninterrupted.values)  # bit for bit
    np.testing.assert_allclose(resumed.values, to.influence(test, train).values, rtol=1e-5, atol=1e-5)
    assert before.sum() < before.size  # there was work left to resume
