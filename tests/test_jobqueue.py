"""trackin_ooc.cluster.jobqueue: the job scripts dask-jobqueue would submit for Slurm, PBS and LSF, from
keyword options, a YAML config in dask's format and dask's own configuration; its errors; and one
generated script run for real by bash against a live scheduler on 127.0.0.1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import yaml

from tests import stop_process_group
from trackin_ooc.cluster import ClusterError, jobqueue

pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed: pip install dask-jobqueue")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = ROOT / "docs" / "jobs" / "jobqueue.yaml"


def worker_command(script: str) -> str:
    lines = [ln for ln in script.splitlines() if "distributed.cli.dask_worker" in ln]
    assert len(lines) == 1, script
    return lines[0]


def directives(script: str, prefix: str) -> list[str]:
    return [ln[len(prefix) :].strip() for ln in script.splitlines() if ln.startswith(prefix)]


def arg(command: str, flag: str) -> str:
    m = re.search(rf"{re.escape(flag)} (\S+)", command)
    assert m, f"{flag} not in {command}"
    return m.group(1)


def test_slurm_script_has_the_directives_and_worker_command():
    script = jobqueue.job_script(
        "slurm",
        cores=8,
        memory="32GiB",
        processes=2,
        walltime="02:30:00",
        queue="gpu",
        account="proj42",
        job_name="tracin",
    )
    assert script.startswith("#!/usr/bin/env bash\n")
    d = directives(script, "#SBATCH")
    assert d == ["-J tracin", "-p gpu", "-A proj42", "-n 1", "--cpus-per-task=8", "--mem=32G", "-t 02:30:00"]
    cmd = worker_command(script)
    assert cmd.startswith(f"{sys.executable} -m distributed.cli.dask_worker {jobqueue.PLACEHOLDER_ADDRESS} ")
    assert arg(cmd, "--nthreads") == "4" and arg(cmd, "--nworkers") == "2"  # 8 cores over 2 processes
    assert arg(cmd, "--memory-limit") == "16.00GiB"  # 32 GiB over 2 processes
    assert "--nanny" in cmd and arg(cmd, "--death-timeout") == "60"


def test_the_worker_command_uses_this_python():
    cmd = worker_command(jobqueue.job_script("slurm", cores=1, memory="1GiB"))
    python = cmd.split()[0]
    assert python == sys.executable and os.access(python, os.X_OK)
    venv = ROOT / ".venv" / "bin"
    if Path(sys.executable).parent == venv:  # run by make test: the project's virtualenv
        assert Path(python).parent == venv
    other = worker_command(jobqueue.job_script("slurm", cores=1, memory="1GiB", python="/opt/env/bin/python"))
    assert other.startswith("/opt/env/bin/python -m distributed.cli.dask_worker")


def test_pbs_script(tmp_path):
    script = jobqueue.job_script(
        "pbs",
        cores=4,
        memory="12GiB",
        processes=2,
        walltime="01:00:00",
        queue="workq",
        account="acct",
        log_directory=str(tmp_path / "logs"),
    )
    d = directives(script, "#PBS")
    assert "-q workq" in d and "-A acct" in d and "-N dask-worker" in d
    assert "-l select=1:ncpus=4:mem=12GB" in d
    assert "-l walltime=01:00:00" in d and f"-e {tmp_path / 'logs'}/" in d
    cmd = worker_command(script)
    assert arg(cmd, "--memory-limit") == "6.00GiB" and arg(cmd, "--nworkers") == "2"
    custom = jobqueue.job_script("pbs", cores=4, memory="12GiB", resource_spec="nodes=1:ppn=4")
    assert directives(custom, "#PBS")[1] == "-l nodes=1:ppn=4"


def test_lsf_script():
    script = jobqueue.job_script(
        "lsf", cores=6, memory="6GB", walltime="00:45", queue="normal", project="p1", lsf_units="mb", processes=1
    )
    d = directives(script, "#BSUB")
    assert "-q normal" in d and '-P "p1"' in d and "-n 6" in d and '-R "span[hosts=1]"' in d
    assert "-M 6000" in d and "-W 00:45" in d  # 6 GB in LSF's MB units
    cmd = worker_command(script)
    assert arg(cmd, "--nthreads") == "6" and arg(cmd, "--memory-limit") == "5.59GiB"


def test_the_yaml_config_is_honoured(tmp_path):
    cfg = tmp_path / "jobqueue.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "jobqueue": {
                    "slurm": {
                        "name": "from-yaml",
                        "cores": 4,
                        "memory": "8GiB",
                        "processes": 1,
                        "walltime": "04:00:00",
                        "queue": "long",
                        "account": "yaml-acct",
                        "local-directory": "$TMPDIR",
                        "interface": "ib0",
                        "job-extra-directives": ["--gres=gpu:1", "--constraint=a100"],
                        "job-script-prologue": ["module load cuda/12", "source ~/envs/trackin/bin/activate"],
                        "worker-extra-args": ["--resources", "GPU=1"],
                        "job-directives-skip": ["--mem"],
                    }
                }
            }
        )
    )
    script = jobqueue.job_script("slurm", config=cfg)
    d = directives(script, "#SBATCH")
    assert d[:2] == ["-J from-yaml", "-p long"] and "-A yaml-acct" in d and "-t 04:00:00" in d
    assert "--cpus-per-task=4" in d and not any(x.startswith("--mem") for x in d)  # skipped
    assert d[-2:] == ["--gres=gpu:1", "--constraint=a100"]
    prologue = script.index("module load cuda/12")
    assert script.index("source ~/envs/trackin/bin/activate") > prologue
    cmd = worker_command(script)
    assert script.index(cmd) > prologue
    assert arg(cmd, "--nthreads") == "4" and arg(cmd, "--memory-limit") == "8.00GiB"
    assert arg(cmd, "--local-directory") == "$TMPDIR" and arg(cmd, "--resources") == "GPU=1"
    assert arg(cmd, "--interface") == "ib0"

    # Keyword arguments beat the file; the file beats dask's configuration; dask's fills the rest.
    with dask.config.set({"jobqueue.slurm.walltime": "00:05:00", "jobqueue.slurm.death-timeout": 17}):
        script = jobqueue.job_script("slurm", config=cfg, queue="short", cores=2)
    d = directives(script, "#SBATCH")
    assert "-p short" in d and "--cpus-per-task=2" in d and "-t 04:00:00" in d
    assert arg(worker_command(script), "--death-timeout") == "17"


def test_scheduler_options_merge_and_resolve_once(tmp_path):
    cfg = {
        "jobqueue": {
            "slurm": {"cores": 2, "memory": "2GiB", "scheduler-options": {"port": 8786, "dashboard-address": ":8787"}}
        }
    }
    opts = jobqueue.options("slurm", config=cfg, scheduler_options={"host": "10.0.0.1"})
    assert opts["scheduler_options"] == {"port": 8786, "dashboard_address": ":8787", "host": "10.0.0.1"}
    assert opts["job_name"] == "dask-worker" and opts["walltime"] == "00:30:00"  # dask-jobqueue's defaults
    assert "name" not in opts and all(v is not None for v in opts.values())


def test_old_option_names_in_config_files_still_work(recwarn):
    cfg = {
        "jobqueue": {
            "pbs": {
                "cores": 2,
                "memory": "2GiB",
                "env-extra": ["export A=1"],
                "extra": ["--lifetime", "55m"],
                "job-extra": ["-l place=scatter"],
                "project": "old-acct",
            }
        }
    }
    script = jobqueue.job_script("pbs", config=cfg)
    assert "export A=1" in script and "-l place=scatter" in directives(script, "#PBS")
    assert "-A old-acct" in directives(script, "#PBS")
    assert arg(worker_command(script), "--lifetime") == "55m"
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_the_documented_example_config_builds_every_kind():
    data = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert set(data["jobqueue"]) == set(jobqueue.KINDS)
    prefixes = {"slurm": "#SBATCH", "pbs": "#PBS", "lsf": "#BSUB"}
    for kind in jobqueue.KINDS:
        script = jobqueue.job_script(kind, config=EXAMPLE_CONFIG)
        assert directives(script, prefixes[kind]), kind
        assert "distributed.cli.dask_worker" in worker_command(script)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: jobqueue.job_script("sge", cores=1, memory="1GiB"), r"unknown batch system 'sge'; use one of slurm"),
        (
            lambda: jobqueue.job_script("slurm", cores=1, memory="1GiB", partition="x"),
            r"unknown slurm option partition; known: .*queue",
        ),
        (lambda: jobqueue.job_script("slurm"), r"cores and memory are not set"),
        (lambda: jobqueue.job_script("slurm", cores=1), r"memory is not set"),
        (
            lambda: jobqueue.job_script("pbs", config={"jobqueue": {"slurm": {"cores": 1}}}),
            r"has no jobqueue.pbs section \(it has: slurm\)",
        ),
        (lambda: jobqueue.options("lsf", config={"jobqueue": ["slurm"]}), r"must be a mapping of batch systems"),
        (lambda: jobqueue.make_cluster("slurm", jobs=2, maximum=3, cores=1, memory="1GiB"), r"not both"),
        (lambda: jobqueue.make_cluster("slurm", minimum=1, cores=1, memory="1GiB"), r"needs maximum"),
        (lambda: jobqueue.make_cluster("slurm", minimum=4, maximum=2, cores=1, memory="1GiB"), r"larger than"),
        (lambda: jobqueue.make_cluster("slurm", jobs=-1, cores=1, memory="1GiB"), r"whole number"),
    ],
)
def test_bad_requests_fail_with_a_clear_message(call, message):
    with pytest.raises(jobqueue.JobqueueError, match=message) as info:
        call()
    assert isinstance(info.value, ClusterError) and "\n" not in str(info.value)


def test_bad_config_files(tmp_path):
    with pytest.raises(jobqueue.JobqueueError, match="does not exist"):
        jobqueue.job_script("slurm", config=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobqueue:\n  slurm: [unclosed\n")
    with pytest.raises(jobqueue.JobqueueError, match="not valid YAML"):
        jobqueue.job_script("slurm", config=bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(jobqueue.JobqueueError, match="must hold a mapping"):
        jobqueue.job_script("slurm", config=bad)


def test_without_the_submit_command_nothing_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, qsub or bsub here
    for kind, cmd in (("slurm", "sbatch"), ("pbs", "qsub"), ("lsf", "bsub")):
        with pytest.raises(jobqueue.JobqueueError, match=rf"{cmd} is not on PATH.*--scheduler-file"):
            jobqueue.make_cluster(kind, cores=1, memory="1GiB")


def test_a_generated_script_run_by_bash_starts_a_worker(tmp_path):
    """The PBS script (no PBS here) executed as the batch system would: its directives are comments,
    its worker command must start a worker that joins the scheduler with the requested resources."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        script = jobqueue.job_script(
            "pbs",
            scheduler_address=cluster.scheduler_address,
            cores=2,
            memory="1GiB",
            processes=1,
            job_name="bash-run",
            worker_extra_args=["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"],
        )
        path = tmp_path / "job.pbs"
        path.write_text(script)
        with open(tmp_path / "job.log", "wb") as log:
            proc = subprocess.Popen(
                ["bash", str(path)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path
            )
        try:
            try:
                client.wait_for_workers(1, timeout=90)
            except TimeoutError:
                pytest.fail(f"the job script's worker did not join:\n{(tmp_path / 'job.log').read_text()}")
            (worker,) = client.scheduler_info()["workers"].values()
            assert worker["nthreads"] == 2 and worker["memory_limit"] == 1 << 30
            assert worker["name"] == "dummy-name" and worker["host"] == "127.0.0.1"
            assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
        finally:
            stop_process_group(proc)
