"""One store, one writer: an exclusive ``flock`` on ``<store>.lock`` held for the daemon's life.

The kernel drops the lock when the process dies (kill -9, power cut), so a stale file never
blocks a restart. The file holds the holder's pid so a refused second instance can name it.
Read-only tools (``fieldgate queue``, ``dead-letters``) never take it: SQLite's own locking
keeps their short transactions consistent beside the daemon.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from gateway.errors import StoreLocked, StoreUnusable


class StoreLock:
    """``acquire()`` or raise; ``release()`` is idempotent."""

    def __init__(self, store_path: Path) -> None:
        self.path = Path(f"{store_path}.lock")
        self.store_path = store_path
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StoreUnusable(why(self.path, exc)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise StoreLocked(str(self.store_path), holder) from exc
            raise StoreUnusable(why(self.path, exc)) from exc
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StoreUnusable(why(self.path, exc)) from exc
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def why(path: Path, exc: OSError) -> str:
    """A person's sentence for why ``path`` cannot be used, naming the cause."""
    cause = {
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOSPC: "the disk is full",
        errno.ENOENT: "the directory does not exist",
    }.get(exc.errno or 0, exc.strerror or str(exc))
    return f"{path}: {cause} ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
