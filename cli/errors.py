"""Exceptions → exit status and one line on stderr; a traceback only with ``--debug``.

0  success
2  usage error: a bad option, argument or combination (click's)
1  anything else: bad input files, incompatible stores, failed capture, interruption
"""

from __future__ import annotations

import errno
import re
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
        return (
            "a Dask worker died while running a task, most likely out of memory; give the workers more "
            "memory (--memory-limit) or use more of them"
        )
    if isinstance(e, _PLAIN):
        return f"{type(e).__name__}: {text}" if text else type(e).__name__
    return f"unexpected {type(e).__name__}: {text or 'no message'}; rerun with --debug for the traceback and report it"


class RunState:
    """What the group callback learnt while parsing: --debug (only where click parsed it) and the command."""

    debug = False
    command: str | None = None

    @classmethod
    def reset(cls) -> None:
        cls.debug, cls.command = False, None


def set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """Eager callback of the group's --debug: the traceback is shown only when click parsed the flag there."""
    RunState.debug = bool(value)
    return value


# Python arguments in the library's messages → the CLI's options (a message may give both: "overwrite=True
# (--overwrite)"; then only the option stays).
_PY_VALUE = r"(?:\[\.\.\.\]|True|False|None|'[^']*'|\"[^\"]*\"|[\w.]+(?:\(\w*\))?)?"
_BOTH = [
    (re.compile(rf"\b[a-z_]+={_PY_VALUE}\s*\((--?[a-z][a-z-]*(?: [A-Za-z:]+)?)\)"), r"\1"),
    (re.compile(rf"\b[a-z_]+={_PY_VALUE}, (--?[a-z][a-z-]*)\b"), r"\1"),
]
_PY_TO_CLI = [
    (re.compile(pattern), repl)
    for pattern, repl in (
        (r"\brerun the same capture\b", "rerun the same command"),
        (r"\boverwrite=True\b", "--overwrite"),
        (r"\blearning_rates=\[\.\.\.\]", "--lr"),
        (r"\bdevice='(\w+)'", r"--device \1"),
        (r"\bprojection='(\w+)'", r"--projection \1"),
        (r"\bprojection_dim=None\b", "no --projection-dim"),
        (r"\bprojection_dim\b", "--projection-dim"),
        (r"\bnonfinite='flag'", "--allow-nonfinite"),
        (r"\bexact_norms=False\b", "without --exact-norms"),
        (r"\bexact_norms=True\b", "--exact-norms"),
        (r"\bindex=build_index\(train\) \(or index=True\)", "--index (after 'trackin-ooc index TRAIN')"),
        (r"\bindex=True\b", "--index"),
        (r"\bn_probe\b", "--probe"),
        (r"\bk=(\d+)", r"-k \1"),
        (r"\buse k <= (\d+)", r"use -k \1 or less"),
        (r"\bpass e\.g\. k=10\b", "give e.g. -k 10"),
        (r"\bnormalize=True\b", "--normalize"),
        (r"\bmemory_limit\b", "--memory-limit"),
        (r"\bbatch_size\b", "--batch-size"),
        (r"\bchunk_rows\b", "--chunk-rows"),
        (r"\blayers=\[\.\.\.\]", "--layers"),
        (r"\btarget_key=?", "--target-key"),
        (r"\bloss_fn=?", "--loss"),
        (r"\bcheckpoints=\[\.\.\.\]", "--checkpoint"),
    )
]
# zarr's store reprs (LocalStore('file:///x')) in messages: the path is what the user gave.
_ZARR_NOT_FOUND = re.compile(r"No group found in store \w*Store\([^)]*\) at path '[^']*'")
_ZARR_STORE = re.compile(r"\b\w*Store\((['\"])(?:file://)?([^'\"]*)\1\)")


def cli_words(text: str) -> str:
    """A library message in the CLI's words: options instead of Python arguments, paths instead of zarr reprs."""
    text = _ZARR_NOT_FOUND.sub("it holds no Zarr group", text)
    text = _ZARR_STORE.sub(r"\2", text)
    for pattern, repl in _BOTH + _PY_TO_CLI:
        text = pattern.sub(repl, text)
    return text


def global_option_hint(e: click.NoSuchOption, group: click.Command) -> str | None:
    """For a global option given after the command: say where it goes."""
    names = {o for p in getattr(group, "params", []) for o in (*p.opts, *p.secondary_opts)}
    if e.option_name not in names:
        return None
    command = RunState.command or "COMMAND"
    return (
        f"{e.option_name} is a global option: give it before the command, "
        f"e.g. '{PROG} {e.option_name} ... {command} ...'"
    )


def _usage_line(e: click.ClickException) -> str:
    msg = one_line(e.format_message()).rstrip(".")
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else PROG
    if isinstance(e, click.UsageError):
        return f"{where}: error: {msg}; see '{where} --help'"
    return f"{where}: error: {msg}"


def report(line: str) -> None:
    click.echo(line, err=True)


def _where() -> str:
    return f"{PROG} {RunState.command}" if RunState.command else PROG


def run(command: click.Command, args: list[str] | None = None) -> int:
    """Run the click application and map every outcome to an exit status."""
    args = list(sys.argv[1:] if args is None else args)
    RunState.reset()
    try:
        rv = command.main(args=args, prog_name=PROG, standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        report(f"{_where()}: error: interrupted")
        return EXIT_FAILURE
    except click.NoSuchOption as e:
        if RunState.debug:
            traceback.print_exc()
        hint = global_option_hint(e, command)
        where = e.ctx.command_path if getattr(e, "ctx", None) is not None else PROG
        report(f"{where}: error: {hint}" if hint else _usage_line(e))
        return EXIT_USAGE
    except click.ClickException as e:
        if RunState.debug:
            traceback.print_exc()
        report(_usage_line(e))
        return EXIT_USAGE if isinstance(e, click.UsageError) else (e.exit_code or EXIT_FAILURE)
    except KeyboardInterrupt:
        if RunState.debug:
            traceback.print_exc()
        report(f"{_where()}: error: interrupted")
        return EXIT_FAILURE
    except BrokenPipeError:
        return EXIT_FAILURE
    except Exception as e:
        if RunState.debug:
            traceback.print_exc()
        report(f"{_where()}: error: {cli_words(describe(e))}")
        return EXIT_FAILURE
    return rv if isinstance(rv, int) else EXIT_OK
