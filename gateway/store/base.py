"""What every part of the store shares: its state (one object, built by :class:`_StoreBase`),
the records it keeps per uplink (:class:`_Cursor`) and per lease (:class:`Lease`), the two
connections with the write-transaction helper, series interning and routing, and
:meth:`~_StoreBase.mark_corrupt`.

The mixins in this package (writer, cursors, maintenance, deadletters) each derive from
:class:`_StoreBase` and use only what is defined here and in their own module; the
:class:`~gateway.store.Store` facade composes them. Which lock guards what, and in which order
they are taken: the table in the package docstring (``gateway/store/__init__.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from gateway.configbase import StoreConfig
from gateway.errors import StoreError
from gateway.intervals import IntervalSet
from gateway.lockfile import StoreLock
from gateway.models import Reading, ReadingBatch, StoredReading
from gateway.routes import SeriesFilter
from gateway.store.salvage import Salvage

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class Lease:
    """Readings handed to one uplink worker. ``ranges`` are the id ranges this lease covers:
    when completed, every id in them not reported unfinished becomes done for the uplink."""

    uplink: str
    ranges: list[tuple[int, int]]
    items: list[StoredReading]
    #: Ids at which a range was cut short by the lease size: readings just past them (below a
    #: cut live range, above a cut backfill range) were not leased.
    cut_at: list[int] = field(default_factory=list)
    #: :meth:`Store.release_holds` calls before this lease was taken: a hold asked for on a lease
    #: older than the last release is not kept (its readings may already be repaired).
    hold_epoch: int = 0
    #: Ids already recorded by :meth:`Store.settle` (done before the lease completes).
    settled: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Cursor:
    name: str
    done: IntervalSet
    live_mark: int
    series_ids: set[int] = field(default_factory=set)
    leased: IntervalSet = field(default_factory=IntervalSet)
    leased_retry: set[int] = field(default_factory=set)
    delivered: int = 0
    rejected: int = 0
    evicted: int = 0
    backlog: int = 0
    retry_pending: int = 0
    dead_letters: int = 0
    oldest_pending_ts: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    #: Readings from this id on are held for the clock (not leased) until release_holds().
    hold_from: int | None = None
    #: The SQL condition selecting this uplink's series: ``series IN (...)``, or ``1`` when it
    #: is routed every series the store knows (a long IN list costs every query it is in).
    sql_series: str = "0"
    #: One lease at a time for this uplink (``lease``).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Bumped by every change to the counters below (stale stats reads are then not applied).
    version: int = 0
    #: Serialises read-modify-write of ``done`` (completions in parallel, eviction).
    done_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True)
class StoreEvent:
    at: float
    kind: str
    detail: str


class _StoreBase:
    """The store's state and the helpers every part uses. Not used alone: see ``Store``."""

    def __init__(self, cfg: StoreConfig, routes: Mapping[str, Iterable[str]]) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)
        self._reserve = Path(f"{self.path}.reserve")
        # Locks: what each guards, who takes it, in which order: gateway/store/__init__.py.
        #: The file against a second writing process (flock on <db>.lock).
        self._lock = StoreLock(self.path)
        # Per uplink, the series it takes: names and ``*`` patterns (gateway/routes.py).
        self._routes = {name: SeriesFilter(series) for name, series in routes.items()}
        self._w: aiosqlite.Connection | None = None
        self._r: aiosqlite.Connection | None = None
        #: The writer connection: one statement or transaction at a time (the innermost lock).
        self._wlock = asyncio.Lock()
        self._series: dict[str, int] = {}
        #: Series names by id (the list's index; ids are dense, from 1): a list, not a dict,
        #: costs 8 bytes a series instead of about 50.
        self._series_names: list[str | None] = [None]
        #: Per series id, the uplinks it is routed to (series routed alike share one tuple).
        self._uplinks_by_series: dict[int, tuple[_Cursor, ...]] = {}
        self._cursors: dict[str, _Cursor] = {}
        self._max_id = 0
        self._min_id = 1
        #: Readings queued for the next group commit, in id order: single readings, or a poll's
        #: batch as one entry (writer.py). ``_buffered`` counts readings, not entries.
        self._buffer: list[Reading | ReadingBatch] = []
        self._buffered = 0
        self._enqueued_rows = 0
        self._committed_rows = 0
        self._flush_wanted = False
        #: Held while batches move from ``_buffer`` into the file (writer.py).
        self._commit_lock = asyncio.Lock()
        #: One maintenance pass at a time (maintenance.py).
        self._maint_lock = asyncio.Lock()
        self._has_data = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._committed = asyncio.Condition()
        self._hold_epoch = 0
        self._closed = False
        self.readonly = False
        self.events: list[StoreEvent] = []
        #: Why the database is corrupt, when found while running (maintenance, a lease or a
        #: commit hit a malformed page): /health is 503 until a restart moves it aside.
        self.corrupt: str | None = None
        #: Readings the store could not keep (a value SQLite cannot bind), by reason.
        self.rejected_total = 0
        self.rejected_reasons: Counter[str] = Counter()
        self._rejected_series: set[str] = set()
        #: What the last move-aside could copy into the fresh database.
        self.salvaged: Salvage | None = None
        self.captured_total = 0
        self.evicted_total = 0
        self.commits_total = 0
        self.last_commit_at: float | None = None
        self.last_commit_error: str | None = None
        self._commit_started: float | None = None
        self.bytes_used = 0
        self._opened_at = time.monotonic()
        #: Per series id (the index, as ``_series_names``), when a commit last captured one of
        #: its readings (monotonic seconds). A series with none since the store opened counts
        #: from the opening: its newest window may still be filling when the process restarts
        #: (gateway/uplinks/downsample.py).
        self._captured_at: list[float] = [self._opened_at]

    @contextlib.asynccontextmanager
    async def _txn(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction. Cancellation at any await (even of BEGIN, which then still
        runs in aiosqlite's thread) rolls back before the lock is released."""
        async with self._wlock:
            w = self._write
            try:
                await w.execute("BEGIN IMMEDIATE")
                yield w
                await w.execute("COMMIT")
            except BaseException:
                await asyncio.shield(self._rollback(w))
                raise

    @staticmethod
    async def _rollback(w: aiosqlite.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):  # "no transaction is active" after a COMMIT
            await w.execute("ROLLBACK")

    @property
    def _write(self) -> aiosqlite.Connection:
        if self._w is None:
            raise StoreError("store is closed")
        return self._w

    @property
    def _read(self) -> aiosqlite.Connection:
        if self._r is None:
            raise StoreError("store is closed")
        return self._r

    # ------------------------------------------------------------------------------------------
    # Series and routing

    async def _intern(self, names: Iterable[str]) -> None:
        # Interned: the store keeps the very string the source made (and every later copy of
        # the name, from this file at the next start, is the same object), not one more copy.
        new = [sys.intern(n) for n in names if n not in self._series]
        if not new:
            return
        # One transaction for all new names: one fsync, not one per series (first start with
        # thousands of routed series on an SD card).
        async with self._txn() as w:
            await w.executemany(
                "INSERT OR IGNORE INTO series (name) VALUES (?)", [(n,) for n in new]
            )
            for i in range(0, len(new), 500):
                part = new[i : i + 500]
                marks = ",".join("?" * len(part))
                for sid, text in await w.execute_fetchall(
                    f"SELECT id, name FROM series WHERE name IN ({marks})", part
                ):
                    name = sys.intern(text)
                    self._series[name] = sid
                    self._name_series(sid, name)
        self._rebuild_routing()

    def _name_series(self, sid: int, name: str) -> None:
        names = self._series_names
        if sid >= len(names):
            names.extend([None] * (sid + 1 - len(names)))
            at = self._captured_at
            at.extend([self._opened_at] * (sid + 1 - len(at)))
        names[sid] = name

    def _rebuild_routing(self) -> None:
        by_series: dict[int, list[_Cursor]] = {}
        for name, routed in self._routes.items():
            c = self._cursors.get(name)
            if c is None:
                continue
            # A pattern takes a series when it is first interned (a source produced it).
            c.series_ids = routed.select(self._series)
            if c.series_ids and len(c.series_ids) == len(self._series):
                c.sql_series = "1"
            else:
                c.sql_series = "series IN (" + ",".join(map(str, sorted(c.series_ids))) + ")"
            for sid in c.series_ids:
                by_series.setdefault(sid, []).append(c)
        alike: dict[tuple[str, ...], tuple[_Cursor, ...]] = {}
        self._uplinks_by_series = {
            sid: alike.setdefault(tuple(c.name for c in cs), tuple(cs))
            for sid, cs in by_series.items()
        }

    def mark_corrupt(self, reason: str) -> None:
        """Record corruption found while running: shown by /health (503), /status and
        /metrics. Logged once. Recovery: restart the daemon; the next start finds the file
        unclean, moves it aside and salvages every row still readable (see
        :func:`~gateway.store.salvage._salvage`)."""
        if self.corrupt is not None:
            return
        self.corrupt = reason
        log.error(
            "store_corrupt",
            path=str(self.path),
            reason=reason,
            action="restart fieldgate: it moves the database aside and salvages what is readable",
        )
        self.events.append(StoreEvent(time.time(), "corrupt", reason))
