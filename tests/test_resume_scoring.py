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

N_TEST, N_TRAIN, C, F = 60, 1600, 2, 16

# The run stops (sleeps) right after its HOLD-th block write, where the test kills it: a kill point that
# does not depend on how fast the machine is.
SCRIPT = textwrap.dedent(
    """
    import pathlib, sys, time, dask, trackin_ooc as to
    from dask.callbacks import Callback
    test, train, out, limit, hold, marker = sys.argv[1:]
    written = 0

    def posttask(key, result, dsk, state, worker_id):
        global written
        if str(key[0] if isinstance(key, tuple) else key).startswith("trackin-influence-write-"):
            written += 1
            if written == int(hold):
                pathlib.Path(marker).write_text(str(written))
                time.sleep(600)

    dask.config.set(scheduler="synchronous")
    with Callback(posttask=posttask):
        to.influence(test, train, out=out, memory_limit=int(limit), progress=False)
    """
)


def flags(out) -> np.ndarray:
    return zarr.open_group(str(out), mode="r")["task_complete"][:].astype(bool)


def test_killed_influence_resumes_to_the_same_matrix(tmp_path):
    rng = np.random.default_rng(0)
    lrs = [0.3, 0.1]
    test = to.from_arrays(
        tmp_path / "test.zarr", rng.standard_normal((C, N_TEST, F)).astype(np.float32), lrs, chunk_rows=16
    )
    train = to.from_arrays(
        tmp_path / "train.zarr", rng.standard_normal((C, N_TRAIN, F)).astype(np.float32), lrs, chunk_rows=16
    )
    # A budget for 16-row test blocks and 16-row train blocks: 4 × 100 tasks.
    limit = worker_bytes(16, 16, C * F, 4, resources.detect().threads)
    plan = to.plan_for(test, train, memory_limit=limit)
    n_tasks = len(plan.test_blocks(N_TEST)) * len(plan.train_blocks(N_TRAIN))
    assert n_tasks >= 200
    out = tmp_path / "influence.zarr"

    hold = n_tasks // 4
    for attempt in range(3):  # kill at a few different points, resuming each time
        marker = tmp_path / f"held{attempt}"
        proc = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, test.path, train.path, str(out), str(limit), str(hold), str(marker)],
            env={**os.environ, "TRACKIN_OOC_QUIET": "1"},
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"the run ended before its kill point: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "the run never reached its kill point"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # Each run wrote only blocks the earlier ones had not, and the output is never marked complete
        # while blocks are missing.
        assert int(flags(out).sum()) == (attempt + 1) * hold
        assert zarr.open_group(str(out), mode="r").attrs["trackin_ooc"]["complete"] is False

    before = flags(out)
    resumed = to.influence(test, train, out=out, memory_limit=limit)
    assert resumed.attrs["complete"] is True
    uninterrupted = to.influence(test, train, out=tmp_path / "uninterrupted.zarr", memory_limit=limit)
    np.testing.assert_array_equal(resumed.values, uninterrupted.values)  # bit for bit
    np.testing.assert_allclose(resumed.values, to.influence(test, train).values, rtol=1e-5, atol=1e-5)
    assert before.sum() < before.size  # there was work left to resume
