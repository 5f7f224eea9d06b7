"""Maintenance, run by the writer task (``Store.run``) between commits: pruning readings every
uplink is done with, evicting by retention age and by quota (bytes of pages in use), oldest
first and counted per uplink; freeing space when the disk is full; refreshing the stats that
other processes (the CLI) may change. One pass at a time (``_maint_lock``).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import structlog

from gateway.store.base import StoreEvent, _Cursor, _StoreBase
from gateway.store.files import RESERVE_BYTES, _make_reserve, _release_reserve
from gateway.store.schema import _scalar

log = structlog.get_logger(__name__)

#: Rows deleted per eviction or prune statement, so no transaction grows unbounded.
_DELETE_CHUNK = 50_000


class _Maintenance(_StoreBase):
    """Prune, retention, quota, disk-full eviction, stats."""

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
                log.error(
                    "store_evict_failed",
                    reason="disk_full",
                    reserve_released=released,
                    error=f"{type(exc).__name__}: {exc}",
                )
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
