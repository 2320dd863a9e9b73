"""The global options, shared by every command through click's context object."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass

import click


@dataclass
class Settings:
    scheduler_address: str | None = None
    scheduler_file: str | None = None
    workers: int | None = None
    cluster: str | None = None  # slurm | pbs | lsf: a dask-jobqueue cluster
    cluster_config: str | None = None
    jobs: int | None = None
    minimum_jobs: int | None = None
    maximum_jobs: int | None = None
    memory_limit: str | None = None
    device: str = "auto"
    quiet: bool = False
    progress_forced: bool = False
    debug: bool = False

    @property
    def progress(self) -> bool | None:
        """False with --quiet, True with --progress, else None: bars only on a terminal."""
        if self.quiet:
            return False
        return True if self.progress_forced else None

    @property
    def scoring_memory_limit(self) -> str | None:
        """Budget for the scoring functions: with --workers it is the workers' limit instead."""
        return None if self.workers is not None else self.memory_limit

    def say(self, message: str) -> None:
        """A status line on stderr (not with --quiet)."""
        if not self.quiet:
            click.echo(message, err=True)

    def done(self, message: str) -> None:
        """The final one-line summary on stdout (not with --quiet)."""
        if not self.quiet:
            click.echo(message)

    @contextlib.contextmanager
    def plan_lines(self, rename: dict[str, str] | None = None):
        """Show what the library announces before long work (a capture's size estimate) as status lines;
        ``rename``: paths to say otherwise (a staging folder → the output the user named)."""
        log = logging.getLogger("trackin_ooc.plan")
        handler = _SayHandler(self.say, rename or {})
        saved = log.level, log.propagate
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        try:
            yield
        finally:
            log.removeHandler(handler)
            log.setLevel(saved[0])
            log.propagate = saved[1]

    def _quieten_dask(self) -> None:
        import distributed  # noqa: F401  (configures its loggers on import: quieten them after)

        if not self.debug:
            # The CLI reports failures itself, in one line; worker restarts and the like are noise here.
            for name in ("distributed", "tornado", "bokeh", "asyncio", "dask_jobqueue"):
                logging.getLogger(name).setLevel(logging.CRITICAL)

    @contextlib.contextmanager
    def client(self):
        """The Dask client the global options ask for (None: in-process threads)."""
        from trackin_ooc.cluster import ClusterSpec, cluster_client, dashboard_link

        if self.cluster is not None:
            batch = ClusterSpec(
                batch=self.cluster,
                batch_config=self.cluster_config,
                jobs=self.jobs,
                minimum_jobs=self.minimum_jobs,
                maximum_jobs=self.maximum_jobs,
                wait=1,
            )
            self._quieten_dask()
            with cluster_client(batch) as client:
                self.say(f"dask: {self.cluster} cluster, dashboard {dashboard_link(client)}")
                yield client
            return
        spec = ClusterSpec(
            scheduler_address=self.scheduler_address,
            scheduler_file=self.scheduler_file,
            workers=self.workers,
            memory_limit=self.memory_limit,
            gpu=self.device == "gpu",
        )
        if spec.in_process and self.device == "gpu":
            spec = _gpu_cluster_spec(spec)  # one dask-cuda worker per GPU, or in-process on the one GPU
        if spec.in_process:
            yield None
            return
        self._quieten_dask()
        with cluster_client(spec) as client:
            link = dashboard_link(client) if importlib.util.find_spec("bokeh") else None
            workers = len(client.scheduler_info().get("workers", {}))
            self.say(f"dask: {plural(workers, 'worker')} ({spec.describe()})" + (f", dashboard {link}" if link else ""))
            yield client


class _SayHandler(logging.Handler):
    """A logging handler that prints each record's message as a status line."""

    def __init__(self, say, rename: dict[str, str]):
        super().__init__(level=logging.INFO)
        self._say, self._rename = say, rename

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for old, new in self._rename.items():
            message = message.replace(old, new)
        self._say(message)


def _gpu_cluster_spec(spec):
    """``--device gpu`` without a cluster: a LocalCUDACluster with one worker per GPU when dask-cuda is
    installed and there are several GPUs; otherwise in-process on the one GPU (same kernels, no start-up)."""
    import dataclasses

    if importlib.util.find_spec("dask_cuda") is None:
        return spec
    import torch

    n_gpus = torch.cuda.device_count()
    return dataclasses.replace(spec, workers=n_gpus) if n_gpus > 1 else spec


pass_settings = click.make_pass_decorator(Settings, ensure=True)


def rate(count: float, seconds: float, unit: str) -> str:
    per = count / seconds if seconds > 0 else float("inf")
    if per >= 1e6:
        return f"{per / 1e6:,.1f} M {unit}/s"
    if per >= 1e4:
        return f"{per / 1e3:,.0f} k {unit}/s"
    return f"{per:,.0f} {unit}/s"


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"
