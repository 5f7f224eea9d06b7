"""Per-uplink delivery positions: leasing pending readings, recording a lease's outcome
(:meth:`~_Cursors.complete`, :meth:`~_Cursors.settle`, :meth:`~_Cursors.release`), the clock's
holds, and each uplink's persisted state.

A cursor (:class:`~gateway.store.base._Cursor`) is the uplink's ``done`` set of ids plus the ids
leased in memory; readings are never copied per uplink. ``c.lock`` serialises leasing for one
uplink; ``c.done_lock`` every read-modify-write of ``c.done`` (see the package's lock table).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from functools import partial
from itertools import repeat
from typing import Any

from gateway.intervals import IntervalSet
from gateway.models import StoredReading
from gateway.store.base import Lease, _Cursor, _StoreBase
from gateway.store.deadletters import _INSERT_DEAD, _dead_rows
from gateway.store.files import _is_corruption
from gateway.store.schema import _from_row

#: Gaps separated by at most this many blocked ids are leased with one query (see _spans).
_MERGE_BLOCKED = 1024
#: How many separate gaps one lease may visit before it settles for what it found.
_MAX_GAPS_PER_LEASE = 32


class _Cursors(_StoreBase):
    """Leases and their outcomes, the clock's holds, per-uplink state."""

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
        # ``special`` is 0 for a plain reading (no flags, no position: nearly every one), whose
        # row is then its StoredReading's fields but for the series' name and the position
        # (None). Five columns, not eight: the sqlite3 module's cost is per column.
        sql = (
            f"SELECT id, series, ts, value, flags | ((lat IS NOT NULL) << {_AT_BIT}) "
            f"FROM readings WHERE id BETWEEN ? AND ? AND {c.sql_series} "
            f"ORDER BY id {order} LIMIT ?"
        )
        rows = list(await self._read.execute_fetchall(sql, (lo, hi, limit)))
        if not rows:
            return []
        # The hot path of every lease, column by column in C: no Python code per row.
        ids, sids, ts, values, special = zip(*rows, strict=True)
        names = map(self._series_names.__getitem__, sids)
        items = list(map(_make_stored, zip(ids, names, ts, values, repeat(None), special)))
        if any(special):
            items = await self._decode_special(items)
        return items

    async def _decode_special(self, items: list[StoredReading]) -> list[StoredReading]:
        """Items whose ``quality`` holds a row's ``special`` column (flags, and bit
        :data:`_AT_BIT` for a position) decoded as the readings they are (rare: flagged values,
        positioned readings). Positions are read by id; a row gone by then was evicted between
        the two queries and is left out, as if leased after its eviction (which counted it)."""
        at = [i.id for i in items if i.quality >> _AT_BIT]
        where: dict[int, tuple[Any, Any, Any]] = {}
        for k in range(0, len(at), 500):
            part = at[k : k + 500]
            marks = ",".join("?" * len(part))
            for rid, lat, lon, alt in await self._read.execute_fetchall(
                f"SELECT id, lat, lon, alt FROM readings WHERE id IN ({marks})", part
            ):
                where[rid] = (lat, lon, alt)
        out: list[StoredReading] = []
        for i in items:
            if not i.quality:
                out.append(i)
                continue
            pos = (None, None, None)
            if i.quality >> _AT_BIT:
                found = where.get(i.id)
                if found is None:
                    continue
                pos = found
            out.append(_from_row(i.id, i.series, (i.ts, i.value, i.quality & _FLAGS_MASK, *pos)))
        return out

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
        dead = _dead_rows(c, lease, rejected)
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
            await self._record_outcome(
                c,
                new_done,
                dead=dead,
                retry_done=retry_done,
                delivered=len(delivered),
                rejected=len(rejected),
            )
        if hold_from is not None and lease.hold_epoch == self._hold_epoch:
            c.hold_from = hold_from if c.hold_from is None else min(c.hold_from, hold_from)
        for lo, hi in lease.ranges:
            c.leased.remove(lo, hi)
        c.leased_retry.difference_update(i.id for i in lease.items if i.id < 0)

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
        dead = _dead_rows(c, lease, rejected)
        retry_done = [(-i,) for i in ids if i < 0]
        async with c.done_lock:
            new_done = c.done.copy()
            for i in ids:
                if i > 0:
                    new_done.add(i, i)
            await self._record_outcome(
                c,
                new_done,
                dead=dead,
                retry_done=retry_done,
                delivered=len(delivered),
                rejected=len(rejected),
            )
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

    def drop_leases(self, uplink: str) -> None:
        """Forget every lease of ``uplink`` still out, once no runner of it is left (a config
        reload cancelled it): what they covered is pending again, as after a restart. A lease
        abandoned by cancellation is normally given back (:meth:`release`), but not when the
        cancellation came while its completion was being written."""
        c = self._cursors[uplink]
        c.leased = IntervalSet()
        c.leased_retry.clear()

    # ------------------------------------------------------------------------------------------
    # Holds for the clock (gateway/clock.py)

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
    # Read-only views of a cursor (status, tests)

    def done_floor(self, uplink: str) -> int:
        """Largest n such that every id in [0, n] is done for ``uplink`` (delivered,
        dead-lettered, evicted, or of a series not routed to it); -1 when 0 is not."""
        return self._cursors[uplink].done.floor

    def series_sql(self, uplink: str) -> str:
        """The SQL condition this store's queries use to select ``uplink``'s series: ``1`` when
        it is routed every series the store knows, else ``series IN (...)``."""
        return self._cursors[uplink].sql_series


#: A StoredReading from its six fields, built in C (``tuple.__new__``; see gateway/models.py).
_make_stored = partial(tuple.__new__, StoredReading)
#: In the lease's ``special`` column: this bit marks a reading with a position; below it, the
#: ``flags`` column.
_AT_BIT = 40
_FLAGS_MASK = (1 << _AT_BIT) - 1


def _spans(gaps: Iterable[tuple[int, int]], merge: int) -> list[tuple[int, int, int]]:
    """Merge gaps at most ``merge`` ids apart: (lo, hi, ids blocked inside) per span."""
    out: list[tuple[int, int, int]] = []
    for lo, hi in gaps:
        if out and lo - out[-1][1] - 1 <= merge:
            plo, phi, skipped = out[-1]
            out[-1] = (plo, hi, skipped + lo - phi - 1)
        else:
            out.append((lo, hi, 0))
    return out
