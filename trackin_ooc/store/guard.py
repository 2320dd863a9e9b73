"""The one rule every writer checks before any work: an output never lands on, in or around an input,
and ``overwrite`` replaces only an earlier output of the kind that writer makes.

This module owns the rule: every writer calls :func:`check_output_location` once (the location must also be
writable), then lays its output out with :func:`clear_output` or :func:`lay_out_output`, which replace what
the check found without checking again; :func:`prepare_output` does both for writers that check and write
in one step.

``--overwrite`` means "replace my earlier output", never "delete my data": a gradient store that took
hours to capture is not replaced by a table, an influence matrix or an index, nor is a folder that no
trackin-ooc writer made. The rule (docs/reliability.md, "Outputs never replace inputs"):

1. An output location equal to an input location, inside one, or containing one is refused, with or
   without ``overwrite``. Local paths are compared after ``os.path.realpath`` (symlinks and ``..``
   resolved); fsspec URLs after normalisation (protocol, ``..`` and trailing slashes).
2. Without ``overwrite`` an existing output is refused (``StoreExistsError``), except an unfinished
   output of the writer's own kind where the writer resumes (``resumable=True``).
3. With ``overwrite`` the existing thing is replaced only if it is an earlier output of the same kind
   (its ``trackin_ooc`` attributes say so), an empty folder, or, for kinds written as plain files
   (tables: ``.csv``/``.parquet``), a plain file with such a name. Anything else is refused with a
   one-line message saying how to remove it deliberately.

Kinds: "gradients" (capture, from_arrays), "influence" (``influence(out=)``), "table" (self-influence
and top-k tables, ``.zarr`` ones carry ``trackin_ooc`` attributes with kind "table"), "index"
(``build_index(path=)``); any other name works the same way. Reads metadata only.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import OutputKindError, OutputOverlapsInputError, StoreExistsError
from . import backends, layout, replace
from .backends import StorageOptions

# What each kind is called in messages; a kind not listed is called "<kind> output".
KIND_NAMES = {
    "gradients": "gradient store",
    "influence": "influence output",
    "table": "table",
    "index": "index",
}
# Kinds that may also be plain files with these extensions (which carry no trackin-ooc attributes).
FILE_KINDS = {"table": (".csv", ".parquet")}


def kind_name(kind: str | None) -> str:
    return KIND_NAMES.get(kind or "", f"{kind} output")


# ---- locations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Location:
    """A canonical place: ("file", realpath) for local paths, (protocol, normalised path) for URLs."""

    scheme: str
    path: str
    shown: str  # the path as the user would recognise it (absolute, links not resolved)

    def within(self, other: Location) -> bool:
        """Whether this location is ``other`` or lies inside it."""
        if self.scheme != other.scheme:
            return False
        root = other.path.rstrip("/") or "/"
        return self.path == root or self.path.startswith(root if root.endswith("/") else root + "/")


def location(path: str | os.PathLike[str] | Any) -> Location:
    """The canonical :class:`Location` of a path, URL or anything with a ``.path`` (a store)."""
    raw = getattr(path, "path", path)
    if backends.is_remote(raw):
        url = os.fspath(raw)
        protocol, _, rest = url.partition("://")
        rest = posixpath.normpath("/" + rest.lstrip("/")).lstrip("/")
        return Location(protocol.lower(), rest, backends.normalize_path(url))
    shown = backends.normalize_path(raw)
    return Location("file", os.path.realpath(shown), shown)


def _inputs(inputs: Iterable[Any]) -> list[Location]:
    """Locations of the inputs that have one (paths, URLs, stores); in-memory inputs are skipped."""
    located = (getattr(p, "path", p) for p in inputs)
    return [location(p) for p in located if isinstance(p, (str, os.PathLike))]


def check_not_an_input(
    out: str | os.PathLike[str], inputs: Iterable[Any], *, what: str = "input store", inside_ok: bool = False
) -> None:
    """Refuse an output that is an input, lies inside one or contains one (``OutputOverlapsInputError``).

    ``inside_ok``: an output inside an input folder is fine (a store written into a run folder of
    checkpoints); it still never is nor contains one.
    """
    o = location(out)
    for i in _inputs(inputs):
        if o.within(i):
            if inside_ok and not i.within(o):
                continue
            relation = "is the" if i.within(o) else "is inside the"
        elif i.within(o):
            relation = "contains the"
        else:
            continue
        resolved = ""
        if o.scheme == "file" and (o.shown, i.shown) != (o.path, i.path):
            resolved = f" (both resolve to {o.path})" if o.path == i.path else f" (resolved: {o.path}, {i.path})"
        raise OutputOverlapsInputError(
            f"output {o.shown} {relation} {what} {i.shown}{resolved}; write the output somewhere else "
            "(overwrite never replaces an input)"
        )


# ---- what is there -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Existing:
    """What a location holds: a trackin-ooc output (``kind`` set), a plain file, a folder, or nothing."""

    exists: bool
    is_dir: bool = False
    empty: bool = False
    kind: str | None = None  # from the group's trackin_ooc attributes; None: not a trackin-ooc output
    complete: bool = False

    def describe(self) -> str:
        if self.kind is not None:
            return f"a{'' if self.complete else 'n unfinished'} trackin-ooc {kind_name(self.kind)}"
        return f"a {'folder' if self.is_dir else 'file'} that no trackin-ooc writer made"


def output_meta(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> dict[str, Any] | None:
    """The ``trackin_ooc`` attributes of the Zarr group at ``path``, None when there is none."""
    import zarr

    try:
        group = zarr.open_group(
            store=backends.zarr_store(path, storage_options=storage_options, read_only=True),
            mode="r",
            use_consolidated=False,
        )
        meta = dict(group.attrs).get(layout.ATTRS_KEY)
    except Exception:
        return None
    return meta if isinstance(meta, dict) else None


def meta_kind(meta: dict[str, Any]) -> str:
    """The kind a ``trackin_ooc`` attribute dict declares (gradient stores predate the ``kind`` key)."""
    return str(meta.get("kind", "gradients"))


def inspect(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> Existing:
    """What ``path`` holds now (metadata and a folder listing only)."""
    if backends.is_remote(path):
        fs, p = backends.filesystem(path, storage_options)
        if not fs.exists(p):
            return Existing(False)
        is_dir = fs.isdir(p)
        empty = is_dir and not fs.ls(p, detail=False)
    else:
        p = backends.normalize_path(path)
        if not os.path.lexists(p):
            return Existing(False)
        is_dir = os.path.isdir(p)
        empty = is_dir and not os.listdir(p)
    meta = output_meta(path, storage_options) if is_dir and not empty else None
    if meta is None:
        return Existing(True, is_dir=is_dir, empty=empty)
    return Existing(True, is_dir=is_dir, kind=meta_kind(meta), complete=bool(meta.get("complete", False)))


def replaceable(existing: Existing, kind: str, path: str | os.PathLike[str]) -> bool:
    """Whether ``overwrite`` may replace ``existing`` with a ``kind`` output at ``path``."""
    if not existing.exists or existing.empty or existing.kind == kind:
        return True
    extensions = FILE_KINDS.get(kind, ())
    plain_file = existing.kind is None and not existing.is_dir
    return plain_file and bool(extensions) and os.fspath(path).lower().endswith(extensions)


def _remove_hint(path: str | os.PathLike[str], existing: Existing) -> str:
    shown = backends.normalize_path(path)
    if backends.is_remote(path):
        return f"delete {shown} with your storage's own tools"
    return f"rm -r {shown}" if existing.is_dir else f"rm {shown}"


# ---- the rule ----------------------------------------------------------------------------------
def check_location(
    out: str | os.PathLike[str],
    inputs: Iterable[Any] = (),
    *,
    input_what: str = "input store",
    inside_inputs_ok: bool = False,
) -> None:
    """The rule's first half, about the place alone: writable (``backends.check_writable``) and never on,
    in or around an input (:func:`check_not_an_input`). For a writer that decides later, under its lock,
    what an existing output there means (``retrain`` resumes one of the same job)."""
    backends.check_writable(out)
    check_not_an_input(out, inputs, what=input_what, inside_ok=inside_inputs_ok)


def check_output_location(
    out: str | os.PathLike[str],
    inputs: Iterable[Any] = (),
    *,
    kind: str,
    overwrite: bool,
    resumable: bool = False,
    input_what: str = "input store",
    inside_inputs_ok: bool = False,
    storage_options: StorageOptions = None,
) -> Existing:
    """Apply the rule to the output ``out`` of a ``kind`` writer reading ``inputs``; return what is there.

    ``inputs``: paths, URLs or stores (anything with ``.path``); other entries (None, in-memory
    checkpoints) are skipped. ``input_what`` names them in messages ("input store", "checkpoint").
    ``resumable``: the writer resumes an unfinished output of its own kind, so one is not "existing".
    ``inside_inputs_ok``: see :func:`check_not_an_input`.
    Raises :class:`OutputOverlapsInputError`, :class:`OutputKindError` or ``StoreExistsError``, and
    ``StoreError`` for a local location that cannot be written (``backends.check_writable``).
    """
    check_location(out, inputs, input_what=input_what, inside_inputs_ok=inside_inputs_ok)
    existing = inspect(out, storage_options)
    if not existing.exists:
        return existing
    shown = backends.normalize_path(out)
    ok = replaceable(existing, kind, out)
    if not overwrite:
        if resumable and existing.kind == kind and not existing.complete:
            return existing
        if ok:
            raise _exists_error(out, existing, kind)
    if not ok:
        raise OutputKindError(
            f"{shown} already exists and is {existing.describe()}; overwrite replaces only an earlier "
            f"{kind_name(kind)}: remove it deliberately first ({_remove_hint(out, existing)}) or choose "
            "another path"
        )
    return existing


def _exists_error(out: str | os.PathLike[str], existing: Existing, kind: str) -> StoreExistsError:
    state = " and is complete" if existing.kind == kind and existing.complete else ""
    return StoreExistsError(
        f"{kind_name(kind)} {backends.normalize_path(out)} already exists{state}; pass overwrite=True (--overwrite) "
        "to replace it, or choose another path"
    )


def require_resumed(out: str | os.PathLike[str], existing: Existing, *, kind: str, overwrite: bool) -> None:
    """After :func:`check_output_location` with ``resumable=True``, for a writer that did not resume what is
    there (an unfinished output of another job): without ``overwrite`` it is an existing output like any other
    (``StoreExistsError``)."""
    if existing.exists and not overwrite and existing.kind == kind and not existing.complete:
        raise _exists_error(out, existing, kind)


# ---- laying out what the rule allowed ----------------------------------------------------------
Made = TypeVar("Made")


def prepare_output(
    out: str | os.PathLike[str],
    inputs: Iterable[Any] = (),
    *,
    kind: str,
    overwrite: bool,
    storage_options: StorageOptions = None,
) -> Existing:
    """Apply the rule (:func:`check_output_location`), then remove what ``overwrite`` replaces.

    Only an earlier output of ``kind``, an empty folder, or nothing is ever removed. Returns what was there.
    """
    existing = check_output_location(out, inputs, kind=kind, overwrite=overwrite, storage_options=storage_options)
    clear_output(out, existing, storage_options)
    return existing


def clear_output(out: str | os.PathLike[str], existing: Existing, storage_options: StorageOptions = None) -> None:
    """Remove the earlier output that :func:`check_output_location` found at ``out`` and allowed replacing."""
    if existing.exists and backends.exists(out, storage_options):
        backends.remove(out, storage_options)


def lay_out_output(
    out: str | os.PathLike[str],
    existing: Existing,
    make: Callable[[str | os.PathLike[str], StorageOptions], Made],
    storage_options: StorageOptions = None,
) -> Made | None:
    """Lay out a new output with ``make(path, storage_options)`` where the rule found ``existing``.

    An earlier local output is exchanged with the new layout in one rename (``store.replace``), so a kill at
    any point leaves the old output or the new one; then None is returned (open the new one at ``out``).
    Object stores cannot swap: the earlier output goes first, and ``make``'s result is returned.
    """
    if existing.exists and not backends.is_remote(out):
        replace.lay_out_replacing(backends.normalize_path(out), lambda p: make(p, None))
        return None
    clear_output(out, existing, storage_options)
    return make(out, storage_options)


# ---- single-file outputs (views and reports: .html, .png) ---------------------------------------------
# The mark a page (``<meta name="generator" content="trackin-ooc ...">``) or a picture (a ``Software``
# text chunk) this package wrote carries: only such a file is replaced with overwrite.
GENERATOR = "trackin-ooc"
MARK = GENERATOR.encode()


def written_here(path: str) -> bool:
    """Whether the file at ``path`` is a page or picture this package wrote (its mark in the first 4 KiB)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return b"Software\x00" + MARK in head
    return b'name="generator" content="' + MARK in head


