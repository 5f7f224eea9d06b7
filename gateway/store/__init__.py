"""The SQLite store-and-forward queue: durable ingest, per-uplink delivery, dead letters, eviction.

Guarantees a caller may rely on:

* A reading is **captured** once the group commit holding it has committed (``await flush()``
  or ``await ingest(..., durable=True)`` wait for that). Commits are grouped by count or by
  ``commit_interval_ms`` so an SD card sees few, large writes.
  A poll's readings may come as one :class:`~gateway.models.ReadingBatch` (columns): it stays
  one entry in the buffer (split only at a commit's row limit) and its rows are made by zipping
  its columns; every guarantee here holds for each reading in it as for a single one.
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
* A config reload changes the uplinks while running (:meth:`Store.set_routes`: added, removed,
  re-routed; :meth:`drop_leases` once a replaced runner is gone). Nothing committed changes.

Two aiosqlite connections: one writer (ingest, acks, eviction; transactions serialised by a
lock) and one reader (leases, stats), so in WAL mode leasing never waits for a big commit.

Layout. :class:`Store` (here: opening, closing, the writer task :meth:`Store.run`, the meta
table, status) composes one mixin per part; every mixin derives from ``base._StoreBase``, which
holds all the state, and uses only that and its own module:

* ``base``: the state, :class:`Lease`, the per-uplink cursor record, the connections and the
  write-transaction helper ``_txn``, series interning and routing, ``mark_corrupt``.
* ``schema``: tables, ``SCHEMA_VERSION`` and ``_migrate``; the row codec; INSERT statements.
* ``files``: the pre-open check, moving a corrupt file aside, the disk reserve, what SQLite's
  errors mean. ``salvage``: copying what still reads out of a corrupt file.
* ``writer``: ingest, group commit, rejected readings, repair of unsynchronised readings.
* ``cursors``: lease, complete, settle, release, the clock's holds, per-uplink state.
* ``maintenance``: prune, retention and quota eviction, disk-full eviction, stats refresh.
* ``deadletters``: the dead-letter rows written with an outcome; listing and replay.

Lock ownership. Every primitive lives on the one ``Store`` object; ``c`` is one uplink's
cursor. "Takes" lists each place that acquires it (module in brackets)::

  _lock        StoreLock: flock on <db>.lock. Guards the file against a second writing process.
               Takes: _open unless readonly, then held until aclose/abandon (or a failed open)
               [__init__]. Never waited for: a second daemon fails at once (StoreLocked).
  _wlock       asyncio.Lock. Guards the writer connection: one statement or transaction at a
               time. Takes: _txn, i.e. every write transaction (_insert, _insert_one_by_one,
               repair_unsynced [writer]; _intern [base]; _record_outcome for complete and
               settle [cursors]; replay_dead_letters [deadletters]); single statements in
               save_meta, aclose's clean mark [__init__], save_uplink_state, _save_cursor
               [cursors], _delete_upto, _evict, _evict_for_space's checkpoints [maintenance].
  _commit_lock asyncio.Lock. Guards the hand-over of batches from _buffer into the file
               (_buffer's head, _max_id, the batch's bookkeeping). Takes: _commit_buffer (from
               run and aclose), repair_unsynced [writer], set_routes [__init__]. (ingest
               appends to _buffer and next_id reads it without it: neither awaits in between.)
  _maint_lock  asyncio.Lock. One maintenance pass at a time: pruning and eviction move _min_id
               and cursors' done sets; the reserve file; the set of cursors (iterated across
               awaits). Takes: maintain, _evict_for_space [maintenance], set_routes [__init__].
  c.lock       asyncio.Lock per uplink. One lease at a time for that uplink: _lease reads
               c.done, c.leased and c.live_mark across awaits and adds its ranges to c.leased.
               Takes: lease [cursors]. Reader connection only; no other lock under it.
  c.done_lock  asyncio.Lock per uplink. Read-modify-write of c.done with its counters and its
               uplinks row. Takes: complete and settle around _record_outcome [cursors]; _evict
               [maintenance].
  _committed   asyncio.Condition (its own lock). Guards _committed_rows; wakes waiters on each
               commit. Notified by _commit_batch [writer] and release_holds [cursors]; waited
               on by flush (until its rows are committed) and wait_for_data (uplink workers:
               next commit or release, with a timeout) [writer].
  _has_data    asyncio.Event. Wakes the writer task (run) for a commit; set by ingest and flush.
  _room        asyncio.Event. Back-pressure: ingest waits on it while _buffer is full;
               _commit_batch sets it when there is room again.

Order when more than one is held (outer first): ``_maint_lock`` -> ``c.done_lock`` ->
``_wlock`` (``_evict``); ``_commit_lock`` -> ``_wlock`` (every commit, ``repair_unsynced``);
``_commit_lock`` -> ``_committed`` (end of ``_commit_batch``, ``_wlock`` already released);
``_maint_lock`` -> ``_commit_lock`` -> ``_wlock`` (``set_routes`` alone).
``_wlock`` is innermost: nothing is acquired while it is held. Only ``set_routes`` takes
``_commit_lock`` and ``_maint_lock`` together, in that order (``run`` calls maintenance only
between commits, and nothing waits for ``_maint_lock`` holding ``_commit_lock``); no code path
takes any other lock together with ``c.lock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import aiosqlite
import structlog

from gateway.configbase import StoreConfig
from gateway.errors import StoreCorrupt, StoreError, StoreUnusable
from gateway.intervals import IntervalSet
from gateway.lockfile import why as _why
from gateway.routes import SeriesFilter
from gateway.store.base import Lease, StoreEvent, _Cursor
from gateway.store.cursors import _Cursors
from gateway.store.deadletters import _DeadLetters
from gateway.store.files import (
    RESERVE_BYTES,
    _db_why,
    _is_corruption,
    _is_disk_full,
    _make_reserve,
    _move_aside,
    _open_error,
    _preflight,
    _release_reserve,
)
from gateway.store.maintenance import _Maintenance
from gateway.store.salvage import Salvage, _salvage
from gateway.store.schema import _SCHEMA, SCHEMA_VERSION, _migrate, _scalar
from gateway.store.writer import _Writer

if TYPE_CHECKING:
    from gateway.clock import ClockStore

__all__ = [
    "RESERVE_BYTES",
    "SCHEMA_VERSION",
    "_SCHEMA",
    "Lease",
    "Salvage",
    "Store",
    "StoreEvent",
]

log = structlog.get_logger(__name__)


class Store(_Writer, _Cursors, _Maintenance, _DeadLetters):
    """The queue. Build with :meth:`open`; run :meth:`run` as a task; close with :meth:`aclose`."""

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
            await _migrate(w)
            await w.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', 0)")
        self._r = await aiosqlite.connect(self.path, isolation_level=None)
        await self._r.execute("PRAGMA busy_timeout = 10000")
        await self._r.execute("PRAGMA query_only = 1")

    async def _move_aside_and_salvage(self, reason: str) -> None:
        aside = _move_aside(self.path, reason)
        self.events.append(StoreEvent(time.time(), "moved_aside", f"{aside}: {reason}"))
        got = await asyncio.to_thread(_salvage, aside, self.path, list(self._routes))
        log.error(
            "store_salvaged",
            moved_to=str(aside),
            readings=got.readings,
            unreadable_ids=got.lost_count,
            rows=got.rows,
            notes=got.notes,
        )
        self.events.append(StoreEvent(time.time(), "salvaged", f"{aside}: {got.summary()}"))
        self.salvaged = got

    async def _load(self) -> None:
        r = self._read
        async with r.execute("SELECT id, name FROM series") as cur:
            async for sid, text in cur:
                name = sys.intern(text)  # see _intern
                self._series[name] = sid
                self._name_series(sid, name)
        self._max_id = await _scalar(r, "SELECT coalesce(max(id), 0) FROM readings") or 0
        self._min_id = await _scalar(r, "SELECT coalesce(min(id), 1) FROM readings") or 1
        known = await self._saved_cursors()
        # Ids are never reused: once everything was delivered and pruned the table is empty,
        # but every id an uplink has marked done was handed out already.
        for saved in known.values():
            done = IntervalSet.from_json(saved[1])
            top = max((hi for _, hi in done), default=0)
            self._max_id = max(self._max_id, top, saved[2])
        self._min_id = max(self._min_id, 1)
        for name in self._routes:
            self._cursors[name] = await self._cursor_for(name, known.get(name))
        if not self.readonly:
            await self._intern(sorted({s for f in self._routes.values() for s in f.names}))
        self._rebuild_routing()
        for c in self._cursors.values():
            c.backlog = await self._count_backlog(c)
        await self.refresh_stats()

    async def _saved_cursors(self) -> dict[str, tuple[Any, ...]]:
        """Every uplink's saved row (name -> the row), configured now or not."""
        known: dict[str, tuple[Any, ...]] = {}
        async with self._read.execute(
            "SELECT name, done, live_mark, delivered, rejected, evicted, state FROM uplinks"
        ) as cur:
            async for row in cur:
                known[row[0]] = tuple(row)
        return known

    async def _cursor_for(self, name: str, saved: tuple[Any, ...] | None) -> _Cursor:
        """The cursor of uplink ``name``: where its saved row left it, else (an uplink new to
        this store) past every committed reading, saved at once."""
        if saved is not None:
            _, done, live, dl, rj, ev, state = saved
            return _Cursor(
                name,
                IntervalSet.from_json(done),
                live,
                delivered=dl,
                rejected=rj,
                evicted=ev,
                state=json.loads(state),
            )
        # A new uplink starts with what arrives from now on, not the stored history.
        c = _Cursor(name, IntervalSet([(0, self._max_id)]), self._max_id)
        if not self.readonly:
            await self._save_cursor(c)
        return c

    # ------------------------------------------------------------------------------------------
    # Changing the uplinks while running (a config reload: gateway/app.py)

    async def set_routes(self, routes: Mapping[str, Iterable[str]]) -> None:
        """Make ``routes`` (uplink -> the series it takes) the configured uplinks, while running.

        The caller has stopped the runner of every uplink that goes or whose series change.
        An added uplink resumes from its saved row when this store has one (as a restart with
        it configured again would), else it starts with what is committed from now on (what is
        still buffered is its). A removed uplink's cursor leaves memory, so it no longer keeps
        readings from being pruned; its row stays. A re-routed uplink takes readings of its
        new series that are still pending for it; what its past leases covered stays done, as
        for any series not routed to it then."""
        new = {name: SeriesFilter(series) for name, series in routes.items()}
        # Maintenance reads the cursors across awaits and a commit adds to the backlogs of the
        # uplinks a series is routed to: neither runs while cursors and routing change.
        async with self._maint_lock, self._commit_lock:
            before = {name: set(c.series_ids) for name, c in self._cursors.items()}
            saved = await self._saved_cursors()
            cursors: dict[str, _Cursor] = {}
            for name in new:
                c = self._cursors.get(name)
                cursors[name] = (
                    c if c is not None else await self._cursor_for(name, saved.get(name))
                )
            self._routes = new
            self._cursors = cursors
            await self._intern(sorted({s for f in new.values() for s in f.names}))
            self._rebuild_routing()
            for name, c in cursors.items():
                if before.get(name) != c.series_ids:
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

    # ------------------------------------------------------------------------------------------
    # The writer task: group commits (writer) and periodic maintenance (maintenance)

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
                if self._buffered < self.cfg.commit_max_rows and not self._flush_wanted:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(interval):
                            while self._buffered < self.cfg.commit_max_rows:
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
                        buffered=self._buffered,
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

    # ------------------------------------------------------------------------------------------
    # The meta table: small JSON values kept with the data (the clock's state)

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
            "buffered": self._buffered,
            "commits_total": self.commits_total,
            "last_commit_at": self.last_commit_at,
            "last_commit_error": self.last_commit_error,
            "corrupt": self.corrupt,
            "rejected_total": self.rejected_total,
            "rejected_reasons": dict(self.rejected_reasons),
            "salvaged": None
            if self.salvaged is None
            else {
                "readings": self.salvaged.readings,
                "unreadable_ids": self.salvaged.lost_count,
                "summary": self.salvaged.summary(),
            },
            "events": [{"at": e.at, "kind": e.kind, "detail": e.detail} for e in self.events[-10:]],
        }

    @property
    def uplink_names(self) -> list[str]:
        return list(self._cursors)


if TYPE_CHECKING:

    def _is_a_clock_store(store: Store) -> ClockStore:
        return store  # mypy: Store provides what gateway/clock.py asks of it
