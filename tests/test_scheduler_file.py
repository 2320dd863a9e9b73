"""The CLI on an existing cluster: ``dask scheduler --scheduler-file`` and two ``dask worker`` processes.

Real processes on loopback only (every listener, dashboards included, binds to 127.0.0.1), driven
through the installed ``trackin-ooc`` executable with the global option ``--scheduler-file FILE``,
the way a batch job script uses them (docs/hpc.md). Results must equal those of a local run, also
when one worker (its nanny and its worker process) is SIGKILLed in the middle of a top-k run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import trackin_ooc as to
from trackin_ooc import testing as tt
from trackin_ooc.engine.planning import worker_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRACKIN = BIN / "trackin-ooc"
DASK = BIN / "dask"
LOOPBACK = "127.0.0.1"
MODEL = "trackin_ooc.demo.examples:digits_mlp_model"
TRAIN_DATA = "trackin_ooc.demo.examples:digits_train_small"
TEST_DATA = "trackin_ooc.demo.examples:digits_test_small"
START_TIMEOUT = 90  # seconds for the scheduler file to appear and the workers to join


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TRACKIN_OOC_QUIET="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class SchedulerFileCluster:
    """``dask scheduler --scheduler-file`` plus N ``dask worker --scheduler-file`` processes.

    Each process is started in its own session, so that a worker can be killed whole (nanny and
    worker process) with one signal to its process group, as a node failure would.
    """

    def __init__(self, root: Path, n_workers: int = 2):
        self.root = root
        self.file = root / "scheduler.json"
        self.n_workers = n_workers
        self.procs: dict[str, subprocess.Popen] = {}
        self.args: dict[str, list[str]] = {}
        self.logs: dict[str, Path] = {}
        self.client = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=_env(),
                cwd=self.root,
                start_new_session=True,
            )
        self.procs[name] = proc
        self.args[name] = args
        return proc

    def start(self) -> SchedulerFileCluster:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> SchedulerFileCluster:
        from distributed import Client

        assert DASK.is_file(), f"{DASK} is missing: distributed installs the dask command next to python"
        sched = self._spawn(
            "scheduler",
            [
                str(DASK),
                "scheduler",
                "--scheduler-file",
                str(self.file),
                "--host",
                LOOPBACK,
                "--port",
                "0",
                "--dashboard-address",
                f"{LOOPBACK}:0",
            ],
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not self._file_ready():
            if sched.poll() is not None:
                pytest.fail(f"dask scheduler exited with {sched.returncode}:\n{_tail(self.logs['scheduler'])}")
            if time.monotonic() > deadline:
                pytest.fail(f"no scheduler file after {START_TIMEOUT} s:\n{_tail(self.logs['scheduler'])}")
            time.sleep(0.1)
        for i in range(self.n_workers):
            self._spawn(
                f"w{i}",
                [
                    str(DASK),
                    "worker",
                    "--scheduler-file",
                    str(self.file),
                    "--host",
                    LOOPBACK,
                    "--dashboard-address",
                    f"{LOOPBACK}:0",
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    "1GiB",
                    "--name",
                    f"w{i}",
                    "--death-timeout",
                    "60",
                ],
            )
        self.client = Client(scheduler_file=str(self.file), timeout="30s")
        try:
            self.client.wait_for_workers(self.n_workers, timeout=START_TIMEOUT)
        except TimeoutError:
            logs = "\n".join(f"--- {n}\n{_tail(p)}" for n, p in self.logs.items())
            pytest.fail(f"{self.n_workers} workers did not join within {START_TIMEOUT} s:\n{logs}")
        return self

    def _file_ready(self) -> bool:
        try:
            return json.loads(self.file.read_text())["address"].startswith(f"tcp://{LOOPBACK}:")
        except (OSError, ValueError, KeyError):
            return False

    def worker_names(self) -> set[str]:
        return {w["name"] for w in self.client.scheduler_info()["workers"].values()}

    def executed(self) -> int:
        """Tasks run so far by all workers."""
        return sum(self.client.run(lambda dask_worker: dask_worker.state.executed_count).values())

    def kill(self, name: str) -> subprocess.Popen:
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        return proc

    def restart_dead_workers(self) -> None:
        """Start again every worker that was killed, and wait until all have joined."""
        for name, proc in list(self.procs.items()):
            if name != "scheduler" and proc.poll() is not None:
                self._spawn(name, self.args[name])
        try:
            self.client.wait_for_workers(self.n_workers, timeout=START_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"{self.n_workers} workers did not join again within {START_TIMEOUT} s")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        for name in sorted(self.procs, key=lambda n: n == "scheduler"):  # workers first
            proc = self.procs[name]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def _listeners_of(pids: set[int]) -> list[str]:
    import psutil

    found = []
    for pid in pids:
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                conns = p.net_connections(kind="inet") if hasattr(p, "net_connections") else p.connections("inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            found += [c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def cli(*args: str, scheduler_file: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    glob = ["--scheduler-file", str(scheduler_file)] if scheduler_file is not None else []
    proc = subprocess.run([str(TRACKIN), *glob, *args], capture_output=True, text=True, env=_env(), timeout=240)
    if check:
        assert proc.returncode == 0, f"trackin-ooc {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    return proc


def cli_in_process(*args: str) -> None:
    """The same CLI, run locally inside this process (the local reference run, without a second
    interpreter start-up): no scheduler option, so it scores with in-process threads."""
    from click.testing import CliRunner
    from trackin_ooc_cli.main import cli as app

    result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    assert result.exit_code == 0, f"trackin-ooc {' '.join(args)} exited {result.exit_code}: {result.output}" + (
        f"\n{result.exception!r}" if result.exception else ""
    )


def capture_args(data: str, checkpoints: list[Path], out: Path) -> list[str]:
    args = [
        "capture",
        "--model",
        MODEL,
        "--data",
        data,
        "--projection-dim",
        "32",
        "--batch-size",
        "64",
        "--chunk-rows",
        "64",
        "--out",
        str(out),
    ]
    for c in checkpoints:
        args += ["--checkpoint", str(c)]
    return args


def assert_same_top_k(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want) > 0
    for col in got.columns:
        if col.endswith("_score"):
            np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-5, atol=1e-6)
        else:
            assert got[col].tolist() == want[col].tolist(), f"column {col} differs"


@pytest.fixture(scope="module")
def running_cluster(tmp_path_factory):
    c = SchedulerFileCluster(tmp_path_factory.mktemp("sched_file")).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster(running_cluster):
    """The module's scheduler and its two workers, all running (a worker a test killed is started again)."""
    running_cluster.restart_dead_workers()
    yield running_cluster
    running_cluster.restart_dead_workers()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Three SGD checkpoints of the CLI example model (digits_mlp_model) on the small digits split."""
    from trackin_ooc.demo import train_with_checkpoints
    from trackin_ooc.demo.examples import digits_mlp_model, digits_train_small

    paths = train_with_checkpoints(
        digits_mlp_model(), digits_train_small(), tmp_path_factory.mktemp("ckpt"), epochs=3, checkpoint_every=1, seed=0
    )
    assert len(paths) == 3
    return paths


def test_cluster_listens_on_loopback_only(cluster):
    ips = _listeners_of({p.pid for p in cluster.procs.values()})
    assert ips, "found no listening sockets of the scheduler and workers"
    assert set(ips) == {LOOPBACK}, f"listeners outside loopback: {sorted(set(ips))}"
    assert cluster.worker_names() == {"w0", "w1"}


def test_capture_and_top_k_on_a_scheduler_file_equal_a_local_run(cluster, checkpoints, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    for split, data in (("train", TRAIN_DATA), ("test", TEST_DATA)):
        before = cluster.executed()
        cli(*capture_args(data, checkpoints, remote / f"{split}.zarr"), scheduler_file=cluster.file)
        assert cluster.executed() > before, "the workers ran no task: capture did not scale out"
        cli_in_process(*capture_args(data, checkpoints, local / f"{split}.zarr"))
    for split in ("train", "test"):
        b = to.open_store(remote / f"{split}.zarr")
        assert b.n_examples == {"train": 300, "test": 100}[split] and b.feature_dim == 32
        tt.assert_stores_identical(b, local / f"{split}.zarr")  # the workers wrote the same bytes

    before = cluster.executed()
    run = cli(
        "top-k",
        "--train",
        str(remote / "train.zarr"),
        "--test",
        str(remote / "test.zarr"),
        "-k",
        "5",
        "--out",
        str(remote / "top.csv"),
        scheduler_file=cluster.file,
    )
    assert cluster.executed() > before, "the workers ran no task: top-k did not use the scheduler file"
    assert "2 workers" in run.stderr
    cli_in_process(
        "top-k",
        "--train",
        str(local / "train.zarr"),
        "--test",
        str(local / "test.zarr"),
        "-k",
        "5",
        "--out",
        str(local / "top.csv"),
    )

    want, got = pd.read_csv(local / "top.csv"), pd.read_csv(remote / "top.csv")
    assert len(want) == 100 * 5 and want["proponent"].between(0, 299).all()
    assert_same_top_k(got, want)


def _progress_probe(victim: str, prefix: str):
    """A function for run_on_scheduler (made here, so that it is shipped by value): (top-k parts
    finished, parts not yet finished, tasks the victim is running or has been assigned)."""

    def probe(dask_scheduler):
        done = todo = 0
        for ts in dask_scheduler.tasks.values():
            if ts.prefix.name == prefix:
                if ts.state == "memory":
                    done += 1
                else:
                    todo += 1
        busy = sum(len(ws.processing) for ws in dask_scheduler.workers.values() if ws.name == victim)
        return done, todo, busy

    return probe


def test_top_k_survives_killing_one_worker_mid_run(cluster, tmp_path):
    rng = np.random.default_rng(5)
    n_test, n_train, c, f, k = 8, 1600, 2, 16, 6
    lrs = [0.6, 0.25]
    te = to.from_arrays(
        tmp_path / "test.zarr", rng.standard_normal((c, n_test, f)).astype(np.float32), lrs, chunk_rows=4
    )
    tr = to.from_arrays(
        tmp_path / "train.zarr", rng.standard_normal((c, n_train, f)).astype(np.float32), lrs, chunk_rows=16
    )
    limit = worker_bytes(4, 16, c * f, 4, 1, k)  # blocks of 4 test × 16 train rows on 1-thread workers
    plan = to.plan_for(te, tr, memory_limit=limit, k=k)
    n_parts = len(plan.test_blocks(n_test)) * len(plan.train_blocks(n_train))
    assert n_parts >= 150, plan  # many short tasks: the kill lands in the middle of the run
    args = [
        "top-k",
        "--train",
        str(tmp_path / "train.zarr"),
        "--test",
        str(tmp_path / "test.zarr"),
        "-k",
        str(k),
        "--raw",
        "--out",
    ]  # --raw: the dot products the NumPy reference below computes
    cli_in_process("--memory-limit", str(limit), *args, str(tmp_path / "local.csv"))

    # On the module's cluster: the killed worker is started again after the test.
    victim = "w1"
    glob = ["--scheduler-file", str(cluster.file), "--memory-limit", str(limit)]
    run = subprocess.Popen(
        [str(TRACKIN), *glob, *args, str(tmp_path / "remote.csv")],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    probe = _progress_probe(victim, "trackin-topk-part")
    at_kill = None
    deadline = time.monotonic() + 180
    while run.poll() is None and time.monotonic() < deadline:
        done, todo, busy = cluster.client.run_on_scheduler(probe)
        if done >= 10 and todo > 0 and busy > 0:
            at_kill = (done, todo)
            killed = cluster.kill(victim)
            break
        time.sleep(0.02)
    out, err = run.communicate(timeout=180)
    assert at_kill is not None, (
        f"the run ended (exit {run.returncode}) before worker {victim} could be killed mid-run; "
        f"make the stores bigger\n{err}"
    )
    assert killed.returncode == -signal.SIGKILL
    assert run.returncode == 0, f"top-k failed after the worker was killed:\n{err}"
    done, todo = at_kill
    assert 10 <= done < n_parts and todo > 0  # killed with work left to do
    assert cluster.worker_names() == {"w0"}  # the killed worker stayed dead; w0 finished the run

    want, got = pd.read_csv(tmp_path / "local.csv"), pd.read_csv(tmp_path / "remote.csv")
    assert len(want) == n_test * k
    assert_same_top_k(got, want)
    # And both are the exact answer.
    ref = tt.reference_top_k(tt.reference_influence(te.read_grads(), tr.read_grads(), lrs), k)
    assert got["proponent"].tolist() == ref.proponent_index.values.ravel().tolist()
    assert got["opponent"].tolist() == ref.opponent_index.values.ravel().tolist()


def test_the_documented_pbs_script_starts_its_cluster(tmp_path):
    """docs/jobs/pbs_scheduler_file.pbs run by bash as PBS would run it on the first node of a
    one-node job. No PBS here: ``pbsdsh`` (start a command on every node) is stood in for by a
    script that runs it on this node; everything else (the scheduler, the generated worker script,
    the scheduler file, the cleanup trap) is the documented script's own."""
    text = (ROOT / "docs" / "jobs" / "pbs_scheduler_file.pbs").read_text()
    marker = "# 3. The work"
    assert marker in text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "pbsdsh"
    shim.write_text('#!/bin/bash\n[ "$1" = "--" ] && shift\nexec env -i HOME="$HOME" PATH=/usr/bin:/bin "$@"\n')
    shim.chmod(0o755)
    script = tmp_path / "job.pbs"
    script.write_text(
        text[: text.index(marker)]
        + (
            'python -c "import distributed, sys; c = distributed.Client(scheduler_file=sys.argv[1]); '
            "w = list(c.scheduler_info()['workers'].values()); "
            "print('workers', len(w), w[0]['nthreads'], w[0]['memory_limit']); "
            'print(\'sum\', c.submit(sum, [1, 2, 3]).result())" "$SCHED_FILE"\n'
        )
    )
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("node1\n")  # one chunk, mpiprocs=1: one line
    env = dict(
        _env(),
        PBS_O_WORKDIR=str(tmp_path),
        PBS_JOBID="4242.pbs-server",
        PBS_NODEFILE=str(nodefile),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        ENV_ACTIVATE=f'export PATH="{BIN}:$PATH"',
        DASK_SCHEDULER_ARGS=f"--host {LOOPBACK} --port 0 --dashboard-address {LOOPBACK}:0",
        DASK_WORKER_ARGS=f"--host {LOOPBACK} --dashboard-address {LOOPBACK}:0",
    )
    proc = subprocess.Popen(
        ["bash", str(script)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    from distributed.system import MEMORY_LIMIT  # dask caps a worker's limit at the machine's memory

    limit = min(108 << 30, MEMORY_LIMIT)  # the script's MEMORY_LIMIT=108GiB
    assert f"workers 1 32 {limit}" in out and "sum 6" in out, out  # and its NTHREADS=32
    assert not list(tmp_path.glob("dask-scheduler-*.json")) and not list(tmp_path.glob("dask-worker-*.sh"))