def check_file_output(path: str | os.PathLike[str], *, what: str, overwrite: bool, inputs: Iterable[Any] = ()) -> str:
    """Apply the output rule to a local file output; return its absolute path.

    Raises ``OutputOverlapsInputError`` (an input's place), ``StoreExistsError`` (exists, no overwrite) or
    ``OutputKindError`` (exists and is not an earlier output of this package, or is a folder).
    """
    if backends.is_remote(path):
        raise OutputKindError(
            f"{os.fspath(path)}: the {what} is written to a local file; give a local path and copy it afterwards"
        )
    final = os.path.abspath(os.path.expanduser(os.fspath(path)))
    check_not_an_input(final, inputs)
    if not os.path.lexists(final):
        parent = os.path.dirname(final)
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise OutputKindError(f"cannot write {final}: {parent} is a file, not a folder")
        return final
    if os.path.isdir(final):
        raise OutputKindError(f"{final} is a folder; the {what} is one file: give a file name (say report.html)")
    if not overwrite:
        raise StoreExistsError(
            f"{what} {final} already exists; pass overwrite=True (--overwrite) to replace it, or choose another path"
        )
    if not written_here(final):
        raise OutputKindError(
            f"{final} already exists and was not written by trackin-ooc; overwrite replaces only "
            f"an earlier {what}: remove it deliberately first (rm {final}) or choose another path"
        )
    return final
