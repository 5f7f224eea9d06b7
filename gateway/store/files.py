"""The database file on disk: the pre-open check, moving a corrupt file aside, the disk reserve,
and classifying SQLite's errors into what a person (or systemd) should do about them.

Everything here is synchronous and touches only the file system or a short-lived ``sqlite3``
connection of its own; the store runs the slow parts in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import time
from pathlib import Path

import structlog

from gateway.errors import StoreError, StoreUnusable
from gateway.lockfile import why as _why
from gateway.store.schema import SCHEMA_VERSION

log = structlog.get_logger(__name__)

#: Disk space held in a file beside the database and given back when the disk is full: in WAL
#: mode deleting needs room in the WAL and checkpointing needs room in the database file, so
#: without it an eviction on a full disk fails just like the insert did. 8 MiB covers a WAL at
#: its autocheckpoint size (1000 pages) plus the eviction's own pages.
RESERVE_BYTES = 8 << 20


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)


def _make_reserve(path: Path, size: int) -> bool:
    """Hold ``size`` bytes of disk in ``path`` (allocated, not sparse); False without room.
    Any other failure (read-only disk, permissions) is raised as it came: its cause is what a
    person needs to read, not a second error from cleaning up."""
    try:
        with path.open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, size)
        return True
    except OSError as exc:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return False
        raise


def _release_reserve(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in str(exc)


def _preflight(path: Path) -> str | None:
    """Why the database at ``path`` must be moved aside (it is corrupt), or None. Runs in a
    thread at open.

    A file that is only locked, unreadable by permission or on a read-only disk raises
    :class:`StoreError` naming the cause instead: it is healthy, and moving it would orphan its
    backlog. A full integrity check runs only when the previous run did not shut down cleanly
    (a power cut or kill), which is when a torn file is possible; otherwise the header and
    schema are read.
    """
    if not path.exists():
        return None
    for p in (path, Path(f"{path}-wal")):
        if p.exists() and not os.access(p, os.R_OK | os.W_OK):
            raise StoreUnusable(_why(p, PermissionError(errno.EACCES, "permission denied")))
    with contextlib.suppress(OSError):
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            raise StoreUnusable(_why(path, OSError(errno.EROFS, "read-only file system")))
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from exc
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == 0 and tables:
            return "not a fieldgate database (unknown tables, no schema version)"
        if version > SCHEMA_VERSION:
            return f"schema version {version} is newer than this fieldgate ({SCHEMA_VERSION})"
        if version == 0:
            return None
        clean = conn.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone()
        if clean is None or not clean[0]:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
            if result != "ok":
                return f"integrity check failed: {result}"
        return None
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            return str(exc)
        raise _open_error(path, exc) from exc
    finally:
        conn.close()


def _open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    """Why a healthy file cannot be opened: :class:`StoreUnusable` (exit 73, no restart) when a
    person must act (held by another process, read-only, permissions), else a plain
    :class:`StoreError` (exit 1: an I/O error may pass, and systemd tries again)."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    fixable = code in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_AUTH,
    ) or any(word in text for word in ("locked", "readonly", "unable to open"))
    return (StoreUnusable if fixable else StoreError)(_db_why(path, exc))


def _db_why(path: Path, exc: sqlite3.Error) -> str:
    """SQLite's error as a sentence naming the file and what a person can do about it."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if code == sqlite3.SQLITE_BUSY or "locked" in text:
        hint = "another process holds the database (a second fieldgate, or a tool writing to it)"
    elif code == sqlite3.SQLITE_READONLY or "readonly" in text:
        hint = "the database or its directory is read-only"
    elif code == sqlite3.SQLITE_CANTOPEN or "unable to open" in text:
        hint = "cannot open it: check the directory's and the file's permissions"
    elif _is_disk_full(exc):
        hint = "the disk is full"
    else:
        hint = "unusable"
    return f"{path}: {hint} ({text}); the database was left where it is"


def _move_aside(path: Path, reason: str) -> Path:
    """Move the database at ``path`` and its ``-wal`` and ``-shm`` files aside with a timestamp;
    returns where the database went. Logged here; the caller records the event for /status."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                shutil.move(src, Path(f"{target}{suffix}"))
    except OSError as exc:
        raise StoreUnusable(
            f"{path} is corrupt ({reason}) and cannot be moved aside: {_why(target, exc)}"
        ) from exc
    log.error("store_moved_aside", path=str(path), moved_to=str(target), reason=reason)
    return target
