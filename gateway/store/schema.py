"""The database's layout and how a reading becomes a row and back.

* :data:`_SCHEMA` (``PRAGMA user_version`` :data:`SCHEMA_VERSION`) and :func:`_migrate`, which
  creates it in a new file and adds what later versions added to older files.
* The row codec: :func:`_to_row` / :func:`_from_row` / :func:`_value`. Values SQLite has no type
  for (bools, non-finite floats, ints beyond 64 bits) are kept exactly, marked by flag bits above
  the public :class:`~gateway.models.Quality` bits.
* The INSERT statements that bind those rows, and :func:`_scalar`, the one-value query helper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import aiosqlite

from gateway.models import Position, Reading, StoredReading, Value

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
_INSERT_PLAIN = "INSERT OR IGNORE INTO readings (id, series, ts, value) VALUES (?,?,?,?)"


#: Per schema version from 2 on, the SQL that takes a file of the version before to it (run in
#: one transaction with the new ``user_version``). A file written by any earlier release opens
#: under this one with its backlog, dead letters and cursors: tests/test_store_upgrade.py builds
#: a version 1 file from a frozen copy of its layout and delivers every reading from it.
_MIGRATIONS: dict[int, str] = {}
assert sorted(_MIGRATIONS) == list(range(2, SCHEMA_VERSION + 1)), "a schema step is missing"


async def _migrate(w: aiosqlite.Connection) -> None:
    """Create the schema in a new file (``user_version`` 0), or take an older file through
    each step of :data:`_MIGRATIONS` up to :data:`SCHEMA_VERSION`. Runs on the writer
    connection at open, outside any transaction (a newer file never gets here: the pre-open
    check refuses it)."""
    version = await _scalar(w, "PRAGMA user_version")
    if version == 0:
        await w.executescript(_SCHEMA)
        await w.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    for step in range(version + 1, SCHEMA_VERSION + 1) if version else ():
        await w.executescript(
            f"BEGIN IMMEDIATE; {_MIGRATIONS[step]}; PRAGMA user_version = {step}; COMMIT;"
        )
    await w.execute(_UNSYNCED_INDEX)


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


def _as_reading(s: StoredReading) -> Reading:
    return Reading(s.series, s.ts, s.value, s.position, s.quality)


async def _scalar(conn: aiosqlite.Connection, sql: str, args: Sequence[Any] = ()) -> Any:
    # One thread hop: no statement stays open across awaits holding an old read snapshot.
    rows = list(await conn.execute_fetchall(sql, args))
    return rows[0][0] if rows else None
