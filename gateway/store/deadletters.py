"""Dead letters: readings an uplink's service refused, kept with the uplink, the service's reason
and the time. Written in the same transaction as the lease outcome that rejected them
(:func:`_dead_rows` and :data:`_INSERT_DEAD`, used by ``complete`` and ``settle``); listed, and
replayed into the per-uplink ``retry`` table that the uplink drains first (ids shown negative).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog

from gateway.store.base import Lease, _Cursor, _StoreBase
from gateway.store.schema import _as_reading, _to_row, _value

log = structlog.get_logger(__name__)

_INSERT_DEAD = (
    "INSERT INTO dead_letters (uplink, series, ts, value, flags, lat, lon, alt, reason, at) "
    "VALUES (?,?,?,?,?,?,?,?,?,?)"
)


def _dead_rows(c: _Cursor, lease: Lease, rejected: Mapping[int, str]) -> list[tuple[Any, ...]]:
    """The ``dead_letters`` rows (for :data:`_INSERT_DEAD`) of ``lease``'s ``rejected`` items."""
    if not rejected:
        return []
    now_ms = int(time.time() * 1000)
    by_id = {i.id: i for i in lease.items}
    return [
        (c.name, by_id[i].series, *(_to_row(0, 0, _as_reading(by_id[i]))[2:]), reason, now_ms)
        for i, reason in rejected.items()
    ]


class _DeadLetters(_StoreBase):
    """Listing and replaying dead letters."""

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
