"""Where stores live: local paths or any fsspec URL (s3://, file://, memory://...).

The only place that turns a user's path into a zarr ``Store``; everything else passes paths.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from zarr.storage import FsspecStore, LocalStore

StorageOptions = dict[str, Any] | None


def is_remote(path: str | os.PathLike[str]) -> bool:
    s = os.fspath(path)
    return "://" in s and not s.startswith("file://")


def local_path(path: str | os.PathLike[str]) -> str:
    s = os.fspath(path)
    return s[len("file://") :] if s.startswith("file://") else s


def normalize_path(path: str | os.PathLike[str]) -> str:
    """A canonical string for a store location (absolute for local paths)."""
    if is_remote(path):
        return os.fspath(path).rstrip("/")
    return os.path.abspath(os.path.expanduser(local_path(path)))


def zarr_store(
    path: str | os.PathLike[str], *, storage_options: StorageOptions = None, read_only: bool = False
) -> FsspecStore | LocalStore:
    """A zarr v3 store object for ``path``."""
    if is_remote(path):
        return FsspecStore.from_url(os.fspath(path), storage_options=dict(storage_options or {}), read_only=read_only)
    return LocalStore(normalize_path(path), read_only=read_only)


def filesystem(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> tuple[Any, str]:
    fs, fs_path = fsspec.core.url_to_fs(
        os.fspath(path) if is_remote(path) else normalize_path(path), **dict(storage_options or {})
    )
    return fs, fs_path


def exists(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> bool:
    fs, p = filesystem(path, storage_options)
    return bool(fs.exists(p))


def remove(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> None:
    fs, p = filesystem(path, storage_options)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def size_on_disk(path: str | os.PathLike[str], storage_options: StorageOptions = None) -> int:
    fs, p = filesystem(path, storage_options)
    return int(fs.du(p, total=True)) if fs.exists(p) else 0


def check_writable(path: str | os.PathLike[str]) -> None:
    """Refuse, before any work, a local output whose nearest existing folder cannot be written.

    Remote locations are checked by their first write (object stores have no cheap, reliable test).
    """
    if is_remote(path):
        return
    from ..errors import StoreError

    target = normalize_path(path)
    folder = target if os.path.isdir(target) else os.path.dirname(target)
    while folder and not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if folder and not os.access(folder, os.W_OK | os.X_OK):
        why = "is on a read-only file system" if _read_only_fs(folder) else "is not writable by this user"
        raise StoreError(f"cannot write {target}: {folder} {why}; choose a writable location")


def _read_only_fs(folder: str) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ---- in-memory stores (path=None) ------------------------------------------------------------------
MEMORY_PREFIX = "memory://trackin-ooc/"


def new_memory_location(what: str = "store") -> str:
    """A fresh location in this process's memory (fsspec's ``memory://`` file system, read and written
    through zarr's ``FsspecStore``) for a store nobody needs on disk: a one-off query of a few examples.

    Every function that takes a path takes it, in this process (threads); worker processes of a
    distributed cluster do not see it.
    """
    import uuid

    return f"{MEMORY_PREFIX}{what}-{uuid.uuid4().hex}.zarr"


def is_memory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an in-memory location (``memory://``)."""
    return os.fspath(path).startswith("memory://")


def release_with(owner: object, path: str) -> None:
    """Free the in-memory store at ``path`` once ``owner`` (the object handed to the user) is garbage."""
    import weakref

    if is_memory(path):
        weakref.finalize(owner, remove, path)
