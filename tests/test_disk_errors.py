"""A read-only location and a full disk, for real: tmpfs mounts in a private mount namespace.

``unshare --user --map-root-user --mount`` gives the test its own mounts without privileges on the
host; inside it a small tmpfs stands for a full disk or quota and a read-only tmpfs for a read-only
location. The real ``trackin-ooc`` executable runs against them. Every refusal must be one line
with exit status 1 and must lose nothing; after space is freed (the tmpfs grown), rerunning the
same command resumes and ends with the same store or matrix as a run that never hit the wall.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import trackin_ooc as to
from trackin_ooc import testing as tt

from .test_cli import cli_env

pytestmark = pytest.mark.timeout(600)

TRACKIN = Path(sys.executable).parent / "trackin-ooc"
UNSHARE = ["unshare", "--user", "--map-root-user", "--mount"]


def _namespaces_work() -> str | None:
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    probe = subprocess.run(
        [*UNSHARE, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def disk_run(tmp_path_factory) -> Path:
    """Run the whole scenario once in a mount namespace; each test checks one part of its record."""
    why = _namespaces_work()
    if why:
        pytest.skip(why)
    from trackin_ooc.demo import train_with_checkpoints
    from trackin_ooc.demo.examples import digits_mlp_model, digits_train_small

    root = tmp_path_factory.mktemp("disk")
    ckpts = train_with_checkpoints(
        digits_mlp_model(), digits_train_small(), root / "ckpt", epochs=2, checkpoint_every=1, seed=0
    )
    rng = np.random.default_rng(0)
    to.from_arrays(root / "test.zarr", rng.standard_normal((2, 400, 32), dtype=np.float32), [0.1, 0.1], chunk_rows=100)
    to.from_arrays(
        root / "train.zarr", rng.standard_normal((2, 4000, 32), dtype=np.float32), [0.1, 0.1], chunk_rows=500
    )
    capture = [
        "capture",
        "--model",
        "trackin_ooc.demo.examples:digits_mlp_model",
        "--data",
        "trackin_ooc.demo.examples:digits_train_small",
        "--projection-dim",
        "1024",
        "--chunk-rows",
        "50",
        *[a for c in ckpts for a in ("--checkpoint", str(c))],
    ]
    script = f"""
set -u
T={TRACKIN}
R={root}
mkdir -p $R/small $R/ro $R/log
mount -t tmpfs -o size=1m tmpfs $R/small
mount -t tmpfs -o size=1m,ro tmpfs $R/ro
step() {{ name=$1; shift; "$@" >$R/log/$name.out 2>$R/log/$name.err; echo $? >$R/log/$name.rc; }}
step reference $T {" ".join(capture)} --out $R/reference.zarr
step ro_capture $T {" ".join(capture)} --out $R/ro/s.zarr
step ro_self_influence $T self-influence $R/train.zarr --out $R/ro/si.csv
step ro_influence $T influence --test $R/test.zarr --train $R/train.zarr --out $R/ro/inf.zarr
ls -A $R/ro >$R/log/ro_listing
step full_capture $T {" ".join(capture)} --out $R/small/s.zarr
$T info --json $R/small/s.zarr >$R/log/full_capture_info.json
mount -o remount,size=64m $R/small
step resumed_capture $T {" ".join(capture)} --out $R/small/s.zarr
cp -r $R/small/s.zarr $R/resumed.zarr
rm -rf $R/small/s.zarr $R/small/.s.zarr.lock
mount -o remount,size=2m $R/small
step full_influence $T influence --test $R/test.zarr --train $R/train.zarr --out $R/small/inf.zarr
$T info --json $R/small/inf.zarr >$R/log/full_influence_info.json
mount -o remount,size=64m $R/small
step resumed_influence $T influence --test $R/test.zarr --train $R/train.zarr --out $R/small/inf.zarr
cp -r $R/small/inf.zarr $R/resumed_inf.zarr
"""
    proc = subprocess.run([*UNSHARE, "bash", "-c", script], env=cli_env(), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr
    return root


def result(root: Path, step: str) -> tuple[int, str, str]:
    log = root / "log"
    return (int((log / f"{step}.rc").read_text()), (log / f"{step}.out").read_text(), (log / f"{step}.err").read_text())


def one_error_line(err: str) -> str:
    # The size a capture announces before it starts is a status line, not part of the error.
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("capture: about ")]
    assert len(lines) == 1 and lines[0].startswith("trackin-ooc") and ": error: " in lines[0], err
    return lines[0]


@pytest.mark.parametrize("step", ["ro_capture", "ro_self_influence", "ro_influence"])
def test_read_only_location_is_refused_before_any_work(disk_run, step):
    status, out, err = result(disk_run, step)
    assert status == 1 and out == ""
    line = one_error_line(err)
    assert "read-only file system" in line and "choose a writable location" in line
    assert (disk_run / "log" / "ro_listing").read_text() == ""  # nothing was written there


def test_full_disk_capture_keeps_its_blocks_and_resumes_to_the_same_store(disk_run):
    assert result(disk_run, "reference")[0] == 0
    status, _, err = result(disk_run, "full_capture")
    assert status == 1
    line = one_error_line(err)
    assert "no space left on the device" in line and "rerun the same command to resume" in line
    info = json.loads((disk_run / "log" / "full_capture_info.json").read_text())
    assert info["complete"] is False and 0 < info["row_blocks_written"] < info["row_blocks"] == 6
    status, out, err = result(disk_run, "resumed_capture")
    assert status == 0, err
    tt.assert_stores_identical(disk_run / "resumed.zarr", disk_run / "reference.zarr")


def test_full_disk_influence_resumes_to_the_exact_matrix(disk_run):
    status, _, err = result(disk_run, "full_influence")
    assert status == 1
    line = one_error_line(err)
    assert "no space left on the device" in line and "rerun the same command to resume" in line
    info = json.loads((disk_run / "log" / "full_influence_info.json").read_text())
    assert info["complete"] is False
    status, out, err = result(disk_run, "resumed_influence")
    assert status == 0, err
    got = xr.open_zarr(disk_run / "resumed_inf.zarr")["influence"].values
    te, tr = to.open_store(disk_run / "test.zarr"), to.open_store(disk_run / "train.zarr")
    want = tt.reference_influence(te.read_grads(), tr.read_grads(), tr.learning_rates)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
