"""A real single-node Slurm on localhost: dask-jobqueue's SLURMCluster, built by trackin_ooc.cluster.jobqueue,
submits worker jobs with sbatch; top-k on those workers equals a local run.

The fixture starts munged, slurmctld and slurmd from Debian's slurm-wlm and munge packages with a
generated slurm.conf and munge key in a temporary folder (nothing in /etc is used or changed), all
on 127.0.0.1, and stops them afterwards. It skips, saying why, where Slurm is not installed
(scripts/install_slurm.sh installs it) or the daemons cannot run here.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

import trackin_ooc as to
from tests import stop_process_group
from trackin_ooc import testing as tt
from trackin_ooc.cluster import cluster_client, jobqueue

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
PARTITION = "trackin"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 60
LRS = [0.8, 0.3, 0.1]


def _which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


SLURM_CONF = """\
ClusterName=trackintest
SlurmctldHost={host}({addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=10
NodeName={host} NodeAddr={addr} CPUs=2 RealMemory=4096 State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=60 State=UP
"""


class SingleNodeSlurm:
    """munged + slurmctld + slurmd in the foreground, as children of this process."""

    def __init__(self, root: Path):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.root / f"{name}.out", "wb") as out:
            self.procs[name] = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )

    def cmd(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(
            [_which(args[0]) or args[0], *args[1:]], capture_output=True, text=True, env=self.env, timeout=30
        )
        if check:
            assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout

    def logs(self) -> str:
        files = ["munged.log", "slurmctld.log", "slurmd.log", *(f"{n}.out" for n in DAEMONS)]
        return "\n".join(f"--- {f}\n{_tail(self.root / f)}" for f in files if (self.root / f).exists())

    def start(self) -> str | None:
        """Start the daemons; None when the node is idle, else why Slurm cannot run here."""
        r = self.root
        for d in ("munge", "state", "spool"):
            (r / d).mkdir(mode=0o700)
        (r / "munge").chmod(0o711)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(
            SLURM_CONF.format(
                host=self.host,
                addr=LOOPBACK,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                root=r,
                partition=PARTITION,
            )
        )
        sock = r / "munge" / "munge.socket"
        self._spawn(
            "munged",
            [
                _which("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={sock}",
                f"--pid-file={r}/munge/munged.pid",
                f"--log-file={r}/munged.log",
                f"--seed-file={r}/munge/munged.seed",
            ],
        )
        why = self._wait(lambda: sock.exists(), "munged")
        if why:
            return f"munged {why}"
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.host, "-f", str(self.conf)])

        def idle() -> bool:
            out = self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
            return out.rstrip("*") == "idle"

        why = self._wait(idle, "slurmctld", "slurmd")
        if why == "timed out":
            state = self.cmd("sinfo", "-h", "-N", "-o", "%T %E", check=False).strip() or "no answer"
            return f"the node did not become idle within {READY_TIMEOUT} s (sinfo: {state})"
        return why

    def _wait(self, ready, *names: str) -> str | None:
        """None once ``ready()``; else which daemon exited (and how), or 'timed out'."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            dead = [
                f"{n} exited with status {self.procs[n].returncode}" for n in names if self.procs[n].poll() is not None
            ]
            if dead:
                return "; ".join(dead)
            if ready():
                return None
            time.sleep(0.2)
        return "timed out"

    def jobs(self) -> list[list[str]]:
        """[name, state, comment] of every job in the queue."""
        out = self.cmd("squeue", "-h", "-o", "%j|%T|%k")
        return [line.split("|") for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.cmd("scancel", f"--partition={PARTITION}", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.cmd("squeue", "-h", check=False).strip():
                time.sleep(0.2)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            stop_process_group(proc)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [n for n in DAEMONS + CLIENTS if _which(n) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed here ({', '.join(missing)} not found on PATH or in /usr/sbin); "
            "scripts/install_slurm.sh installs Debian's slurm-wlm and munge (as root)"
        )
    if os.geteuid() != 0:
        pytest.skip("this test runs slurmd, which must be root to launch jobs; it is not root here")
    node = SingleNodeSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        why = node.start()
        if why is not None:
            pytest.skip(f"Slurm is installed but cannot run here: {why}\n{node.logs()}")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(node.conf))  # for sbatch/squeue/scancel run by dask-jobqueue
            yield node
    finally:
        node.stop()


def _loopback_options() -> dict:
    """Keep the scheduler, the workers and their HTTP servers on 127.0.0.1 (a real cluster would use
    the interface the compute nodes reach, e.g. interface: ib0)."""
    return {
        "scheduler-options": {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"},
        "worker-extra-args": ["--host", LOOPBACK, "--dashboard-address", f"{LOOPBACK}:0"],
    }


def test_slurm_jobs_run_top_k_like_a_local_run(slurm, tmp_path):
    rng = np.random.default_rng(3)
    te = to.from_arrays(tmp_path / "test.zarr", rng.standard_normal((3, 10, 24)).astype(np.float32), LRS, chunk_rows=5)
    tr = to.from_arrays(
        tmp_path / "train.zarr", rng.standard_normal((3, 300, 24)).astype(np.float32), LRS, chunk_rows=25
    )
    local = to.top_k(te, tr, k=4)  # no client yet: in-process threads
    config = tmp_path / "jobqueue.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "jobqueue": {
                    "slurm": {
                        "name": "trackin-test",
                        "cores": 1,
                        "memory": "1GiB",
                        "processes": 1,
                        "walltime": "00:10:00",
                        "queue": PARTITION,
                        "log-directory": str(tmp_path / "logs"),
                        "death-timeout": 30,
                        "job-extra-directives": ["--comment=trackin-ooc-test"],
                        **_loopback_options(),
                    }
                }
            }
        )
    )
    script = jobqueue.job_script("slurm", config=config)
    assert f"#SBATCH -p {PARTITION}" in script and "#SBATCH --comment=trackin-ooc-test" in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script

    with cluster_client(batch="slurm", batch_config=config, jobs=2, wait=2, timeout=120) as client:
        jobs = slurm.jobs()
        assert [j[0] for j in jobs] == ["trackin-test"] * 2, jobs
        assert all(j[1] == "RUNNING" and j[2] == "trackin-ooc-test" for j in jobs), jobs
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == 2 and all(w["host"] == LOOPBACK and w["nthreads"] == 1 for w in workers)
        before = sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())
        result = to.top_k(te, tr, k=4, memory_limit=16_000)  # small blocks: several tasks per worker
        after = sum(client.run(lambda dask_worker: dask_worker.state.executed_count).values())
        assert after - before >= 4, "the Slurm workers ran (almost) nothing"
    # Closing the cluster cancels its jobs.
    deadline = time.monotonic() + 30
    while slurm.jobs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slurm.jobs() == []
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert len([n for n in logs if n.endswith(".err")]) == 2, logs  # each job wrote its log there

    expected = tt.reference_influence(te.read_grads(), tr.read_grads(), LRS)
    tt.assert_top_k_equal(result, expected, 4)
    for name in ("proponent_index", "opponent_index"):
        np.testing.assert_array_equal(result[name].values, local[name].values)
    for name in ("proponent_score", "opponent_score"):
        np.testing.assert_allclose(result[name].values, local[name].values, rtol=1e-6, atol=1e-6)


