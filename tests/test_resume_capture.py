"""Resumable capture: SIGKILL at several points, rerun, and get the store an uninterrupted run writes.

Each capture runs in its own process (tests/scripts/capture_child.py, factor_capture_child.py for a
store of per-layer factors) and is killed with SIGKILL, as a batch system or the OOM killer would:
before its first row block, mid-way (a factor store: the mechanism is the same for both layouts, each
row block flagged once all its arrays are written), and in the middle of writing its last block.
Rerunning the same capture (here, in this process) resumes from the store's own block flags and must
end with the same bytes as a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import trackin_ooc as to
from trackin_ooc import testing as tt

pytestmark = pytest.mark.timeout(300)

SCRIPTS = Path(__file__).resolve().parent / "scripts"
CHILDREN = {"flat": SCRIPTS / "capture_child.py", "factors": SCRIPTS / "factor_capture_child.py"}
CAPTURE = {  # what each child captures, as keyword arguments of to.capture
    "flat": dict(projection_dim=24, chunk_rows=30, batch_size=16, progress=False),
    "factors": dict(projection="factors", chunk_rows=30, batch_size=16, progress=False),
}
N_BLOCKS = 10  # 300 examples, 30 rows per block
WAIT = 120


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[str]:
    from trackin_ooc.demo import train_with_checkpoints
    from trackin_ooc.demo.examples import digits_mlp_model, digits_train_small

    paths = train_with_checkpoints(
        digits_mlp_model(), digits_train_small(), tmp_path_factory.mktemp("ckpt"), epochs=3, checkpoint_every=1, seed=0
    )
    return [str(p) for p in paths]


def child(kind: str, out: Path, checkpoints, **env) -> subprocess.Popen:
    e = dict(os.environ, TRACKIN_OOC_QUIET="1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()})
    return subprocess.Popen(
        [sys.executable, str(CHILDREN[kind]), str(out), *checkpoints],
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def capture_here(kind: str, out: Path, checkpoints) -> to.GradientStore:
    """The child's capture, in this process (one torch thread, as in the child: the same bytes)."""
    from trackin_ooc.demo.examples import digits_mlp_model, digits_train_small

    return to.capture(digits_mlp_model(), checkpoints, digits_train_small(), out, **CAPTURE[kind])


def blocks_done(path: Path) -> int:
    try:
        return int(to.open_store(path).blocks_done().sum())
    except Exception:  # not laid out yet
        return -1


