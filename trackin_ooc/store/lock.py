"""One writer per store: an OS lock that dies with its process, so a killed capture never leaves it stuck.

Local stores use ``fcntl.flock`` on a sibling file ``.<name>.lock`` (released by the kernel when the
holder exits, however it exits; removed on a clean release). Remote stores use a lock object next to
the store with a heartbeat refreshed by a background thread; a lock whose heartbeat is older than
``STALE_AFTER`` seconds is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from ..errors import StoreLockedError
from . import backends

STALE_AFTER = 120.0
HEARTBEAT = 20.0


def lock_path(path: str | os.PathLike[str]) -> str:
    p = backends.normalize_path(path)
    if backends.is_remote(path):
        return p + ".lock"
    parent, name = os.path.split(p)
    return os.path.join(parent, f".{name}.lock")


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}


class StoreLock:
    """Context manager holding the single-writer lock of a store."""

    def __init__(self, path: str | os.PathLike[str], storage_options: backends.StorageOptions = None) -> None:
        self.path = backends.normalize_path(path)
        self.remote = backends.is_remote(path)
        self.storage_options = storage_options
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner = _owner()

    def _refused(self, holder: str) -> StoreLockedError:
        return StoreLockedError(
            f"store {self.path} is being written by another process ({holder}); wait for it to finish, "
            "or stop it and rerun to resume"
        )

    def acquire(self) -> StoreLock:
        if self.remote:
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def _acquire_local(self) -> None:
        import fcntl

        lp = lock_path(self.path)
        os.makedirs(os.path.dirname(lp) or ".", exist_ok=True)
        for _ in range(10):
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown process"
                finally:
                    os.close(fd)
                raise self._refused(holder) from None
            try:
                same = os.stat(lp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder unlinked while we were opening it
                break
            os.close(fd)
        else:  # pragma: no cover - needs a pathological lock/unlock storm
            raise self._refused("processes racing for the lock")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {self._owner['pid']} on {self._owner['host']}".encode())
        self._fd = fd

    def _acquire_remote(self) -> None:
        fs, lp = backends.filesystem(lock_path(self.path), self.storage_options)
        if fs.exists(lp):
            try:
                held = json.loads(fs.cat_file(lp))
            except Exception:
                held = {}
            if time.time() - float(held.get("heartbeat", 0)) < STALE_AFTER:
                raise self._refused(f"pid {held.get('pid')} on {held.get('host')}")
        self._write_remote(fs, lp)
        time.sleep(0.05)
        if json.loads(fs.cat_file(lp)).get("token") != self._owner["token"]:
            raise self._refused("a process that took the lock at the same moment")
        self._thread = threading.Thread(target=self._beat, args=(fs, lp), daemon=True)
        self._thread.start()

    def _write_remote(self, fs: Any, lp: str) -> None:
        fs.pipe_file(lp, json.dumps({**self._owner, "heartbeat": time.time()}).encode())

    def _beat(self, fs: Any, lp: str) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                self._write_remote(fs, lp)
            except Exception:
                pass

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.unlink(lock_path(self.path))  # lockers check the inode after locking, so this is safe
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            fs, lp = backends.filesystem(lock_path(self.path), self.storage_options)
            try:
                fs.rm(lp)
            except Exception:
                pass

    def __enter__(self) -> StoreLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
