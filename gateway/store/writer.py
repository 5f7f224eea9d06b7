"""The writer: readings queued in memory (:meth:`~_Writer.ingest`) and committed in groups
(:meth:`~_Writer._commit_buffer`, driven by ``Store.run``), by count or by
``commit_interval_ms``, so an SD card sees few, large writes; and the clock repair of readings
stamped while the clock was unsynchronised, committed and still buffered alike.

``_commit_lock`` belongs to this module: it is held while batches move from ``_buffer`` into the
file (and by :meth:`~_Writer.repair_unsynced`, which rewrites both), so no batch is ever half-way
between the two for anyone else holding it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from itertools import chain, repeat
from operator import itemgetter
from typing import Any

import aiosqlite
import structlog

from gateway.errors import StoreCorrupt, StoreError
from gateway.models import Quality, Reading, ReadingBatch
from gateway.store.base import StoreEvent, _StoreBase
from gateway.store.files import _is_corruption
from gateway.store.schema import (
    _I64_MAX,
    _I64_MIN,
    _INSERT,
    _INSERT_PLAIN,
    _scalar,
    _to_row,
)

log = structlog.get_logger(__name__)


class _Writer(_StoreBase):
    """Ingest, group commit, and the clock's repair of buffered and committed readings."""

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
        while self._buffered >= self.cfg.buffer_max_rows:
            self._room.clear()
            await self._room.wait()
        if prepare is not None:
            readings = prepare(readings)
        if isinstance(readings, ReadingBatch):
            if readings:
                self._buffer.append(readings)  # one poll stays one entry (columns)
        else:
            self._buffer.extend(readings)
        self._buffered += len(readings)
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
        return self._max_id + self._buffered + 1

    async def flush(self) -> None:
        """Wait until everything queued so far is committed (needs :meth:`run` running)."""
        target = self._enqueued_rows
        if self._committed_rows >= target:
            return
        self._flush_wanted = True
        self._has_data.set()
        async with self._committed:
            await self._committed.wait_for(lambda: self._committed_rows >= target)

    async def _commit_buffer(self) -> None:
        """Commit what is buffered now. Readings arriving meanwhile wait for the writer's next
        turn, so a steady stream cannot keep it from its maintenance."""
        async with self._commit_lock:
            pending = self._buffered
            while pending > 0 and self._buffer:
                k, n = self._head(min(pending, self.cfg.commit_max_rows))
                await self._commit_batch(self._buffer[:k], n)
                pending -= n
            if not self._buffer:
                self._flush_wanted = False

    def _head(self, limit: int) -> tuple[int, int]:
        """How many entries at the head of ``_buffer`` hold at most ``limit`` readings (at least
        one), and how many readings that is. A batch across the limit is split in place (the
        same readings in the same order, as two entries)."""
        buf = self._buffer
        k = n = 0
        for e in buf:
            m = len(e) if isinstance(e, ReadingBatch) else 1
            if n + m > limit and isinstance(e, ReadingBatch) and n < limit:
                buf[k : k + 1] = [e[: limit - n], e[limit - n :]]
                return k + 1, limit
            if n + m > limit and n:
                break
            k += 1
            n += m
        return k, n

    async def _commit_batch(self, batch: list[Reading | ReadingBatch], size: int) -> None:
        """Commit the first ``len(batch)`` entries of ``_buffer`` (``size`` readings)."""
        series = self._series
        try:
            sids = [
                list(map(series.__getitem__, e.series))
                if isinstance(e, ReadingBatch)
                else series[e.series]
                for e in batch
            ]
        except KeyError:  # a series seen for the first time: interned, then looked up again
            await self._intern({n for n in _names(batch) if _encodable(n)})
            sids = [
                [series.get(n, 0) for n in e.series]
                if isinstance(e, ReadingBatch)
                else series.get(e.series, 0)
                for e in batch
            ]
        first = self._max_id + 1
        plain, full, bad = _rows(first, sids, batch)
        self._commit_started = time.monotonic()
        try:
            try:
                await self._insert(plain, full)
            except _BIND_ERRORS as exc:
                if not _is_bind_error(exc):
                    raise
                # One reading SQLite cannot take must not cost the batch (nor kill the writer
                # and, under Restart=on-failure, the daemon forever): find it, keep the rest.
                kept, more = await self._insert_one_by_one([*plain, *full])
                plain, full = kept, []
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
        self._buffered -= size
        self._max_id = first + size - 1
        for i, reason in bad:
            self._reject(_reading_at(batch, i - first), reason)
        stored = len(plain) + len(full)
        self.captured_total += stored
        self.commits_total += 1
        self.last_commit_at = time.time()
        self.last_commit_error = None
        # Per series: when it was last captured; per uplink: its backlog. An uplink routed
        # every series the store knows (the usual case) takes every row: no per-series count.
        counts = Counter(map(itemgetter(1), chain(plain, full)))
        deque(map(self._captured_at.__setitem__, counts, repeat(time.monotonic())), maxlen=0)
        partial = False
        for c in self._cursors.values():
            if c.sql_series == "1":
                c.backlog += stored
            else:
                partial = True
        if partial:
            for sid, n in counts.items():
                for c in self._uplinks_by_series.get(sid, ()):
                    if c.sql_series != "1":
                        c.backlog += n
        if self._buffered < self.cfg.buffer_max_rows:
            self._room.set()
        async with self._committed:
            self._committed_rows += size
            self._committed.notify_all()

    @staticmethod
    def _reading_rows(
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
                    if not r.quality
                    and r.position is None
                    and (
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

    async def _insert(self, plain: list[tuple[Any, ...]], full: list[tuple[Any, ...]]) -> None:
        """Insert the rows in one transaction (``plain``: four columns, ``full``: eight). Every
        row must land: a row that was already there is accepted only as this writer's own
        earlier commit (a COMMIT that went through while its caller was cancelled); anything
        else is an id collision and fails loudly."""
        async with self._txn() as w:
            inserted = 0
            if full:
                inserted += (await w.executemany(_INSERT, full)).rowcount
            if plain:
                inserted += (await w.executemany(_INSERT_PLAIN, plain)).rowcount
            if inserted != len(plain) + len(full):
                await self._check_recommit(w, [*plain, *full])

    async def _check_recommit(self, w: aiosqlite.Connection, rows: list[tuple[Any, ...]]) -> None:
        lo, hi = min(row[0] for row in rows), max(row[0] for row in rows)
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
        at = self._captured_at[sid] if sid is not None else self._opened_at
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
    # Clock repair (gateway/clock.py): readings stamped while the clock was unsynchronised

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
            rid = self._max_id + 1  # the id of _buffer[0]
            entries: list[Reading | ReadingBatch] = []
            for e in self._buffer:
                if isinstance(e, ReadingBatch):
                    lo, hi = max(rid, first_id), min(rid + len(e) - 1, upto)
                    if lo > hi or not e.quality & unsync:
                        entries.append(e)
                    else:  # the part inside the range, repaired; the rest as it was
                        q = (e.quality & ~unsync) | repaired
                        parts = [e[: lo - rid], e[lo - rid : hi - rid + 1], e[hi - rid + 1 :]]
                        parts[1] = parts[1].with_stamp(e.ts + delta_ms, q)
                        entries.extend(p for p in parts if p)
                    rid += len(e)
                    continue
                if first_id <= rid <= upto and e.quality & unsync:
                    q = (e.quality & ~unsync) | repaired
                    entries.append(replace(e, ts=e.ts + delta_ms, quality=q))
                else:
                    entries.append(e)
                rid += 1
            self._buffer[:] = entries  # no await since the loop began: ingest appended nothing
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


def _rows(
    first: int, sids: Sequence[int | list[int]], batch: Sequence[Reading | ReadingBatch]
) -> tuple[list[tuple[Any, ...]], list[tuple[int, str]], list[tuple[int, str]]]:
    """The rows of ``batch`` (entries of ``_buffer``, their series ids in ``sids``) from id
    ``first`` on: four-column rows, eight-column rows, and ``(id, reason)`` of readings that
    cannot be stored.

    A batch of one poll with no quality flags whose values are all plain (ints within 64 bits,
    finite floats, strings) becomes its rows by zipping its columns (no Python per reading: the
    hot path of every commit); anything else goes reading by reading.
    """
    plain: list[tuple[Any, ...]] = []
    full: list[tuple[Any, ...]] = []
    bad: list[tuple[int, str]] = []
    run: list[Reading] = []
    run_sids: list[int] = []
    rid = first

    def one_by_one(start: int, ids: Sequence[int], readings: Sequence[Reading]) -> None:
        rows, more = _Writer._reading_rows(start, ids, readings)
        for row in rows:
            (plain if len(row) == 4 else full).append(row)
        bad.extend(more)

    for e, ids in zip(batch, sids, strict=True):
        if not isinstance(e, ReadingBatch):
            assert isinstance(ids, int)
            run.append(e)
            run_sids.append(ids)
            rid += 1
            continue
        assert isinstance(ids, list)
        if run:
            one_by_one(rid - len(run), run_sids, run)
            run, run_sids = [], []
        n = len(e)
        if not e.quality and 0 not in ids and _plain_values(e.values):
            plain.extend(zip(range(rid, rid + n), ids, repeat(e.ts), e.values))
        else:
            one_by_one(rid, ids, list(e))
        rid += n
    if run:
        one_by_one(rid - len(run), run_sids, run)
    return plain, full, bad


def _plain_values(values: Sequence[Any]) -> bool:
    """True when every value is stored as it is (see schema.py): ints within 64 bits, finite
    floats, strings. Checked over the column, not value by value in Python."""
    kinds = set(map(type, values))
    if not kinds <= _PLAIN_KINDS:
        return False
    numbers = values if str not in kinds else [v for v in values if type(v) is not str]
    if not numbers:
        return True
    if min(numbers) >= _I64_MIN and max(numbers) <= _I64_MAX:
        return float not in kinds or all(map(math.isfinite, numbers))
    return False


_PLAIN_KINDS = frozenset({int, float, str})


def _names(batch: Sequence[Reading | ReadingBatch]) -> list[str]:
    out: list[str] = []
    for e in batch:
        if isinstance(e, ReadingBatch):
            out.extend(e.series)
        else:
            out.append(e.series)
    return out


def _reading_at(batch: Sequence[Reading | ReadingBatch], offset: int) -> Reading:
    """The reading ``offset`` places from the start of ``batch``'s entries."""
    for e in batch:
        n = len(e) if isinstance(e, ReadingBatch) else 1
        if offset < n:
            return e[offset] if isinstance(e, ReadingBatch) else e
        offset -= n
    raise IndexError(offset)


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