def test_a_refused_submission_says_why(slurm):
    opts = {k.replace("-", "_"): v for k, v in _loopback_options().items()}
    with pytest.raises(jobqueue.JobqueueError, match=r"sbatch refused .*invalid partition"):
        jobqueue.make_cluster("slurm", jobs=1, cores=1, memory="1GiB", queue="no-such-partition", **opts)
    assert slurm.jobs() == []


def test_the_documented_sbatch_script_runs(slurm, tmp_path):
    """docs/jobs/slurm_scheduler_file.sbatch as submitted by a user: a scheduler, srun'd workers and
    trackin-ooc --scheduler-file inside one allocation; only its example commands are replaced."""
    text = (ROOT / "docs" / "jobs" / "slurm_scheduler_file.sbatch").read_text()
    marker = "# 3. The work."
    assert marker in text
    rng = np.random.default_rng(4)
    te = to.from_arrays(tmp_path / "test.zarr", rng.standard_normal((3, 6, 16)).astype(np.float32), LRS)
    tr = to.from_arrays(tmp_path / "train.zarr", rng.standard_normal((3, 200, 16)).astype(np.float32), LRS)
    out = tmp_path / "top.csv"
    script = tmp_path / "job.sbatch"
    script.write_text(
        text[: text.index(marker)]
        + (
            'T="trackin-ooc --scheduler-file $SCHED_FILE"\n'
            f"$T top-k --train {tmp_path / 'train.zarr'} --test {tmp_path / 'test.zarr'} -k 3 --raw --out {out}\n"
        )
    )
    env = dict(
        slurm.env,
        TRACKIN_OOC_QUIET="1",
        ENV_ACTIVATE=f'export PATH="{Path(sys.executable).parent}:$PATH"',
        DASK_SCHEDULER_ARGS=f"--host {LOOPBACK} --port 0 --dashboard-address {LOOPBACK}:0",
        DASK_WORKER_ARGS=f"--host {LOOPBACK} --dashboard-address {LOOPBACK}:0",
    )
    log = tmp_path / "job.out"
    # Command-line options override the script's #SBATCH lines: one small node here.
    proc = subprocess.run(
        [
            _which("sbatch"),
            "--wait",
            f"--partition={PARTITION}",
            "--nodes=1",
            "--cpus-per-task=1",
            "--mem=1G",
            "--time=00:10:00",
            f"--output={log}",
            f"--chdir={tmp_path}",
            str(script),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,  # cwd: $SLURM_SUBMIT_DIR
    )
    job_log = log.read_text() if log.exists() else "(no job output)"
    assert proc.returncode == 0, f"sbatch --wait: {proc.returncode} {proc.stderr.strip()}\n{job_log}"
    assert re.search(r"dask: 1 workers? \(scheduler from", job_log), job_log  # the CLI used the srun'd worker
    assert not list(tmp_path.glob("dask-scheduler-*.json"))  # the trap cleaned up

    import pandas as pd

    got = pd.read_csv(out)
    ref = tt.reference_top_k(tt.reference_influence(te.read_grads(), tr.read_grads(), LRS), 3)
    assert got["proponent"].tolist() == ref.proponent_index.values.ravel().tolist()
    assert got["opponent"].tolist() == ref.opponent_index.values.ravel().tolist()
    np.testing.assert_allclose(got["proponent_score"], ref.proponent_score.values.ravel(), rtol=1e-4, atol=1e-5)


def test_cli_cluster_slurm_runs_top_k(slurm, tmp_path):
    """``trackin-ooc --cluster slurm --cluster-config FILE --jobs 1 top-k ...`` on the real Slurm."""
    import pandas as pd

    rng = np.random.default_rng(5)
    te = to.from_arrays(tmp_path / "test.zarr", rng.standard_normal((3, 6, 16)).astype(np.float32), LRS)
    tr = to.from_arrays(
        tmp_path / "train.zarr", rng.standard_normal((3, 120, 16)).astype(np.float32), LRS, chunk_rows=20
    )
    config = tmp_path / "jobqueue.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "jobqueue": {
                    "slurm": {
                        "name": "trackin-cli",
                        "cores": 1,
                        "memory": "1GiB",
                        "processes": 1,
                        "walltime": "00:10:00",
                        "queue": PARTITION,
                        "death-timeout": 30,
                        "log-directory": str(tmp_path / "logs"),
                        **_loopback_options(),
                    }
                }
            }
        )
    )
    exe = Path(sys.executable).with_name("trackin-ooc")
    out = tmp_path / "top.csv"
    run = subprocess.run(
        [
            str(exe),
            "--quiet",
            "--cluster",
            "slurm",
            "--cluster-config",
            str(config),
            "--jobs",
            "1",
            "--memory-limit",
            "16000",
            "top-k",
            "--train",
            str(tr.path),
            "--test",
            str(te.path),
            "-k",
            "3",
            "--raw",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "TRACKIN_OOC_QUIET": "1"},
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    table = pd.read_csv(out)
    expected = tt.reference_top_k(tt.reference_influence(te.read_grads(), tr.read_grads(), LRS), 3)
    table = table.sort_values(["test", "rank"])
    assert len(table) == 6 * 3, table.head()
    np.testing.assert_array_equal(table["proponent"].to_numpy().reshape(6, 3), expected["proponent_index"].values)
    np.testing.assert_array_equal(table["opponent"].to_numpy().reshape(6, 3), expected["opponent_index"].values)
