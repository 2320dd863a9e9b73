"""Exceptions → exit status and one line on stderr; a traceback only with ``--debug``.

    0  success
    2  usage error: a bad option, argument or combination (click's)
    1  anything else: bad input files, incompatible stores, failed capture, interruption
"""

from __future__ import annotations

import errno
import sys
import traceback

import click

PROG = "trackin-ooc"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# Exception types whose message already says what is wrong (the library's, the OS's, the user's code).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_PLAIN = (OSError, ValueError, RuntimeError, ImportError, LookupError, TypeError, MemoryError)


def one_line(text: str) -> str:
    """Collapse a message to one line (joined with '; ')."""
    parts = [p.strip() for p in str(text).strip().splitlines() if p.strip()]
    return "; ".join(parts)


def _is_trackin_error(e: BaseException) -> bool:
    # Checked by name along the MRO so that `--help` never needs to import the library (and torch).
    return any(c.__name__ == "TrackinError" and c.__module__.startswith("trackin_ooc") for c in type(e).__mro__)


def describe(e: BaseException) -> str:
    """The one-line message for an exception."""
    if _is_trackin_error(e):
        return one_line(str(e)) or type(e).__name__
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"{e.filename}: no such file or folder; check the path"
    if isinstance(e, PermissionError) and e.filename:
        return f"{e.filename}: permission denied; choose a path you can write"
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}no space left on the device (disk or quota full); free space or choose another location"
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}read-only file system; choose a writable location"
    if isinstance(e, MemoryError):
        return "out of memory; lower --memory-limit, --batch-size or --projection-dim, or use a cluster"
    text = one_line(str(e))
    if type(e).__name__ == "KilledWorker":
        return ("a Dask worker died while running a task, most likely out of memory; give the workers more "
                "memory (--memory-limit) or use more of them")
    if isinstance(e, _PLAIN):
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return (f"unexpected {type(e).__name__}: {text or 'no message'}; "
            f"rerun with --debug for the traceback and report it")


def _usage_line(e: click.ClickException) -> str:
    msg = one_line(e.format_message()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else PROG
    if isinstance(e, click.UsageError):
        return f"{where}: error: {msg}; see '{where} --help'"
    return f"{where}: error: {msg}"


def report(line: str) -> None:
    click.echo(line, err=True)


def run(command: click.Command, args: list[str] | None = None) -> int:
    """Run the click application and map every outcome to an exit status."""
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args
    try:
        rv = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        report(f"{PROG}: error: interrupted")
        return EXIT_FAILURE
    except click.ClickException as e:
        if debug:
            traceback.print_exc()
        report(_usage_line(e))
        return EXIT_USAGE if isinstance(e, click.UsageError) else (e.exit_code or EXIT_FAILURE)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        report(f"{PROG}: error: interrupted")
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_FAILURE
    except Exception as e:
        if debug:
            traceback.print_exc()
        report(f"{PROG}: error: {describe(e)}")
        return EXIT_FAILURE
    return rv if isinstance(rv, int) else EXIT_OK
