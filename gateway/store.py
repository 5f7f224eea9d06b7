"""The SQLite store-and-forward queue: durable ingest, per-uplink delivery, dead letters, eviction.

Guarantees a caller may rely on:

* A reading is **captured** once the group commit holding it has committed (``await flush()``
  or ``await ingest(..., durable=True)`` wait for that). Commits are grouped by count or by
  ``commit_interval_ms`` so an SD card sees few, large writes.
* Each uplink has its own delivery position: an :class:`~gateway.intervals.IntervalSet` of ids
  that are done for it (delivered, dead-lettered, evicted, or of series not routed to it), plus
  the ids currently leased in memory. Readings are not copied per uplink. A lease that is never
  completed (crash, cancellation) leaves its readings pending: delivery is at least once.
* A reading is deleted once it is done for every configured uplink, or evicted: by quota
  (bytes of pages in use) or by retention age, oldest first, counted per uplink and logged.
* Dead letters keep the reading, the uplink, the service's reason and the time. ``replay``
  moves them to a per-uplink retry table that the uplink drains first (ids shown as negative).
* A database that cannot be opened or fails its integrity check after an unclean shutdown is
  moved aside with a timestamp and a fresh one started; the event is logged and kept in
  :attr:`Store.events` for /status.
* Clock repair (gateway/clock.py): :meth:`repair_unsynced` shifts the timestamps of readings
  stamped while the clock was unsynchronised, committed and still buffered alike, in one
  transaction with the clock's own state; an uplink may hold such readings (``complete(...,
  hold_from=)``) so that they are not leased again until :meth:`release_holds`.

Two aiosqlite connections: one writer (ingest, acks, eviction; transactions serialised by a
lock) and one reader (leases, stats), so in WAL mode leasing never waits for a big commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import math
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from gateway.configbase import StoreConfig
from gateway.errors import StoreCorrupt, StoreError, StoreUnusable
from gateway.intervals import IntervalSet
from gateway.lockfile import StoreLock
from gateway.lockfile import why as _why
from gateway.models import Position, Quality, Reading, StoredReading, Value
from gateway.routes import SeriesFilter

log = structlog.get_logger(__name__)

SCHEMA_VERSION = 1
#: Stored in ``flags`` above the public Quality bits: the value was a bool (SQLite has none).
_BOOL_FLAG = 1 << 30
#: The value was a non-finite float, stored as its text (SQLite would store NaN as NULL).
_NONFINITE_FLAG = 1 << 29
#: The value was an int outside SQLite's signed 64 bits (a uint64 counter at or above 2**63),
#: stored exactly as its decimal text.
_BIGINT_FLAG = 1 << 28
_QUALITY_MASK = _BIGINT_FLAG - 1
_I64_MIN = -(1 << 63)
_I64_MAX = (1 << 63) - 1
#: Gaps separated by at most this many blocked ids are leased with one query (see _spans).
_MERGE_BLOCKED = 1024
#: How many separate gaps one lease may visit before it settles for what it found.
_MAX_GAPS_PER_LEASE = 32
#: Rows deleted per eviction or prune statement, so no transaction grows unbounded.
_DELETE_CHUNK = 50_000
#: Disk space held in a file beside the database and given back when the disk is full: in WAL
#: mode deleting needs room in the WAL and checkpointing needs room in the database file, so
#: without it an eviction on a full disk fails just like the insert did. 8 MiB covers a WAL at
#: its autocheckpoint size (1000 pages) plus the eviction's own pages.
RESERVE_BYTES = 8 << 20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
-- ``value`` has no declared type on purpose: no affinity, so 3.0 stays REAL and '12' stays TEXT.
CREATE TABLE IF NOT EXISTS readings (
    id INTEGER PRIMARY KEY,
    series INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value,
    flags INTEGER NOT NULL DEFAULT 0,
    lat REAL, lon REAL, alt REAL
);
CREATE TABLE IF NOT EXISTS uplinks (
    name TEXT PRIMARY KEY,
    done TEXT NOT NULL,
    live_mark INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0,
    evicted INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    uplink TEXT NOT NULL,
    series TEXT NOT NULL,
    ts INTEGER NOT NULL,
    value,
    flags INTEGER NOT NULL DEFAULT 0,
    lat REAL, lon REAL, alt REAL,
    reason TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_uplink ON dead_letters(uplink, id);
CREATE TABLE IF NOT EXISTS retry (
    id INTEGER PRIMARY KEY,
    uplink TEXT NOT NULL,
    series TEXT NOT NULL,
    ts INTEGER NOT NULL,
    value,
    flags INTEGER NOT NULL DEFAULT 0,
    lat REAL, lon REAL, alt REAL
);
CREATE INDEX IF NOT EXISTS retry_uplink ON retry(uplink, id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value
);
"""

#: Readings still flagged CLOCK_UNSYNCED are few and short-lived; the partial index makes counting
#: and repairing them cheap without a table scan. (Created at open, so older files get it too.)
_UNSYNCED_INDEX = (
    "CREATE INDEX IF NOT EXISTS readings_unsynced ON readings(id) WHERE (flags & 1) != 0"
)

# OR IGNORE: ids are ours and never reused, so a batch whose COMMIT went through while the awaiting
# task was cancelled (still in the buffer) is committed again as a no-op, not a duplicate-id error.
_INSERT = (
    "INSERT OR IGNORE INTO readings (id, series, ts, value, flags, lat, lon, alt) "
    "VALUES (?,?,?,?,?,?,?,?)"
)
_INSERT_DEAD = (
    "INSERT INTO dead_letters (uplink, series, ts, value, flags, lat, lon, alt, reason, at) "
    "VALUES (?,?,?,?,?,?,?,?,?,?)"
)
_INSERT_PLAIN = "INSERT OR IGNORE INTO readings (id, series, ts, value) VALUES (?,?,?,?)"


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


def _to_row(rid: int, sid: int, r: Reading) -> tuple[Any, ...]:
    v: Value = r.value
    flags = r.quality & _QUALITY_MASK
    if isinstance(v, bool):
        flags |= _BOOL_FLAG
        v = int(v)
    elif isinstance(v, float) and not math.isfinite(v):
        flags |= _NONFINITE_FLAG
        v = repr(v)
    elif isinstance(v, int) and not _I64_MIN <= v <= _I64_MAX:
        flags |= _BIGINT_FLAG
        v = str(v)
    p = r.position
    if p is None:
        return (rid, sid, r.ts, v, flags, None, None, None)
    return (rid, sid, r.ts, v, flags, p.lat, p.lon, p.alt)


def _value(value: Any, flags: int) -> Value:
    """A stored value back as the reading had it (see the flags above)."""
    if flags & _BOOL_FLAG:
        return bool(value)
    if flags & _NONFINITE_FLAG:
        return float(value)
    if flags & _BIGINT_FLAG:
        return int(value)
    return value  # type: ignore[no-any-return]


def _from_row(rid: int, series: str, row: Sequence[Any]) -> StoredReading:
    ts, value, flags, lat, lon, alt = row
    value = _value(value, flags)
    pos = Position(lat, lon, alt) if lat is not None and lon is not None else None
    return StoredReading(rid, series, ts, value, pos, flags & _QUALITY_MASK)