def kill_when(proc: subprocess.Popen, ready) -> None:
    deadline = time.monotonic() + WAIT
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the capture ended (exit {proc.returncode}) before the kill point:\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, "the capture never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def uninterrupted(checkpoints, tmp_path_factory):
    """kind -> the store of a capture that was never interrupted."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            out = tmp_path_factory.mktemp(f"whole_{kind}") / "whole.zarr"
            store = capture_here(kind, out, checkpoints)
            assert store.complete and len(store.row_blocks()) == N_BLOCKS
            assert store.has_factors == (kind == "factors")
            made[kind] = out
        return made[kind]

    return get


KILL_POINTS = {
    # name: (store kind, environment of the killed run, when to kill, blocks written at the kill)
    "before the first block": ("flat", {"CHILD_SLEEP_AT": 1}, lambda out, marker: blocks_done(out) == 0, 0),
    "mid-way, a factor store": ("factors", {"CHILD_SLEEP_AT": 150}, lambda out, marker: blocks_done(out) == 5, 5),
    "while writing the last block": (
        "flat",
        {"CHILD_HOLD_LAST_WRITE": "{marker}"},
        lambda out, marker: marker.exists(),
        N_BLOCKS - 1,
    ),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkilled_capture_resumes_to_the_uninterrupted_store(point, checkpoints, uninterrupted, tmp_path):
    kind, env, ready, written = KILL_POINTS[point]
    out, marker = tmp_path / "train.zarr", tmp_path / "holding"
    env = {k: str(v).format(marker=marker) for k, v in env.items()}
    kill_when(child(kind, out, checkpoints, **env), lambda: ready(out, marker))

    killed = to.open_store(out)
    assert not killed.complete and int(killed.blocks_done().sum()) == written
    with pytest.raises(to.IncompleteStoreError, match="resume"):
        to.self_influence(killed)

    capture_here(kind, out, checkpoints)  # the same capture again: resumes (and is not refused by the dead lock)
    resumed = to.open_store(out)
    assert resumed.complete
    tt.assert_stores_identical(resumed, uninterrupted(kind))


def test_resume_computes_only_the_missing_blocks(mlp, digits, tmp_path, monkeypatch):
    """Blocks flagged written are not recomputed: count the examples the featurizer sees."""
    from trackin_ooc.capturing.job import capture_job as job_module

    out = tmp_path / "s.zarr"
    full = to.capture(
        mlp.model,
        mlp.checkpoints,
        digits.train,
        tmp_path / "full.zarr",
        projection_dim=16,
        chunk_rows=50,
        batch_size=32,
    )
    blocks = full.row_blocks()
    # A store whose first three blocks were written (by a capture that then died).
    part = to.capture(mlp.model, mlp.checkpoints, digits.train, out, projection_dim=16, chunk_rows=50, batch_size=32)
    group = part._writable()
    group["block_complete"][3:] = 0
    attrs = dict(group.attrs["trackin_ooc"], complete=False)
    group.attrs["trackin_ooc"] = attrs

    seen = []
    real = job_module.BlockBatches.__iter__
    monkeypatch.setattr(job_module.BlockBatches, "__iter__", lambda self: (seen.append(b) or b for b in real(self)))
    resumed = to.capture(mlp.model, mlp.checkpoints, digits.train, out, projection_dim=16, chunk_rows=50, batch_size=32)
    rows = sorted({i for batch in seen for i in batch})
    assert rows == list(range(blocks[3][0], len(digits.train)))
    tt.assert_stores_identical(resumed, full)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"seed": 1}, "projection (fingerprint)"),
        ({"learning_rates": [0.05, 0.05, 0.05, 0.05]}, "learning rates"),
        ({"dtype": "float16"}, "storage dtype"),
        ({"projection_dim": 24}, "feature width"),
    ],
)
def test_a_different_capture_is_refused_with_the_difference(change, words, mlp, digits, tmp_path):
    out = tmp_path / "s.zarr"
    base = dict(projection_dim=16, chunk_rows=100, batch_size=50, learning_rates=[0.1] * len(mlp.checkpoints))
    store = to.capture(mlp.model, mlp.checkpoints, digits.train, out, **base)
    group = store._writable()
    group["block_complete"][2:] = 0
    group.attrs["trackin_ooc"] = dict(group.attrs["trackin_ooc"], complete=False)
    before = to.open_store(out).read_grads()
    args = dict(base, **change)
    if "learning_rates" in change:
        args["learning_rates"] = change["learning_rates"][: len(mlp.checkpoints)]
    with pytest.raises(to.CaptureError, match="cannot resume") as err:
        to.capture(mlp.model, mlp.checkpoints, digits.train, out, **args)
    message = str(err.value)
    assert words in message and "overwrite" in message and "\n" not in message
    after = to.open_store(out)
    assert not after.complete and int(after.blocks_done().sum()) == 2
    np.testing.assert_array_equal(after.read_grads(), before)  # nothing touched


def test_a_complete_store_is_not_resumed_but_refused(mlp, digits, tmp_path):
    out = tmp_path / "s.zarr"
    to.capture(mlp.model, mlp.checkpoints, digits.train, out, projection_dim=16)
    with pytest.raises(to.StoreExistsError, match="complete; pass overwrite=True"):
        to.capture(mlp.model, mlp.checkpoints, digits.train, out, projection_dim=16)
