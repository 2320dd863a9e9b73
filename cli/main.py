"""Entry point of the ``trackin-ooc`` command: the click group, its global options, and main()."""

from __future__ import annotations

import functools
import logging
import sys
import warnings

import click

from . import errors
from .cmd_capture import capture
from .cmd_curvature import fit_curvature
from .cmd_demo import demo
from .cmd_info import info
from .cmd_quality import lds, retrain
from .cmd_queries import index, net_influence
from .cmd_report import report
from .cmd_scores import influence, self_influence, top_k
from .settings import Settings

DEVICES = ("auto", "cpu", "gpu")


def _version() -> str:
    # From the installed metadata: importing trackin_ooc would import torch just to print a version.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trackin-ooc")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        from trackin_ooc import __version__

        return __version__


def _memory_limit(ctx, param, value):
    if value is None:
        return None
    from dask.utils import parse_bytes

    try:
        n = parse_bytes(value)
    except (ValueError, TypeError):
        raise click.BadParameter(f"{value!r} is not a size; write e.g. 2GiB or 500MB") from None
    if n <= 0:
        raise click.BadParameter(f"{value!r} must be a positive size, e.g. 2GiB")
    return value


def _configure_output(debug: bool, quiet: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="trackin-ooc: %(levelname)s: %(name)s: %(message)s"
    )
    if not debug:
        # Library warnings (dask, torch, zarr) are for developers; --debug shows them.
        warnings.simplefilter("ignore")
        logging.getLogger("distributed").setLevel(logging.ERROR)
        # zarr's event loop reports pending I/O as errors when an interrupt ends the process early.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    if quiet:
        logging.getLogger().setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(_version(), prog_name="trackin-ooc")
@click.option("--scheduler-address", metavar="ADDR", help="Score on the Dask scheduler at ADDR (tcp://host:port).")
@click.option(
    "--scheduler-file",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="Score on the Dask scheduler described by FILE (dask scheduler --scheduler-file).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    metavar="N",
    help="Score on a local cluster of N worker processes (bound to 127.0.0.1).",
)
@click.option(
    "--cluster",
    type=click.Choice(["slurm", "pbs", "lsf"]),
    default=None,
    help="Start a dask-jobqueue cluster on this batch system (configured by dask's jobqueue config).",
)
@click.option(
    "--cluster-config",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML with a jobqueue: section for --cluster (cores, memory, walltime, queue, ...).",
)
@click.option("--jobs", type=click.IntRange(min=1), metavar="N", help="With --cluster: submit N worker jobs.")
@click.option(
    "--minimum-jobs", type=click.IntRange(min=0), metavar="N", help="With --cluster: adapt between this many jobs ..."
)
@click.option("--maximum-jobs", type=click.IntRange(min=1), metavar="N", help="... and this many.")
@click.option(
    "--memory-limit",
    metavar="SIZE",
    callback=_memory_limit,
    help="Memory per local worker with --workers; otherwise the scoring memory budget (e.g. 2GiB).",
)
@click.option(
    "--device",
    type=click.Choice(DEVICES),
    default="auto",
    show_default=True,
    help="Where gradients and scores are computed (gpu: CUDA torch for capture, CuPy for scoring).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary line, only errors.")
@click.option(
    "--progress", "progress_forced", is_flag=True, help="Show progress bars even when stderr is not a terminal."
)
@click.option(
    "--debug",
    is_flag=True,
    is_eager=True,
    callback=errors.set_debug,
    help="Show tracebacks and library warnings (a global option: before the command).",
)
@click.pass_context
def cli(
    ctx,
    scheduler_address,
    scheduler_file,
    workers,
    cluster,
    cluster_config,
    jobs,
    minimum_jobs,
    maximum_jobs,
    memory_limit,
    device,
    quiet,
    progress_forced,
    debug,
):
    """TracIn training-data influence, out of core.

    \b
    Typical run:
      trackin-ooc capture --model pkg.mod:make_model --data pkg.mod:train_set \\
          --checkpoint ckpt/epoch_010.pt --checkpoint ckpt/epoch_020.pt --out train.zarr
      trackin-ooc capture ... --data pkg.mod:test_set --out test.zarr
      trackin-ooc self-influence train.zarr --out suspects.csv
      trackin-ooc top-k --train train.zarr --test test.zarr -k 10 --out top.parquet
      trackin-ooc info train.zarr

    Exit status: 0 success, 2 usage error, 1 any other failure (one line on stderr;
    --debug for the traceback).
    """
    given = [
        name
        for name, v in (
            ("--scheduler-address", scheduler_address),
            ("--scheduler-file", scheduler_file),
            ("--workers", workers),
            ("--cluster", cluster),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} exclude each other; give one of them")
    if cluster is None and any(v is not None for v in (cluster_config, jobs, minimum_jobs, maximum_jobs)):
        raise click.UsageError("--cluster-config, --jobs, --minimum-jobs and --maximum-jobs need --cluster")
    if quiet and progress_forced:
        raise click.UsageError("--quiet and --progress exclude each other")
    errors.RunState.command = ctx.invoked_subcommand
    _configure_output(debug, quiet)
    ctx.obj = Settings(
        scheduler_address=scheduler_address,
        scheduler_file=scheduler_file,
        workers=workers,
        cluster=cluster,
        cluster_config=cluster_config,
        jobs=jobs,
        minimum_jobs=minimum_jobs,
        maximum_jobs=maximum_jobs,
        memory_limit=memory_limit,
        device=device,
        quiet=quiet,
        progress_forced=progress_forced,
        debug=debug,
    )


def _warn_if_swapped(command: click.Command) -> click.Command:
    """Wrap a command taking --train and --test: warn when the train store holds fewer examples than the
    test store (the two look swapped). Reads metadata only; a store that does not open is left to the command."""
    callback = command.callback

    @functools.wraps(callback)
    def checked(*args, **kwargs):
        train, test = kwargs.get("train"), kwargs.get("test")
        settings = click.get_current_context().find_object(Settings)
        if train is not None and test is not None and settings is not None:
            counts = _example_counts(train, test)
            if counts is not None and counts[0] < counts[1]:
                settings.say(
                    f"{errors.PROG} {command.name}: warning: --train {train} holds {counts[0]:,} examples, "
                    f"fewer than --test {test} ({counts[1]:,}): are --train and --test swapped?"
                )
        return callback(*args, **kwargs)

    command.callback = checked
    return command


def _example_counts(train, test) -> tuple[int, int] | None:
    from trackin_ooc import open_store

    try:
        return open_store(train).n_examples, open_store(test).n_examples
    except Exception:  # noqa: BLE001 - the command reports a store that does not open, in its own words
        return None


for _command in (
    capture,
    fit_curvature,
    self_influence,
    influence,
    top_k,
    index,
    net_influence,
    retrain,
    lds,
    info,
    demo,
    report,
):
    names = {p.name for p in _command.params}
    cli.add_command(_warn_if_swapped(_command) if {"train", "test"} <= names else _command)


def main(argv: list[str] | None = None) -> None:
    sys.exit(errors.run(cli, argv))


if __name__ == "__main__":  # pragma: no cover
    main()