class Store:
    """The queue. Build with :meth:`open`; run :meth:`run` as a task; close with :meth:`aclose`."""

    def __init__(self, cfg: StoreConfig, routes: Mapping[str, Iterable[str]]) -> None:
        self.cfg = cfg
        self.path = Path(cfg.path)
        self._reserve = Path(f"{self.path}.reserve")
        self._lock = StoreLock(self.path)
        # Per uplink, the series it takes: names and ``*`` patterns (gateway/routes.py).
        self._routes = {name: SeriesFilter(series) for name, series in routes.items()}
        self._w: aiosqlite.Connection | None = None
        self._r: aiosqlite.Connection | None = None
        self._wlock = asyncio.Lock()
        self._series: dict[str, int] = {}
        self._series_names: dict[int, str] = {}
        self._uplinks_by_series: dict[int, list[_Cursor]] = {}
        self._cursors: dict[str, _Cursor] = {}
        self._max_id = 0
        self._min_id = 1
        self._buffer: list[Reading] = []
        self._enqueued_rows = 0
        self._committed_rows = 0
        self._flush_wanted = False
        self._commit_lock = asyncio.Lock()
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
        #: Per series id, when a commit last captured one of its readings (monotonic seconds).
        #: A series with none since the store opened counts from the opening: its newest window
        #: may still be filling when the process restarts (gateway/uplinks/downsample.py).
        self._captured_at: dict[int, float] = {}
        self._opened_at = time.monotonic()

    # ------------------------------------------------------------------------------------------
    # Opening and closing

    @classmethod
    async def open(
        cls, cfg: StoreConfig, routes: Mapping[str, Iterable[str]], *, readonly: bool = False
    ) -> Store:
        """Open (or create) the database. Unusable files are moved aside unless ``readonly``.

        ``readonly`` is for tools working beside a running daemon (``fieldgate queue``,
        ``dead-letters``): no integrity check or moving aside, no maintenance, no ingest, and the
        clean-shutdown mark is never touched; explicit operations such as
        :meth:`replay_dead_letters` still write, in their own transactions."""
        store = cls(cfg, routes)
        store.readonly = readonly
        await store._open()
        return store

    async def _open(self) -> None:
        if not self.readonly:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnusable(_why(self.path.parent, exc)) from exc
            # One store, one writer: a second daemon on this file stops here, before touching it.
            self._lock.acquire()
        try:
            await self._open_locked()
        except BaseException:
            self._lock.release()
            raise

    async def _open_locked(self) -> None:
        if not self.readonly:
            # Raises StoreError (not a move) when the file is only locked, unreadable by
            # permission or on a read-only disk: only corruption moves a database aside.
            problem = await asyncio.to_thread(_preflight, self.path)
            if problem is not None:
                await self._move_aside_and_salvage(problem)
        try:
            await self._connect()
            await self._load()
        except sqlite3.DatabaseError as exc:
            await self._disconnect()
            if not _is_corruption(exc):
                if self.readonly or not _is_disk_full(exc):
                    raise _open_error(self.path, exc) from exc
                # A full disk (or an I/O error) is not a broken file: never move the backlog
                # aside for it. Give back the reserve and try once more, else fail loudly.
                await asyncio.to_thread(_release_reserve, self._reserve)
                try:
                    await self._connect()
                    await self._load()
                except sqlite3.DatabaseError as again:
                    await self._disconnect()
                    raise StoreError(_db_why(self.path, again)) from again
            elif self.readonly:
                raise StoreCorrupt(f"{self.path}: {exc}") from exc
            else:
                await self._move_aside_and_salvage(str(exc))
                await self._connect()
                await self._load()
        if not self.readonly:
            try:
                await asyncio.to_thread(_make_reserve, self._reserve, RESERVE_BYTES)
            except OSError as exc:
                await self._disconnect()
                raise StoreUnusable(_why(self._reserve, exc)) from exc

    async def _connect(self) -> None:
        self._w = await aiosqlite.connect(self.path, isolation_level=None)
        w = self._w
        await w.execute("PRAGMA busy_timeout = 10000")
        if not self.readonly:
            await w.execute("PRAGMA journal_mode = WAL")
            await w.execute(f"PRAGMA synchronous = {self.cfg.synchronous.upper()}")
            version = await _scalar(w, "PRAGMA user_version")
            if version == 0:
                await w.executescript(_SCHEMA)
                await w.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            await w.execute(_UNSYNCED_INDEX)
            await w.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', 0)")
        self._r = await aiosqlite.connect(self.path, isolation_level=None)
        await self._r.execute("PRAGMA busy_timeout = 10000")
        await self._r.execute("PRAGMA query_only = 1")

    def _move_aside(self, reason: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    shutil.move(src, Path(f"{target}{suffix}"))
        except OSError as exc:
            raise StoreUnusable(
                f"{self.path} is corrupt ({reason}) and cannot be moved aside: "
                f"{_why(target, exc)}"
            ) from exc
        log.error("store_moved_aside", path=str(self.path), moved_to=str(target), reason=reason)
        self.events.append(StoreEvent(time.time(), "moved_aside", f"{target}: {reason}"))
        return target

    async def _move_aside_and_salvage(self, reason: str) -> None:
        aside = self._move_aside(reason)
        got = await asyncio.to_thread(_salvage, aside, self.path, list(self._routes))
        log.error("store_salvaged", moved_to=str(aside), readings=got.readings,
                  unreadable_ids=got.lost_count, rows=got.rows, notes=got.notes)
        self.events.append(StoreEvent(time.time(), "salvaged", f"{aside}: {got.summary()}"))
        self.salvaged = got

    async def _load(self) -> None:
        r = self._read
        async with r.execute("SELECT id, name FROM series") as cur:
            async for sid, name in cur:
                self._series[name] = sid
                self._series_names[sid] = name
        self._max_id = await _scalar(r, "SELECT coalesce(max(id), 0) FROM readings") or 0
        self._min_id = await _scalar(r, "SELECT coalesce(min(id), 1) FROM readings") or 1
        known: dict[str, tuple[Any, ...]] = {}
        async with r.execute(
            "SELECT name, done, live_mark, delivered, rejected, evicted, state FROM uplinks"
        ) as cur:
            async for row in cur:
                known[row[0]] = tuple(row)
        # Ids are never reused: once everything was delivered and pruned the table is empty,
        # but every id an uplink has marked done was handed out already.
        for saved in known.values():
            done = IntervalSet.from_json(saved[1])
            top = max((hi for _, hi in done), default=0)
            self._max_id = max(self._max_id, top, saved[2])
        self._min_id = max(self._min_id, 1)
        for name in self._routes:
            if name in known:
                _, done, live, dl, rj, ev, state = known[name]
                c = _Cursor(
                    name,
                    IntervalSet.from_json(done),
                    live,
                    delivered=dl,
                    rejected=rj,
                    evicted=ev,
                    state=json.loads(state),
                )
            else:
                # A new uplink starts with what arrives from now on, not the stored history.
                c = _Cursor(name, IntervalSet([(0, self._max_id)]), self._max_id)
                if not self.readonly:
                    await self._save_cursor(c)
            self._cursors[name] = c
        if not self.readonly:
            await self._intern(sorted({s for f in self._routes.values() for s in f.names}))
        self._rebuild_routing()
        for c in self._cursors.values():
            c.backlog = await self._count_backlog(c)
        await self.refresh_stats()

    async def aclose(self) -> None:
        """Commit what is buffered, mark a clean shutdown, close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self.readonly and self._w is not None:
                while self._buffer:
                    await self._commit_buffer()
                if self.corrupt is None:  # a corrupt file must get its check at the next start
                    async with self._wlock:
                        await self._w.execute("UPDATE meta SET value = 1 WHERE key = 'clean'")
        finally:
            await self._disconnect()
            self._lock.release()

    async def abandon(self) -> None:
        """Close without committing or marking a clean shutdown, as a power cut would leave
        the file (tests and the soak harness)."""
        self._closed = True
        await self._disconnect()
        self._lock.release()

    async def _disconnect(self) -> None:
        for conn in (self._w, self._r):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._w = self._r = None

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
        new = [n for n in names if n not in self._series]
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
                for sid, name in await w.execute_fetchall(
                    f"SELECT id, name FROM series WHERE name IN ({marks})", part
                ):
                    self._series[name] = sid
                    self._series_names[sid] = name
        self._rebuild_routing()

    def _rebuild_routing(self) -> None:
        self._uplinks_by_series = {}
        for name, routed in self._routes.items():
            c = self._cursors.get(name)
            if c is None:
                continue
            # A pattern takes a series when it is first interned (a source produced it).
            c.series_ids = routed.select(self._series)
            if c.series_ids and len(c.series_ids) == len(self._series_names):
                c.sql_series = "1"
            else:
                c.sql_series = "series IN (" + ",".join(map(str, sorted(c.series_ids))) + ")"
            for sid in c.series_ids:
                self._uplinks_by_series.setdefault(sid, []).append(c)

    # ------------------------------------------------------------------------------------------
    # Ingest

    async def ingest(
        self,
        readings: Sequence[Reading],
        *,
        durable: bool = False,
        prompt: bool = False,
        prepare: Callable[[Sequence[Reading]], Sequence[Reading]] | None = None,
    ) -> None:
        """Queue readings for the next group commit.

        Waits only while the in-memory buffer is full (back-pressure). With ``durable`` it also
        waits until the commit holding them is done, i.e. until they are captured. With
        ``prompt`` the writer commits them now instead of waiting out ``commit_interval_ms`` for
        more (a serial line logger never resends: its lines should not sit in memory), without
        the caller waiting for that commit. ``prepare``
        (the clock's stamp) runs after that wait and right before the readings join the queue,
        with no await in between: what it sees of :meth:`next_id` is the id they will get.
        """
        if self.readonly:
            raise StoreError("store opened read-only")
        while len(self._buffer) >= self.cfg.buffer_max_rows:
            self._room.clear()
            await self._room.wait()
        if prepare is not None:
            readings = prepare(readings)
        self._buffer.extend(readings)
        self._enqueued_rows += len(readings)
        if prompt:
            self._flush_wanted = True
        self._has_data.set()
        if durable:
            await self.flush()

    def next_id(self) -> int:
        """The id the next reading handed to :meth:`ingest` will be committed under.

        Buffered readings are committed in order right after ``_max_id`` (a failed commit keeps
        them buffered, in order), so this holds across commits.
        """
        return self._max_id + len(self._buffer) + 1

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (needs :meth:`run` running)."""
        target = self._enqueued_rows
        if self._committed_rows >= target:
            return
        self._flush_wanted = True
        self._has_data.set()
        async with self._committed:
            await self._committed.wait_for(lambda: self._committed_rows >= target)

    async def run(self) -> None:
        """The group-commit loop and periodic maintenance. Runs until cancelled."""
        interval = self.cfg.commit_interval_ms / 1000
        next_maint = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_maint - time.monotonic())):
                    await self._has_data.wait()
            if self._buffer:
                # Group: wait for more unless the batch is already big or a flush is waiting.
                if len(self._buffer) < self.cfg.commit_max_rows and not self._flush_wanted:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(interval):
                            while len(self._buffer) < self.cfg.commit_max_rows:
                                self._has_data.clear()
                                await self._has_data.wait()
                                if self._flush_wanted:
                                    break
                try:
                    await self._commit_buffer()
                except StoreCorrupt:
                    raise
                except (sqlite3.Error, OSError) as exc:
                    self.last_commit_error = f"{type(exc).__name__}: {exc}"
                    log.error(
                        "store_commit_failed",
                        error=self.last_commit_error,
                        buffered=len(self._buffer),
                    )
                    if _is_disk_full(exc):
                        await self._evict_for_space()
                    await asyncio.sleep(1.0)
            else:
                self._has_data.clear()
            if time.monotonic() >= next_maint:
                pause = 2.0
                try:
                    await self.maintain()
                except StoreCorrupt:
                    raise
                except sqlite3.DatabaseError as exc:
                    if not _is_corruption(exc):
                        # A full disk fails the prune too: the writer stays up and tries again.
                        log.error("store_maintenance_failed", error=f"{type(exc).__name__}: {exc}")
                    else:
                        self.mark_corrupt(f"maintenance: {exc}")
                        pause = 60.0  # commits go on; the prune only fails again
                except (sqlite3.Error, OSError) as exc:
                    log.error("store_maintenance_failed", error=f"{type(exc).__name__}: {exc}")
                next_maint = time.monotonic() + pause

    def mark_corrupt(self, reason: str) -> None:
        """Record corruption found while running: shown by /health (503), /status and
        /metrics. Logged once. Recovery: restart the daemon; the next start finds the file
        unclean, moves it aside and salvages every row still readable (see :func:`_salvage`)."""
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

    async def _commit_buffer(self) -> None:
        """Commit what is buffered now. Readings arriving meanwhile wait for the writer's next
        turn, so a steady stream cannot keep it from its maintenance."""
        async with self._commit_lock:
            pending = len(self._buffer)
            while pending > 0 and self._buffer:
                n = min(pending, self.cfg.commit_max_rows)
                await self._commit_batch(self._buffer[:n])
                pending -= n
            if not self._buffer:
                self._flush_wanted = False

    async def _commit_batch(self, batch: list[Reading]) -> None:
        series = self._series
        try:
            sids = [series[r.series] for r in batch]
        except KeyError:  # a series seen for the first time: interned, then looked up again
            await self._intern({r.series for r in batch if _encodable(r.series)})
            sids = [series.get(r.series, 0) for r in batch]
        first = self._max_id + 1
        rows, bad = self._rows(first, sids, batch)
        self._commit_started = time.monotonic()
        try:
            try:
                await self._insert(rows)
            except _BIND_ERRORS as exc:
                if not _is_bind_error(exc):
                    raise
                # One reading SQLite cannot take must not cost the batch (nor kill the writer
                # and, under Restart=on-failure, the daemon forever): find it, keep the rest.
                rows, more = await self._insert_one_by_one(rows)
                bad.extend(more)
        except sqlite3.DatabaseError as exc:
            if _is_corruption(exc):
                self.mark_corrupt(f"commit: {exc}")
                raise StoreCorrupt(f"{self.path}: {exc}") from exc
            raise
        finally:
            self._commit_started = None
        # Committed: these readings are captured.
        del self._buffer[: len(batch)]
        self._max_id = first + len(batch) - 1
        for i, reason in bad:
            self._reject(batch[i - first], reason)
        self.captured_total += len(rows)
        self.commits_total += 1
        self.last_commit_at = time.time()
        self.last_commit_error = None
        now = time.monotonic()
        captured_at = self._captured_at
        for sid, n in Counter(row[1] for row in rows).items():
            captured_at[sid] = now
            for c in self._uplinks_by_series.get(sid, ()):
                c.backlog += n
        if len(self._buffer) < self.cfg.buffer_max_rows:
            self._room.set()
        async with self._committed:
            self._committed_rows += len(batch)
            self._committed.notify_all()

    @staticmethod
    def _rows(
        first: int, sids: Sequence[int], batch: Sequence[Reading]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]]:
        """Rows to insert, and ``(id, reason)`` of readings that cannot be stored."""
        # Ints within 64 bits, finite floats and strings with no quality flags and no position
        # (nearly every reading) are stored as they are, binding four columns (flags and
        # position take their defaults); the rest go through _to_row. One comprehension: the
        # hot path of every commit. A reading it cannot take sends the batch the slow way.
        if 0 not in sids:
            try:
                return [
                    (first + i, sid, r.ts, r.value)
                    if not r.quality and r.position is None and (
                        ((t := type(r.value)) is int and _I64_MIN <= r.value <= _I64_MAX)  # type: ignore[operator]
                        or t is str
                        or (t is float and math.isfinite(r.value))  # type: ignore[arg-type]
                    )
                    else _to_row(first + i, sid, r)
                    for i, (sid, r) in enumerate(zip(sids, batch, strict=True))
                ], []
            except _ROW_ERRORS:
                pass
        rows: list[tuple[Any, ...]] = []
        bad: list[tuple[int, str]] = []
        for i, (sid, r) in enumerate(zip(sids, batch, strict=True)):
            if sid == 0:
                bad.append((first + i, "series name is not valid text"))
                continue
            try:
                rows.append(_to_row(first + i, sid, r))
            except _ROW_ERRORS as exc:
                bad.append((first + i, f"cannot be stored: {type(exc).__name__}: {exc}"))
        return rows, bad

    async def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert ``rows`` in one transaction. Every row must land: a row that was already
        there is accepted only as this writer's own earlier commit (a COMMIT that went through
        while its caller was cancelled); anything else is an id collision and fails loudly."""
        full = [row for row in rows if len(row) != 4]
        plain = [row for row in rows if len(row) == 4] if full else rows
        async with self._txn() as w:
            inserted = 0
            if full:
                inserted += (await w.executemany(_INSERT, full)).rowcount
            inserted += (await w.executemany(_INSERT_PLAIN, plain)).rowcount
            if inserted != len(rows):
                await self._check_recommit(w, rows)

    async def _check_recommit(self, w: aiosqlite.Connection, rows: list[tuple[Any, ...]]) -> None:
        lo, hi = rows[0][0], rows[-1][0]
        have = {
            rid: (sid, ts)
            for rid, sid, ts in await w.execute_fetchall(
                "SELECT id, series, ts FROM readings WHERE id BETWEEN ? AND ?", (lo, hi)
            )
        }
        clash = [row[0] for row in rows if have.get(row[0]) != (row[1], row[2])]
        if clash:
            raise StoreError(
                f"{self.path}: reading ids {clash[0]}..{clash[-1]} ({len(clash)}) already hold "
                "other readings: something else writes to this store; nothing was committed"
            )

    async def _insert_one_by_one(
        self, rows: list[tuple[Any, ...]]
    ) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]]]:
        """The slow path after a batch failed to bind: each row alone, in one transaction."""
        kept: list[tuple[Any, ...]] = []
        bad: list[tuple[int, str]] = []
        async with self._txn() as w:
            for row in rows:
                try:
                    await w.execute(_INSERT if len(row) != 4 else _INSERT_PLAIN, row)
                except _BIND_ERRORS as exc:
                    if not _is_bind_error(exc):
                        raise
                    bad.append((row[0], f"cannot be stored: {type(exc).__name__}: {exc}"))
                else:
                    kept.append(row)
        return kept, bad

    def _reject(self, r: Reading, reason: str) -> None:
        """Count a reading the store cannot keep, with its reason (status, metrics, log)."""
        self.rejected_total += 1
        self.rejected_reasons[reason.split(":", 1)[0]] += 1
        first = r.series not in self._rejected_series
        if first:
            self._rejected_series.add(r.series)
            log.error(
                "reading_rejected",
                series=r.series,
                ts=r.ts,
                value=repr(r.value)[:80],
                reason=reason,
                note="logged once per series; counted in status",
            )
            self.events.append(
                StoreEvent(time.time(), "rejected", f"{r.series!r} @ {r.ts}: {reason}")
            )
            del self.events[:-50]

    def quiet_s(self, series: str) -> float:
        """Seconds since a reading of ``series`` was last captured (since the store opened when
        none was). Capture time, not the readings' own timestamps: a logger replaying its memory
        is not quiet however old its data."""
        sid = self._series.get(series)
        at = self._captured_at.get(sid, self._opened_at) if sid is not None else self._opened_at
        return time.monotonic() - at

    def healthy(self) -> str | None:
        """Why the store is unhealthy (corrupt, or not taking commits), or None."""
        if self.corrupt is not None:
            return f"store corrupt: {self.corrupt}"
        if not self.writable():
            return f"store not writable: {self.last_commit_error}"
        return None

    def writable(self, stall_s: float = 30.0) -> bool:
        """False when the last commit failed or one has been running for ``stall_s``."""
        if self.last_commit_error is not None:
            return False
        started = self._commit_started
        return started is None or time.monotonic() - started < stall_s

    async def wait_for_data(self, timeout: float) -> None:
        """Return after the next commit, or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout), self._committed:
                await self._committed.wait()

    # ------------------------------------------------------------------------------------------
    # Leasing and completion

    async def lease(self, uplink: str, max_items: int, *, live_first: bool = True) -> Lease | None:
        """Up to ``max_items`` pending readings for ``uplink``, or None when nothing is pending.

        Order: replayed dead letters first; then, with ``live_first``, the newest readings that
        arrived since the last lease (newest first); then the oldest pending readings. A lease
        may come back with ranges but no items (only other uplinks' series were there): complete
        it to move past them.
        """
        c = self._cursors[uplink]
        async with c.lock:
            try:
                return await self._lease(c, max_items, live_first)
            except sqlite3.DatabaseError as exc:
                if _is_corruption(exc):
                    self.mark_corrupt(f"lease for {uplink}: {exc}")
                raise

    async def _lease(self, c: _Cursor, max_items: int, live_first: bool) -> Lease | None:
        items: list[StoredReading] = []
        ranges: list[tuple[int, int]] = []
        cut_at: list[int] = []
        if c.retry_pending:
            items.extend(await self._lease_retry(c, max_items))
        # Never past what this connection can see: a lease's ranges become done, so they must
        # not reach rows committed after the snapshot its SELECTs read (the reader connection
        # is shared; its snapshot can be older than the writer's last commit).
        top = min(self._max_id, await self._visible_max())
        blocked = c.done.union(c.leased)
        # Ranges this lease may cover: never another lease's, never readings held for the clock.
        untouchable = c.leased.copy()
        if c.hold_from is not None and c.hold_from <= top:
            blocked.add(c.hold_from, top)  # held for the clock: not leased until released
            untouchable.add(c.hold_from, top)
        room = max_items - len(items)
        if live_first and room > 0 and top > c.live_mark:
            gaps = list(blocked.gaps(c.live_mark + 1, top))
            if gaps:
                lo, hi = gaps[-1]
                got = await self._select(c, lo, hi, room, newest=True)
                covered_lo = got[-1].id if len(got) == room else lo
                if len(got) == room:
                    cut_at.append(covered_lo)
                got.reverse()
                items.extend(got)
                ranges.append((covered_lo, hi))
                blocked.add(covered_lo, hi)
                c.live_mark = top
                room -= len(got)
        if room > 0:
            # Gaps a short blocked stretch apart are read as one span and the blocked ids dropped
            # here: readings left pending one by one (held windows, retries) make many one-id
            # gaps, and one query per gap would end the lease long before the data behind them.
            spans = _spans(blocked.gaps(self._min_id, top), _MERGE_BLOCKED)
            for n, (lo, hi, skipped) in enumerate(spans):
                if room <= 0:
                    break
                if n >= _MAX_GAPS_PER_LEASE:
                    if items:
                        cut_at.append(items[-1].id)  # stopped short: later readings not seen
                    break
                rows = await self._select(c, lo, hi, room + skipped, newest=False)
                got = [r for r in rows if r.id not in blocked][:room]
                items.extend(got)
                full = len(got) == room
                end = got[-1].id if full else hi
                covered = IntervalSet([(lo, end)])
                for a, b in untouchable:
                    covered.remove(a, b)
                ranges.extend(covered)
                if full:
                    cut_at.append(end)
                room -= len(got)
        if not items and not ranges:
            return None
        for lo, hi in ranges:
            c.leased.add(lo, hi)
        c.leased_retry.update(i.id for i in items if i.id < 0)
        return Lease(c.name, ranges, items, cut_at, self._hold_epoch)

    async def _select(
        self, c: _Cursor, lo: int, hi: int, limit: int, *, newest: bool
    ) -> list[StoredReading]:
        if not c.series_ids:
            return []
        order = "DESC" if newest else "ASC"
        sql = (
            f"SELECT id, series, ts, value, flags, lat, lon, alt FROM readings "
            f"WHERE id BETWEEN ? AND ? AND {c.sql_series} ORDER BY id {order} LIMIT ?"
        )
        names = self._series_names
        rows = await self._read.execute_fetchall(sql, (lo, hi, limit))
        # The hot path of every lease: plain readings (no flags, no position) skip _from_row.
        make = StoredReading
        return [
            make(row[0], names[row[1]], row[2], row[3])
            if not row[4] and row[5] is None
            else _from_row(row[0], names[row[1]], row[2:])
            for row in rows
        ]

    async def _visible_max(self) -> int:
        rows = list(await self._read.execute_fetchall("SELECT max(id) FROM readings"))
        return int(rows[0][0] or 0) if rows else 0

    async def _lease_retry(self, c: _Cursor, limit: int) -> list[StoredReading]:
        taken = ",".join(str(-i) for i in c.leased_retry) or "0"
        rows = await self._read.execute_fetchall(
            f"SELECT id, series, ts, value, flags, lat, lon, alt FROM retry "
            f"WHERE uplink = ? AND id NOT IN ({taken}) ORDER BY id LIMIT ?",
            (c.name, limit),
        )
        return [_from_row(-row[0], row[1], row[2:]) for row in rows]

    async def complete(
        self,
        lease: Lease,
        delivered: Iterable[int],
        rejected: Mapping[int, str],
        unfinished: Iterable[int] = (),
        *,
        hold_from: int | None = None,
    ) -> None:
        """Record the outcome of a lease in one transaction.

        ``delivered`` and ``rejected`` (id -> the service's reason; dead-lettered) are done;
        ``unfinished`` stay pending. Everything else in the lease's ranges becomes done, except
        that with ``hold_from`` nothing from that id on does (the caller delivers and rejects
        none of those): they stay pending and are not leased again until :meth:`release_holds`
        (unless a release came after this lease was taken: then they are leased again at once).
        Holding a whole tail, not single ids, keeps the done set one interval per gap.
        """
        c = self._cursors[lease.uplink]
        settled = lease.settled
        if settled:
            delivered = [i for i in delivered if i not in settled]
            rejected = {i: r for i, r in rejected.items() if i not in settled}
            unfinished = set(unfinished) - settled
        delivered = list(delivered)
        keep = sorted(set(unfinished))
        dead = self._dead_rows(c, lease, rejected)
        # Replayed dead letters (negative ids) lead a lease when it has any: the common lease
        # has none, and then no id needs looking at here.
        has_retry = bool(lease.items) and lease.items[0].id < 0
        async with c.done_lock:
            retry_done = [(-i,) for i in [*delivered, *rejected] if i < 0] if has_retry else []
            new_done = c.done.copy()
            for lo, whole_hi in lease.ranges:
                hi = whole_hi if hold_from is None else min(whole_hi, hold_from - 1)
                if hi < lo:
                    continue
                cur = lo
                for k in keep:
                    if lo <= k <= hi:
                        new_done.add(cur, k - 1)
                        cur = k + 1
                new_done.add(cur, hi)
            await self._record_outcome(c, new_done, dead=dead, retry_done=retry_done,
                                       delivered=len(delivered), rejected=len(rejected))
        if hold_from is not None and lease.hold_epoch == self._hold_epoch:
            c.hold_from = hold_from if c.hold_from is None else min(c.hold_from, hold_from)
        for lo, hi in lease.ranges:
            c.leased.remove(lo, hi)
        c.leased_retry.difference_update(i.id for i in lease.items if i.id < 0)

    def _dead_rows(
        self, c: _Cursor, lease: Lease, rejected: Mapping[int, str]
    ) -> list[tuple[Any, ...]]:
        if not rejected:
            return []
        now_ms = int(time.time() * 1000)
        by_id = {i.id: i for i in lease.items}
        return [
            (c.name, by_id[i].series, *(_to_row(0, 0, _as_reading(by_id[i]))[2:]), reason, now_ms)
            for i, reason in rejected.items()
        ]

    async def settle(
        self, lease: Lease, delivered: Iterable[int], rejected: Mapping[int, str]
    ) -> None:
        """Record part of a lease's outcome now, in one transaction, before the rest is known
        (a plugin whose send has a fast part and a slow one: gateway/uplinks/base.py
        ``SettlesEarly``). These ids become done (``rejected`` ones dead-lettered) at once; the
        lease stays leased, and :meth:`complete` later skips them."""
        c = self._cursors[lease.uplink]
        delivered = [i for i in delivered if i not in lease.settled]
        rejected = {i: r for i, r in rejected.items() if i not in lease.settled}
        ids = [*delivered, *rejected]
        if not ids:
            return
        dead = self._dead_rows(c, lease, rejected)
        retry_done = [(-i,) for i in ids if i < 0]
        async with c.done_lock:
            new_done = c.done.copy()
            for i in ids:
                if i > 0:
                    new_done.add(i, i)
            await self._record_outcome(c, new_done, dead=dead, retry_done=retry_done,
                                       delivered=len(delivered), rejected=len(rejected))
        lease.settled.update(ids)

    async def _record_outcome(
        self,
        c: _Cursor,
        new_done: IntervalSet,
        *,
        dead: list[tuple[Any, ...]],
        retry_done: list[tuple[int]],
        delivered: int,
        rejected: int,
    ) -> None:
        """One transaction: dead letters written, replayed rows that are done removed, the
        uplink's done set and counters saved; then the same in memory. Holds ``c.done_lock``
        (the caller's)."""
        async with self._txn() as w:
            if dead:
                await w.executemany(_INSERT_DEAD, dead)
            if retry_done:
                await w.executemany("DELETE FROM retry WHERE id = ?", retry_done)
            await w.execute(
                "UPDATE uplinks SET done = ?, live_mark = ?, delivered = delivered + ?, "
                "rejected = rejected + ? WHERE name = ?",
                (new_done.to_json(), c.live_mark, delivered, rejected, c.name),
            )
        c.done = new_done
        c.version += 1
        c.delivered += delivered
        c.rejected += rejected
        c.dead_letters += rejected
        c.backlog = max(0, c.backlog - (delivered + rejected - len(retry_done)))
        c.retry_pending = max(0, c.retry_pending - len(retry_done))

    def release(self, lease: Lease) -> None:
        """Give a lease back untouched (its readings stay pending)."""
        c = self._cursors[lease.uplink]
        for lo, hi in lease.ranges:
            c.leased.remove(lo, hi)
        c.leased_retry.difference_update(i.id for i in lease.items if i.id < 0)

    # ------------------------------------------------------------------------------------------
    # Clock repair (gateway/clock.py)

    def held_from(self, uplink: str) -> int | None:
        """The id from which ``uplink`` holds readings for the clock, or None."""
        return self._cursors[uplink].hold_from

    async def release_holds(self) -> None:
        """Make every held reading leasable again and wake the uplinks waiting for data."""
        self._hold_epoch += 1
        for c in self._cursors.values():
            c.hold_from = None
        async with self._committed:
            self._committed.notify_all()

    async def repair_unsynced(
        self, first_id: int, upto: int, delta_ms: int, meta: tuple[str, Any] | None = None
    ) -> int:
        """Add ``delta_ms`` to the timestamp of every reading with ``first_id <= id <= upto``
        flagged CLOCK_UNSYNCED, committed or still buffered, and replace that flag by
        CLOCK_REPAIRED. ``meta`` (key, JSON-able value) is saved in the same transaction. Returns
        how many committed readings changed.

        Runs under the commit lock, so no batch is half-way between the buffer and the file.
        """
        unsync, repaired = int(Quality.CLOCK_UNSYNCED), int(Quality.CLOCK_REPAIRED)
        async with self._commit_lock:
            base = self._max_id + 1  # the id of _buffer[0]
            for i in range(max(0, first_id - base), min(len(self._buffer), upto - base + 1)):
                r = self._buffer[i]
                if r.quality & unsync:
                    self._buffer[i] = replace(
                        r, ts=r.ts + delta_ms, quality=(r.quality & ~unsync) | repaired
                    )
            async with self._txn() as w:
                cur = await w.execute(
                    "UPDATE readings SET ts = ts + ?, flags = (flags & ?) | ? "
                    "WHERE (flags & 1) != 0 AND id BETWEEN ? AND ?",
                    (delta_ms, ~unsync, repaired, first_id, upto),
                )
                changed = cur.rowcount
                if meta is not None:
                    await w.execute(
                        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                        (meta[0], json.dumps(meta[1])),
                    )
        return int(changed)

    async def count_unsynced(self) -> int:
        """Committed readings still flagged CLOCK_UNSYNCED (uses the partial index)."""
        n = await _scalar(self._read, "SELECT count(*) FROM readings WHERE (flags & 1) != 0")
        return int(n or 0)

    async def load_meta(self, key: str) -> Any:
        """The JSON value saved under ``key`` by :meth:`save_meta`, or None."""
        raw = await _scalar(self._read, "SELECT value FROM meta WHERE key = ?", (key,))
        if not isinstance(raw, str):
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    async def save_meta(self, key: str, value: Any) -> None:
        async with self._wlock:
            await self._write.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value))
            )

    # ------------------------------------------------------------------------------------------
    # Per-uplink persisted state (rate-limit history and the like)

    def uplink_state(self, uplink: str) -> dict[str, Any]:
        return dict(self._cursors[uplink].state)

    async def save_uplink_state(self, uplink: str, state: Mapping[str, Any]) -> None:
        c = self._cursors[uplink]
        c.state = dict(state)
        async with self._wlock:
            await self._write.execute(
                "UPDATE uplinks SET state = ? WHERE name = ?", (json.dumps(c.state), uplink)
            )

    async def _save_cursor(self, c: _Cursor) -> None:
        async with self._wlock:
            await self._write.execute(
                "INSERT OR REPLACE INTO uplinks (name, done, live_mark, delivered, rejected, "
                "evicted, state) VALUES (?,?,?,?,?,?,?)",
                (
                    c.name,
                    c.done.to_json(),
                    c.live_mark,
                    c.delivered,
                    c.rejected,
                    c.evicted,
                    json.dumps(c.state),
                ),
            )

    # ------------------------------------------------------------------------------------------
    # Maintenance: pruning delivered readings, quota and retention eviction, stats

    async def maintain(self) -> None:
        """Prune what every uplink is done with, enforce quota and retention, refresh stats."""
        if self.readonly:
            return
        async with self._maint_lock:
            await self._prune()
            await self._enforce_retention()
            await self._enforce_quota()
            await self.refresh_stats()
            if not self._reserve.exists():  # given back on a full disk; taken again with room
                await asyncio.to_thread(_make_reserve, self._reserve, RESERVE_BYTES)

    async def _prune(self) -> None:
        if not self._cursors:
            return
        floor = min(c.done.floor for c in self._cursors.values())
        floor = min(floor, self._max_id)
        if floor >= self._min_id:
            await self._delete_upto(floor)

    async def _delete_upto(self, upto: int) -> None:
        while self._min_id <= upto:
            step = min(upto, self._min_id + _DELETE_CHUNK - 1)
            async with self._wlock:
                await self._write.execute("DELETE FROM readings WHERE id <= ?", (step,))
            self._min_id = step + 1

    async def _evict(self, upto: int, why: str) -> None:
        """Drop readings with id <= ``upto`` that some uplink still needed; count per uplink."""
        upto = min(upto, self._max_id)
        if upto < self._min_id:
            return
        counts: dict[str, int] = {}
        for c in self._cursors.values():
            n = 0
            for lo, hi in c.done.gaps(self._min_id, upto):
                if c.series_ids:
                    n += (
                        await _scalar(
                            self._read,
                            f"SELECT count(*) FROM readings WHERE id BETWEEN ? AND ? "
                            f"AND {c.sql_series}",
                            (lo, hi),
                        )
                        or 0
                    )
            counts[c.name] = n
        await self._delete_upto(upto)
        total = 0
        for c in self._cursors.values():
            c.evicted += counts[c.name]
            c.backlog = max(0, c.backlog - counts[c.name])
            total += counts[c.name]
            async with c.done_lock:
                c.done.add(0, upto)
                async with self._wlock:
                    await self._write.execute(
                        "UPDATE uplinks SET done = ?, evicted = ? WHERE name = ?",
                        (c.done.to_json(), c.evicted, c.name),
                    )
        self.evicted_total += total
        if total:
            log.warning(
                "store_evicted", reason=why, upto_id=upto, readings=total, per_uplink=counts
            )
            self.events.append(
                StoreEvent(time.time(), "evicted", f"{why}: {total} readings {counts}")
            )
            del self.events[:-50]

    async def _enforce_retention(self) -> None:
        cutoff = int((time.time() - self.cfg.retention_days * 86400) * 1000)
        # The first reading (in capture order) young enough to keep; readings stamped before the
        # clock was synchronised are never judged by their (possibly 1970) timestamp.
        first_young = await _scalar(
            self._read,
            "SELECT id FROM readings WHERE ts >= ? OR (flags & 1) != 0 ORDER BY id LIMIT 1",
            (cutoff,),
        )
        upto = (first_young - 1) if first_young is not None else self._max_id
        if upto >= self._min_id:
            await self._evict(upto, "retention")

    async def _pages_in_use(self) -> int:
        r = self._read
        page = await _scalar(r, "PRAGMA page_size") or 4096
        count = await _scalar(r, "PRAGMA page_count") or 0
        free = await _scalar(r, "PRAGMA freelist_count") or 0
        return int((count - free) * page)

    async def _enforce_quota(self) -> None:
        self.bytes_used = await self._pages_in_use()
        if self.bytes_used <= self.cfg.quota_bytes:
            return
        rows = max(1, self._max_id - self._min_id + 1)
        # Evict enough of the oldest to get back to 90% of the quota, estimated per row.
        excess = self.bytes_used - int(self.cfg.quota_bytes * 0.9)
        n = max(1000, int(rows * excess / max(self.bytes_used, 1)))
        await self._evict(self._min_id + n - 1, "quota")
        self.bytes_used = await self._pages_in_use()

    async def _evict_for_space(self) -> None:
        """The disk is full: give back the reserve, so that SQLite has room to checkpoint and
        delete; evict the oldest 5% (at least 1000); fold the WAL into the file and truncate it;
        take the reserve again. A failure is logged and the next failed commit tries again."""
        async with self._maint_lock:
            released = await asyncio.to_thread(_release_reserve, self._reserve)
            try:
                async with self._wlock:
                    await self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                rows = max(1, self._max_id - self._min_id + 1)
                await self._evict(self._min_id + max(1000, rows // 20) - 1, "disk_full")
                async with self._wlock:
                    await self._write.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except (sqlite3.Error, OSError) as exc:
                log.error("store_evict_failed", reason="disk_full", reserve_released=released,
                          error=f"{type(exc).__name__}: {exc}")
            finally:
                await asyncio.to_thread(_make_reserve, self._reserve, RESERVE_BYTES)

    async def _count_backlog(self, c: _Cursor) -> int:
        n = 0
        if c.series_ids:
            for lo, hi in c.done.gaps(self._min_id, self._max_id):
                n += (
                    await _scalar(
                        self._read,
                        "SELECT count(*) FROM readings WHERE id BETWEEN ? AND ? "
                        f"AND {c.sql_series}",
                        (lo, hi),
                    )
                    or 0
                )
        return n

    async def refresh_stats(self) -> None:
        """Re-read the small tables other processes (the CLI) may change, and oldest ages."""
        r = self._read
        # A completion or replay that lands while these queries run has newer counts than
        # they read: its cursor's version moves, and the stale read is not applied to it.
        versions = {c.name: c.version for c in self._cursors.values()}
        dl: dict[str, int] = {}
        for name, n in await r.execute_fetchall(
            "SELECT uplink, count(*) FROM dead_letters GROUP BY uplink"
        ):
            dl[name] = n
        rt: dict[str, int] = {}
        for name, n in await r.execute_fetchall(
            "SELECT uplink, count(*) FROM retry GROUP BY uplink"
        ):
            rt[name] = n
        for c in self._cursors.values():
            if c.version == versions[c.name]:
                c.dead_letters = dl.get(c.name, 0)
                c.retry_pending = rt.get(c.name, 0)
            c.oldest_pending_ts = None
            if c.series_ids:
                for lo, hi in c.done.gaps(self._min_id, self._max_id):
                    ts = await _scalar(
                        r,
                        f"SELECT ts FROM readings WHERE id BETWEEN ? AND ? "
                        f"AND {c.sql_series} ORDER BY id LIMIT 1",
                        (lo, hi),
                    )
                    if ts is not None:
                        c.oldest_pending_ts = ts
                        break
        if self.readonly:
            self.bytes_used = await self._pages_in_use()

    # ------------------------------------------------------------------------------------------
    # Dead letters

    async def dead_letters(self, uplink: str, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._read.execute_fetchall(
            "SELECT id, series, ts, value, flags, reason, at FROM dead_letters "
            "WHERE uplink = ? ORDER BY id LIMIT ?",
            (uplink, limit),
        )
        return [
            {
                "id": i,
                "series": s,
                "ts": ts,
                "value": _value(v, f),
                "reason": reason,
                "at": at,
            }
            for i, s, ts, v, f, reason, at in rows
        ]

    async def replay_dead_letters(self, uplink: str) -> int:
        """Move ``uplink``'s dead letters to its retry queue; returns how many."""
        async with self._txn() as w:
            cur = await w.execute(
                "INSERT INTO retry (uplink, series, ts, value, flags, lat, lon, alt) "
                "SELECT uplink, series, ts, value, flags, lat, lon, alt FROM dead_letters "
                "WHERE uplink = ? ORDER BY id",
                (uplink,),
            )
            n = cur.rowcount
            await w.execute("DELETE FROM dead_letters WHERE uplink = ?", (uplink,))
        if uplink in self._cursors:
            self._cursors[uplink].version += 1
            self._cursors[uplink].retry_pending += n
            self._cursors[uplink].dead_letters = 0
        log.info("dead_letters_replayed", uplink=uplink, readings=n)
        return n

    # ------------------------------------------------------------------------------------------
    # Status

    def uplink_stats(self, uplink: str) -> dict[str, Any]:
        c = self._cursors[uplink]
        oldest = None
        if c.oldest_pending_ts is not None and c.backlog:
            oldest = max(0.0, time.time() - c.oldest_pending_ts / 1000)
        return {
            "delivered": c.delivered,
            "dead_letters": c.dead_letters,
            "rejected_total": c.rejected,
            "evicted": c.evicted,
            "backlog": c.backlog + c.retry_pending,
            "oldest_pending_s": oldest,
        }

    def stats(self) -> dict[str, Any]:
        try:
            st = os.statvfs(self.path.parent)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        return {
            "path": str(self.path),
            "bytes": self.bytes_used,
            "quota_bytes": self.cfg.quota_bytes,
            "free_disk_bytes": free,
            "readings_stored": max(0, self._max_id - self._min_id + 1),
            "captured_total": self.captured_total,
            "evicted_total": self.evicted_total,
            "buffered": len(self._buffer),
            "commits_total": self.commits_total,
            "last_commit_at": self.last_commit_at,
            "last_commit_error": self.last_commit_error,
            "corrupt": self.corrupt,
            "rejected_total": self.rejected_total,
            "rejected_reasons": dict(self.rejected_reasons),
            "salvaged": None if self.salvaged is None else {
                "readings": self.salvaged.readings,
                "unreadable_ids": self.salvaged.lost_count,
                "summary": self.salvaged.summary(),
            },
            "events": [{"at": e.at, "kind": e.kind, "detail": e.detail} for e in self.events[-10:]],
        }

    @property
    def uplink_names(self) -> list[str]:
        return list(self._cursors)


#: Errors building one reading's row (a value or position of an unexpected type).
_ROW_ERRORS = (TypeError, ValueError, AttributeError)
#: Errors raised while binding one row's values (not the database's): that row is rejected.
_BIND_ERRORS = (
    OverflowError,
    UnicodeError,
    ValueError,
    TypeError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
)


def _is_bind_error(exc: BaseException) -> bool:
    """True for an error about one row's values; False for the connection's (closed, misuse),
    which must fail the commit and keep the batch buffered, never reject its readings."""
    if isinstance(exc, sqlite3.ProgrammingError):
        return "binding parameter" in str(exc)
    return isinstance(exc, _BIND_ERRORS)


def _encodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except (UnicodeError, AttributeError):
        return False
    return True


def _spans(
    gaps: Iterable[tuple[int, int]], merge: int
) -> list[tuple[int, int, int]]:
    """Merge gaps at most ``merge`` ids apart: (lo, hi, ids blocked inside) per span."""
    out: list[tuple[int, int, int]] = []
    for lo, hi in gaps:
        if out and lo - out[-1][1] - 1 <= merge:
            plo, phi, skipped = out[-1]
            out[-1] = (plo, hi, skipped + lo - phi - 1)
        else:
            out.append((lo, hi, 0))
    return out


def _as_reading(s: StoredReading) -> Reading:
    return Reading(s.series, s.ts, s.value, s.position, s.quality)


async def _scalar(conn: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> Any:
    # One thread hop: no statement stays open across awaits holding an old read snapshot.
    rows = list(await conn.execute_fetchall(sql, args))
    return rows[0][0] if rows else None


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
    fixable = code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN,
                       sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH) or any(
        word in text for word in ("locked", "readonly", "unable to open")
    )
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


@dataclass(slots=True)
class Salvage:
    """What :func:`_salvage` could copy out of a corrupt file."""

    readings: int = 0
    lost: IntervalSet = field(default_factory=IntervalSet)
    rows: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def lost_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.lost)

    def summary(self) -> str:
        text = f"{self.readings} readings salvaged"
        if self.lost:
            ranges = ", ".join(f"{lo}-{hi}" for lo, hi in list(self.lost)[:10])
            text += f"; {self.lost_count} ids unreadable ({ranges})"
        return "; ".join([text, *self.notes])


#: (table, key column, columns) copied by _salvage; keys are kept, so every uplink's cursor (its
#: done set of reading ids) stays true for the copied readings.
_SALVAGE_TABLES = (
    ("series", "id", "id, name"),
    ("uplinks", "rowid", "name, done, live_mark, delivered, rejected, evicted, state"),
    ("meta", "rowid", "key, value"),
    ("dead_letters", "id", "id, uplink, series, ts, value, flags, lat, lon, alt, reason, at"),
    ("retry", "id", "id, uplink, series, ts, value, flags, lat, lon, alt"),
    ("readings", "id", "id, series, ts, value, flags, lat, lon, alt"),
)


def _salvage(src: Path, dst: Path, uplinks: Iterable[str]) -> Salvage:
    """:func:`_salvage_into`, or, when the copy itself fails (a full disk), no partial file: a
    fresh store is better than none, and the file aside keeps what could not be copied."""
    try:
        return _salvage_into(src, dst, uplinks)
    except (sqlite3.Error, OSError) as exc:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{dst}{suffix}").unlink(missing_ok=True)
        return Salvage(notes=[f"salvage failed: {type(exc).__name__}: {exc}"])


def _salvage_into(src: Path, dst: Path, uplinks: Iterable[str]) -> Salvage:
    """Copy every row that can still be read from the corrupt database ``src`` (moved aside)
    into a fresh database at ``dst``, keeping ids. Runs in a thread at open, before the store
    connects. Unreadable stretches are found by halving the id range until single rows; their
    ids are reported as lost. An uplink whose cursor row is unreadable starts over from the
    first salvaged reading: duplicates rather than loss."""
    out = Salvage()
    old = _open_damaged(src)
    if isinstance(old, str):
        out.notes.append(f"nothing readable: {old}")
        return out
    new = sqlite3.connect(dst, isolation_level=None)
    try:
        new.execute("PRAGMA journal_mode = WAL")
        new.executescript(_SCHEMA)
        new.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        new.execute("BEGIN")
        for table, key, cols in _SALVAGE_TABLES:
            marks = ",".join("?" * len(cols.split(",")))
            insert = f"INSERT OR IGNORE INTO {table} ({cols}) VALUES ({marks})"
            bounds = _key_bounds(old, table, key)
            if table == "readings":
                # An end of the table that does not read (a file cut short): look as far as
                # the ids the cursors knew of.
                top = _known_top(new)
                if bounds is None:
                    bounds = (1, top)
                elif top is not None and bounds[1] is not None:
                    bounds = (bounds[0], max(bounds[1], top))
            if bounds is None or (bounds[0] is None) != (bounds[1] is None):
                out.notes.append(f"table {table} unreadable")
                continue
            lo, hi = bounds
            copied = 0
            if lo is not None and hi is not None:
                select = f"SELECT {cols} FROM {table} WHERE {key} BETWEEN ? AND ?"
                for rows in _read_ranges(old, select, lo, hi, out.lost if table == "readings"
                                         else None):
                    new.executemany(insert, rows)
                    copied += len(rows)
            out.rows[table] = copied
        out.readings = out.rows.get("readings", 0)
        have = {r[0] for r in new.execute("SELECT name FROM uplinks")}
        fresh = IntervalSet().to_json()
        for name in uplinks:
            if name not in have:
                new.execute(
                    "INSERT INTO uplinks (name, done, live_mark) VALUES (?, ?, 0)", (name, fresh)
                )
                out.notes.append(f"cursor of uplink {name} unreadable: it resends what is kept")
        new.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', 0)")
        new.execute("COMMIT")
    finally:
        new.close()
        old.close()
    return out


def _open_damaged(src: Path) -> sqlite3.Connection | str:
    """A read-only connection to a damaged database, or why there is none. With its WAL first
    (committed transactions may live only there); else the main file alone (``immutable``),
    which reads where a damaged WAL index or a short file stops the normal way. The schema is
    read leniently (``writable_schema``) so one bad root page does not hide the other tables."""
    why = ""
    for uri in (f"file:{src}?mode=ro", f"file:{src}?immutable=1"):
        conn = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute("SELECT count(*) FROM series").fetchone()
            return conn
        except sqlite3.Error as exc:
            why = str(exc)
            conn.close()
    return why


def _key_bounds(
    conn: sqlite3.Connection, table: str, key: str
) -> tuple[int | None, int | None] | None:
    """The lowest and highest key of ``table`` that can be read ((None, None): empty; None:
    nothing reads). A corrupt page fails ``min()``/``max()`` when they descend through it; a
    scan from each end reads up to it."""
    try:
        lo, hi = conn.execute(f"SELECT min({key}), max({key}) FROM {table}").fetchone()
        return lo, hi
    except sqlite3.DatabaseError:
        pass
    ends: list[int | None] = []
    for order in ("ASC", "DESC"):
        found = None
        try:
            for (k,) in conn.execute(f"SELECT {key} FROM {table} ORDER BY {key} {order}"):
                found = k
                break
        except sqlite3.DatabaseError:
            pass
        ends.append(found)
    if ends[0] is not None and ends[1] is None:
        # The far end does not read (a file cut short): walk forward as far as keys read.
        last = ends[0]
        with contextlib.suppress(sqlite3.DatabaseError):
            while rows := conn.execute(
                f"SELECT {key} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT 4096", (last,)
            ).fetchall():
                last = rows[-1][0]
        ends[1] = last
    if ends[0] is None and ends[1] is None:
        return None
    return ends[0] if ends[0] is not None else ends[1], ends[1] if ends[1] is not None else ends[0]


def _known_top(conn: sqlite3.Connection) -> int | None:
    """The highest reading id the salvaged cursors knew of."""
    top = 0
    for done, live in conn.execute("SELECT done, live_mark FROM uplinks"):
        with contextlib.suppress(ValueError, TypeError):
            top = max(top, live, *(hi for _, hi in IntervalSet.from_json(done)))
    return top or None


def _read_ranges(
    conn: sqlite3.Connection, select: str, lo: int, hi: int, lost: IntervalSet | None
) -> Iterator[list[Any]]:
    """Rows of ``select`` over keys ``lo..hi`` in chunks, halving a range that fails to read
    down to single keys; keys that cannot be read are added to ``lost``."""
    todo = [(a, min(a + 4095, hi)) for a in range(lo, hi + 1, 4096)]
    todo.reverse()
    while todo:
        a, b = todo.pop()
        try:
            rows = conn.execute(select, (a, b)).fetchall()
        except sqlite3.DatabaseError:
            if a == b:
                if lost is not None:
                    lost.add(a, a)
                continue
            mid = (a + b) // 2
            todo.append((mid + 1, b))
            todo.append((a, mid))
            continue
        if rows:
            yield rows
