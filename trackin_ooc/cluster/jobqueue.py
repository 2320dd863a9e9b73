"""Dask clusters started through a batch system (Slurm, PBS, LSF) with dask-jobqueue.

    from trackin_ooc.cluster import cluster_client, jobqueue
    print(jobqueue.job_script("slurm", config="jobqueue.yaml"))      # what each worker job runs
    with cluster_client(batch="slurm", batch_config="jobqueue.yaml", jobs=4):
        to.top_k("test.zarr", "train.zarr", k=10)                    # scored on the batch jobs' workers

Options come from three places, later ones winning: dask's configuration (dask-jobqueue's defaults,
``~/.config/dask/*.yaml``, ``DASK_JOBQUEUE__SLURM__...`` environment variables), the ``jobqueue:``
section of an optional YAML file in dask's config format, and keyword arguments (Python names such
as ``cores=8, memory="32GiB", walltime="02:00:00", queue="gpu"``). They are resolved once, into
explicit keyword arguments, so every job the cluster submits later (on ``scale`` or ``adapt``) gets
exactly the script that :func:`job_script` shows, whatever dask's configuration is by then.

Scaling: ``jobs=N`` asks for N jobs at once; ``minimum``/``maximum`` let the cluster adapt between
that many jobs to the load. With none of them, one job is requested.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import JobqueueError

log = logging.getLogger("trackin_ooc")

KINDS = ("slurm", "pbs", "lsf")
_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "lsf": "LSFCluster"}
# The address written into a job script shown before any scheduler runs.
PLACEHOLDER_ADDRESS = "tcp://<scheduler-address>:8786"
# Seconds to wait for the submit command (sbatch, qsub, bsub) to queue the first jobs.
SUBMIT_TIMEOUT = 60.0
# Options that belong to the cluster (its scheduler), not to each job.
_CLUSTER_ONLY = {"scheduler_options", "shared_temp_directory", "silence_logs"}
# Old dask-jobqueue names (still read from config files) and the names that replaced them.
_RENAMED = {
    "extra": "worker_extra_args",
    "env_extra": "job_script_prologue",
    "job_extra": "job_extra_directives",
    "header_skip": "job_directives_skip",
}
# Handled by this module (scaling, the YAML file) or by dask-jobqueue itself: never user options.
_NOT_OPTIONS = {
    "self",
    "scheduler",
    "name",
    "config_name",
    "base_class_kwargs",
    "job_kwargs",
    "job_cls",
    "n_workers",
    "loop",
    "asynchronous",
    "scheduler_cls",
    "host",
    "dashboard_address",
}


def _dask_jobqueue() -> Any:
    try:
        import dask_jobqueue
    except ImportError as e:  # pragma: no cover - exercised only where the package is missing
        raise JobqueueError(
            "starting a cluster through Slurm, PBS or LSF needs dask-jobqueue: pip install dask-jobqueue "
            "(or conda install -c conda-forge dask-jobqueue)"
        ) from e
    return dask_jobqueue


def _check_kind(kind: str) -> str:
    k = str(kind).lower()
    if k not in KINDS:
        raise JobqueueError(f"unknown batch system {kind!r}; use one of {', '.join(KINDS)}")
    return k


def cluster_class(kind: str) -> Any:
    """The dask-jobqueue cluster class for ``kind`` ("slurm", "pbs" or "lsf")."""
    return getattr(_dask_jobqueue(), _CLASSES[_check_kind(kind)])


def load_config(config: str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """A dask config (nested dict) from a YAML file or a mapping; {} for None.

    The file is in dask's config format: a top-level ``jobqueue:`` key holding one section per batch
    system (``slurm:``, ``pbs:``, ``lsf:``), exactly like ``~/.config/dask/jobqueue.yaml``.
    """
    if config is None:
        return {}
    if isinstance(config, Mapping):
        data = copy.deepcopy(dict(config))
        where = "the config mapping"
    else:
        import yaml

        path = os.fspath(config)
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except FileNotFoundError:
            raise JobqueueError(
                f"jobqueue config {path} does not exist; give a YAML file with a "
                "jobqueue: section (see docs/jobs/jobqueue.yaml)"
            ) from None
        except yaml.YAMLError as e:
            raise JobqueueError(f"jobqueue config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        where = path
        data = {} if data is None else data
    if not isinstance(data, dict):
        raise JobqueueError(f"{where} must hold a mapping with a jobqueue: section, not {type(data).__name__}")
    section = data.get("jobqueue")
    if section is not None and not isinstance(section, dict):
        raise JobqueueError(f"the jobqueue: entry of {where} must be a mapping of batch systems (slurm:, pbs:, lsf:)")
    return data


def _accepted(kind: str) -> set[str]:
    """Keyword arguments the kind's cluster and job classes take (Python names)."""
    dj = _dask_jobqueue()
    cls = cluster_class(kind)
    names: set[str] = set()
    for fn in (cls.__init__, cls.job_cls.__init__, dj.core.Job.__init__, dj.core.JobQueueCluster.__init__):
        names |= {
            p.name for p in inspect.signature(fn).parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
    return (names - _NOT_OPTIONS) | {"job_name"}


def _python_names(section: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in section.items():
        name = str(key).replace("-", "_")
        if name == "scheduler_options" and isinstance(value, Mapping):  # Scheduler(**options): Python names
            value = {str(k).replace("-", "_"): v for k, v in value.items()}
        out["job_name" if name == "name" else name] = value
    return out


def _modernise(kind: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Old option names (extra, env-extra, job-extra, header-skip, project) → their replacements."""
    for old, new in _RENAMED.items():
        value = opts.pop(old, None)
        if value is not None and not opts.get(new):
            opts[new] = value
    if kind in ("slurm", "pbs"):
        project = opts.pop("project", None)
        if project is not None and opts.get("account") is None:
            opts["account"] = project
    return opts


def options(kind: str, *, config: Any = None, **overrides: Any) -> dict[str, Any]:
    """The resolved keyword arguments for the ``kind`` cluster: dask config < YAML file < overrides.

    Raises :class:`JobqueueError` for an unknown option (naming the known ones), a config file
    without a section for ``kind``, or a missing ``cores``/``memory``.
    """
    import dask

    kind = _check_kind(kind)
    accepted = _accepted(kind)
    base = _python_names(dask.config.get(f"jobqueue.{kind}", {}) or {})
    data = load_config(config)
    file_opts: dict[str, Any] = {}
    if config is not None:
        sections = data.get("jobqueue") or {}
        if kind not in sections:
            have = ", ".join(sorted(sections)) or "none"
            where = "the jobqueue config" if isinstance(config, Mapping) else f"jobqueue config {os.fspath(config)}"
            raise JobqueueError(f"{where} has no jobqueue.{kind} section (it has: {have})")
        file_opts = _python_names(sections[kind] or {})
    file_opts, overrides = _modernise(kind, file_opts), _modernise(kind, dict(overrides))
    unknown = sorted((set(file_opts) | set(overrides)) - accepted)
    if unknown:
        current = accepted - set(_RENAMED) - ({"project"} if kind != "lsf" else set())
        raise JobqueueError(
            f"unknown {kind} option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"known: {', '.join(sorted(current))}"
        )
    opts = {k: v for k, v in _modernise(kind, base).items() if k in accepted}
    for layer in (file_opts, overrides):  # later layers win; scheduler options merge key by key
        for key, value in layer.items():
            if key == "scheduler_options" and isinstance(value, Mapping):
                opts[key] = {**(opts.get(key) or {}), **value}
            else:
                opts[key] = value
    opts = {k: v for k, v in opts.items() if v is not None}
    missing = [k for k in ("cores", "memory") if opts.get(k) in (None, "")]
    if missing:
        raise JobqueueError(
            f"say how many cores and how much memory each {kind} job has: {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; put them under jobqueue.{kind} in the config "
            "file (cores: 8, memory: 32GiB) or pass them (cores=8, memory='32GiB')"
        )
    return opts


def job_script(kind: str, *, config: Any = None, scheduler_address: str = PLACEHOLDER_ADDRESS, **overrides: Any) -> str:
    """The batch script each worker job of a ``kind`` cluster would run (nothing is started).

    ``scheduler_address`` is written into the worker command; a running cluster's own
    ``cluster.job_script()`` has its real address.
    """
    kind = _check_kind(kind)
    opts = options(kind, config=config, **overrides)
    job_opts = {k: v for k, v in opts.items() if k not in _CLUSTER_ONLY}
    job_cls = cluster_class(kind).job_cls
    try:
        job = job_cls(scheduler_address, name="dummy-name", **job_opts)
    except (TypeError, ValueError) as e:
        raise JobqueueError(f"cannot build a {kind} job script: {str(e).splitlines()[0]}") from e
    return str(job.job_script())


def _check_scaling(jobs: int | None, minimum: int | None, maximum: int | None) -> None:
    for name, value in (("jobs", jobs), ("minimum", minimum), ("maximum", maximum)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise JobqueueError(f"{name} must be a whole number of jobs (0 or more), got {value!r}")
    if jobs is not None and (minimum is not None or maximum is not None):
        raise JobqueueError("give either jobs (a fixed number) or minimum/maximum (adaptive), not both")
    if minimum is not None and maximum is None:
        raise JobqueueError("adaptive scaling needs maximum (the most jobs to submit) as well as minimum")
    if maximum is not None and (minimum or 0) > maximum:
        raise JobqueueError(f"minimum ({minimum}) is larger than maximum ({maximum})")
    if maximum == 0:
        raise JobqueueError("maximum must be at least 1 job")


class _Submissions:
    """What happened to the jobs a cluster submitted: their ids, and the submit command's refusals."""

    def __init__(self) -> None:
        self.job_ids: list[str] = []
        self.failures: list[BaseException] = []


def _recording(job_cls: Any, record: _Submissions) -> Any:
    """A subclass of ``job_cls`` that notes each submission's job id or failure in ``record``.

    dask-jobqueue submits from a background task and only logs a refused submission, so a bad
    partition or account would otherwise leave the caller waiting for workers that never come.
    """

    async def start(self: Any) -> None:
        try:
            await job_cls.start(self)
        except BaseException as e:
            record.failures.append(e)
            raise
        record.job_ids.append(self.job_id)

    return type(
        job_cls.__name__, (job_cls,), {"start": start, "__module__": job_cls.__module__, "__doc__": job_cls.__doc__}
    )


def _refusal(e: BaseException) -> str:
    """The submit command's own words (its stderr) from dask-jobqueue's RuntimeError."""
    text = str(e)
    if "stderr:" in text:
        lines = [ln.strip() for ln in text.split("stderr:", 1)[1].splitlines() if ln.strip()]
        if lines:
            return "; ".join(lines)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines[:3]) or type(e).__name__


def _close_quietly(cluster: Any) -> None:
    try:
        cluster.close()
    except Exception as e:  # a cluster whose jobs were refused fails its own close; nothing to do about it
        log.debug("closing the batch cluster: %s", e)


def _await_submission(cluster: Any, kind: str, record: _Submissions, expected: int, timeout: float) -> None:
    """Wait until ``expected`` jobs are in the queue; raise at once if the batch system refused one."""
    submit = cluster.job_cls.submit_command.split()[0]
    deadline = time.monotonic() + timeout
    while True:
        if record.failures:
            raise JobqueueError(
                f"{submit} refused the {kind} worker job: {_refusal(record.failures[0])}; "
                "check the queue/partition, account, walltime and resources"
            )
        if len(record.job_ids) >= expected or time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def make_cluster(
    kind: str,
    *,
    config: Any = None,
    jobs: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    submit_timeout: float = SUBMIT_TIMEOUT,
    **overrides: Any,
) -> Any:
    """Start a dask-jobqueue cluster (its scheduler runs in this process) and ask for worker jobs.

    ``jobs=N`` submits N jobs; ``minimum``/``maximum`` adapt the number of jobs to the load within
    those bounds; with none of them one job is submitted. Returns once the first jobs are queued
    (at most ``submit_timeout`` seconds), or raises :class:`JobqueueError` with the batch system's
    message if it refuses them. The workers join when the jobs start. The caller closes the cluster
    (which cancels its jobs): use it as a context manager, or :func:`trackin_ooc.cluster.cluster_client`.
    """
    kind = _check_kind(kind)
    _check_scaling(jobs, minimum, maximum)
    opts = options(kind, config=config, **overrides)
    cls = cluster_class(kind)
    submit = cls.job_cls.submit_command.split()[0]
    if shutil.which(submit) is None:
        raise JobqueueError(
            f"{submit} is not on PATH, so no {kind} job can be submitted from here: run this on a login node "
            f"of the {kind} cluster, or start the workers with a job script and connect with --scheduler-file "
            "(docs/hpc.md)"
        )
    record = _Submissions()
    try:
        cluster = cls(job_cls=_recording(cls.job_cls, record), **opts)
    except (TypeError, ValueError, OSError, RuntimeError) as e:
        raise JobqueueError(f"cannot start the {kind} cluster: {_refusal(e)}") from e
    try:
        if minimum is not None or maximum is not None:
            cluster.adapt(minimum_jobs=minimum or 0, maximum_jobs=maximum)
            expected = minimum or 0
        else:
            expected = 1 if jobs is None else jobs
            cluster.scale(jobs=expected)
        _await_submission(cluster, kind, record, expected, submit_timeout)
    except BaseException:
        _close_quietly(cluster)
        raise
    return cluster


@contextlib.contextmanager
def batch_client(
    kind: str,
    *,
    config: Any = None,
    jobs: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    wait: int | None = None,
    timeout: float | str | None = None,
    **overrides: Any,
) -> Iterator[Any]:
    """Yield a ``distributed.Client`` (the default one) on a new ``kind`` cluster; close both on exit.

    :func:`trackin_ooc.cluster.cluster_client` calls this for a spec with ``batch=kind``.
    With ``wait=N`` it first waits for N workers to join (``timeout`` seconds at most; by default as
    long as the jobs wait in the queue).
    """
    from distributed import Client

    cluster = make_cluster(kind, config=config, jobs=jobs, minimum=minimum, maximum=maximum, **overrides)
    try:
        client = Client(cluster)
    except BaseException:
        _close_quietly(cluster)
        raise
    try:
        if wait:
            try:
                client.wait_for_workers(int(wait), timeout=timeout)  # type: ignore[arg-type]  # '30s' too
            except TimeoutError as e:
                raise JobqueueError(
                    f"{wait} {kind} worker(s) did not join within {timeout}; check the queue (squeue / qstat / "
                    "bjobs) and the jobs' logs (log_directory)"
                ) from e
        yield client
    finally:
        client.close()
        cluster.close()
