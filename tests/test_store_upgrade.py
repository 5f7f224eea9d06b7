"""A store file written by the current release (schema version 1) opens under the code in the
tree and loses nothing: every pending reading reaches each uplink exactly once with its exact
value and type, cursors, counters, dead letters, replayed rows, uplink state and the clock's
meta carry over, and readings go once every uplink is done with them.

The v1 file is built here with the stdlib ``sqlite3`` module from a frozen copy of the v1 DDL
(:data:`V1_SCHEMA`) and plain INSERTs, never with :class:`~gateway.store.Store`: a later schema
change must then be tested as a migration from this exact layout, not from whatever the code
writes that day.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.config import StoreConfig
from gateway.models import Position, Reading, StoredReading
from gateway.store import Store
from gateway.store.schema import SCHEMA_VERSION

# ----------------------------------------------------------------------------------------------
# The v1 file layout, FROZEN ON PURPOSE. This is gateway/store/schema.py ``_SCHEMA`` (and the
# partial index the v1 store creates at every open, so every v1 file has it) as released with
# ``PRAGMA user_version = 1``. Do not update it when the schema changes: a new version must
# migrate a file of exactly this layout, which is what this module tests.

V1_USER_VERSION = 1

V1_SCHEMA = """
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

V1_UNSYNCED_INDEX = (
    "CREATE INDEX IF NOT EXISTS readings_unsynced ON readings(id) WHERE (flags & 1) != 0"
)

# The v1 row codec's flag bits in ``flags`` (above the public Quality bits), frozen likewise.
V1_BOOL = 1 << 30  # value stored as 0/1
V1_NONFINITE = 1 << 29  # value stored as repr(): 'inf', '-inf', 'nan'
V1_BIGINT = 1 << 28  # int outside signed 64 bits, stored as decimal text
UNSYNCED = 1  # Quality.CLOCK_UNSYNCED
REPAIRED = 2  # Quality.CLOCK_REPAIRED

# ----------------------------------------------------------------------------------------------
# What the v1 file holds

SERIES = {
    1: "plant.temp",
    2: "plant.count",
    3: "plant.pump_on",
    4: "plant.mode",
    5: "truck.pos",
    6: "old.sensor",  # its uplink was removed from the config: routed to nobody now
}
ROUTES = {
    "a": ["plant.temp", "plant.count", "plant.pump_on", "plant.mode", "truck.pos"],
    "b": ["plant.temp", "plant.pump_on", "truck.pos"],
}
#: Ids 1..10 were done for every uplink and pruned by v1; the backlog is 11..120.
FIRST_ID, LAST_ID = 11, 120
#: Each uplink's v1 cursor: done intervals (IntervalSet.to_json), live_mark, counters, state.
#: "a" delivered 1..40 and, live-first after an outage, 90..95; "b" nothing since the prune.
#: "retired" is an uplink no longer configured: its row stays, and must not keep readings.
V1_CURSORS: dict[str, dict[str, Any]] = {
    "a": {
        "done": [[0, 40], [90, 95]],
        "live_mark": 95,
        "delivered": 29,
        "rejected": 2,
        "evicted": 3,
        "state": {"window": [1700000000, 1700000060], "sent_bytes": 1234},
    },
    "b": {
        "done": [[0, 10]],
        "live_mark": 10,
        "delivered": 7,
        "rejected": 1,
        "evicted": 0,
        "state": {},
    },
    "retired": {
        "done": [[0, 5]],
        "live_mark": 5,
        "delivered": 5,
        "rejected": 0,
        "evicted": 0,
        "state": {},
    },
}
CLOCK_META = {"boot_id": "4b1d7c0e-1f6a-4c55-9a57-0d7f3f1c2e11", "first_id": 11, "ref_offset_ms": 0}


@dataclass(frozen=True)
class V1Row:
    """One stored row as v1 wrote it, and the reading it must come back as."""

    id: int
    sid: int
    ts: int
    stored: Any
    flags: int
    lat: float | None
    lon: float | None
    alt: float | None
    expect: StoredReading

    @property
    def db_row(self) -> tuple[Any, ...]:
        return (self.id, self.sid, self.ts, self.stored, self.flags, self.lat, self.lon, self.alt)


# A table of rows reads best positional (v1_readings), like the INSERT it stands for.
def row(  # noqa: PLR0917
    rid: int,
    sid: int,
    ts: int,
    stored: Any,
    flags: int,
    value: Any,
    pos: tuple[float, float, float | None] | None = None,
) -> V1Row:
    lat, lon, alt = pos if pos is not None else (None, None, None)
    position = Position(*pos) if pos is not None else None
    quality = flags & (V1_BIGINT - 1)
    return V1Row(
        rid,
        sid,
        ts,
        stored,
        flags,
        lat,
        lon,
        alt,
        StoredReading(rid, SERIES[sid], ts, value, position, quality),
    )


def v1_readings(t0: int) -> list[V1Row]:
    """The backlog: plain values of every type, and every kind of value the v1 codec flags."""
    big = 2**64 - 1
    special = {
        # done for "a", pending for "b"
        12: row(12, 1, t0 + 12_000, "-inf", V1_NONFINITE, -math.inf),
        13: row(13, 3, t0 + 13_000, 0, V1_BOOL | REPAIRED, False),
        # the first readings pending for "a"
        41: row(41, 2, t0 + 41_000, str(big), V1_BIGINT, big),
        42: row(42, 2, t0 + 42_000, str(-(2**63) - 1), V1_BIGINT, -(2**63) - 1),
        43: row(43, 2, t0 + 43_000, 2**63 - 1, 0, 2**63 - 1),  # fits: stored as an integer
        44: row(44, 1, t0 + 44_000, "inf", V1_NONFINITE, math.inf),
        45: row(45, 1, t0 + 45_000, "nan", V1_NONFINITE, math.nan),
        46: row(46, 1, t0 + 46_000, 3.0, 0, 3.0),  # REAL stays a float
        47: row(47, 2, t0 + 47_000, 3, 0, 3),
        48: row(48, 4, t0 + 48_000, "12", 0, "12"),  # TEXT stays a string
        49: row(49, 4, t0 + 49_000, "", 0, ""),
        50: row(50, 3, t0 + 50_000, 1, V1_BOOL, True),
        51: row(51, 3, t0 + 51_000, 1, V1_BOOL | REPAIRED, True),
        52: row(52, 1, 5_000, 7.5, UNSYNCED, 7.5),  # stamped at boot, clock not yet synced
        53: row(53, 1, t0 + 53_000, 8.5, REPAIRED, 8.5),
        54: row(54, 5, 6_000, str(2**64), V1_BIGINT | UNSYNCED, 2**64, (55.6761, 12.5683, 14.5)),
        55: row(55, 5, t0 + 55_000, -0.0, 0, -0.0, (-33.8688, 151.2093, None)),
        # done for "a" (live-first interval), pending for "b"
        92: row(92, 1, t0 + 92_000, "inf", V1_NONFINITE | REPAIRED, math.inf),
        93: row(93, 3, t0 + 93_000, 1, V1_BOOL, True),
        # the newest reading is of a series no uplink takes now
        LAST_ID: row(LAST_ID, 6, t0 + LAST_ID * 1000, 42, 0, 42),
    }
    out = []
    for rid in range(FIRST_ID, LAST_ID + 1):
        if rid in special:
            out.append(special[rid])
            continue
        ts = t0 + rid * 1000
        sid = (1, 2, 3, 4, 5, 1, 2, 6)[rid % 8]
        if sid == 1:
            out.append(row(rid, sid, ts, rid / 4 + 0.1, 0, rid / 4 + 0.1))
        elif sid == 2:
            out.append(row(rid, sid, ts, rid * 1000, 0, rid * 1000))
        elif sid == 3:
            out.append(row(rid, sid, ts, int(rid % 3 == 0), V1_BOOL, rid % 3 == 0))
        elif sid == 4:
            out.append(row(rid, sid, ts, f"mode-{rid}", 0, f"mode-{rid}"))
        elif sid == 5:
            pos = (55.0 + rid / 1000, 12.0 + rid / 1000, rid / 2 if rid % 2 else None)
            out.append(row(rid, sid, ts, rid * 0.5, 0, rid * 0.5, pos))
        else:
            out.append(row(rid, sid, ts, -rid, 0, -rid))
    return out


#: Dead letters: (id, uplink, series, ts offset, stored value, flags, reason, at offset, value).
V1_DEAD = [
    (1, "a", "plant.count", 5_000, str(2**64), V1_BIGINT, "value exceeds int64", 9_000, 2**64),
    (2, "retired", "plant.mode", 6_000, "x", 0, "gone", 9_500, "x"),
    (3, "a", "plant.mode", 7_000, "auto", 0, "unit 'bar' is not valid", 10_000, "auto"),
]
#: The replayed row waiting in ``retry`` for "b" (leased as id -7).
V1_RETRY_ID = 7


def v1_retry(t0: int) -> tuple[tuple[Any, ...], StoredReading]:
    ts = t0 + 8_000
    flags = V1_NONFINITE | REPAIRED
    db = (V1_RETRY_ID, "b", "truck.pos", ts, "-inf", flags, 55.5, 12.25, None)
    pos = Position(55.5, 12.25, None)
    return db, StoredReading(-V1_RETRY_ID, "truck.pos", ts, -math.inf, pos, REPAIRED)


@dataclass
class V1File:
    path: Path
    t0: int
    readings: list[V1Row]
    retry: StoredReading

    def pending(self, uplink: str) -> list[StoredReading]:
        """What ``uplink`` has still to get, in capture order, by the v1 cursor alone."""
        done = V1_CURSORS[uplink]["done"]
        return [
            r.expect
            for r in self.readings
            if SERIES[r.sid] in ROUTES[uplink] and not any(lo <= r.id <= hi for lo, hi in done)
        ]

    def done_ids(self, uplink: str) -> set[int]:
        return {i for lo, hi in V1_CURSORS[uplink]["done"] for i in range(lo, hi + 1)}


def write_v1(path: Path, *, clean: int | None, crash: bool = False) -> V1File:
    """A v1 store file with a backlog, as the current release leaves it.

    ``clean``: the clean-shutdown mark in ``meta`` (1 after a clean stop, 0 while running or
    after a crash; None: no mark at all). With ``crash`` the file is left as a power cut leaves
    it: every transaction only in ``-wal`` (never checkpointed into the main file)."""
    t0 = int(time.time() * 1000) - 3_600_000  # an hour ago: well inside retention
    readings = v1_readings(t0)
    retry_db, retry = v1_retry(t0)
    src = path.with_name("v1-build.db") if crash else path
    conn = sqlite3.connect(src, isolation_level=None)
    try:
        # As the v1 store's open: WAL, the schema, its version, the partial index.
        assert conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
        if crash:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.executescript(V1_SCHEMA)
        conn.execute(f"PRAGMA user_version = {V1_USER_VERSION}")
        conn.execute(V1_UNSYNCED_INDEX)
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO series (id, name) VALUES (?, ?)", sorted(SERIES.items()))
        conn.executemany(
            "INSERT INTO readings (id, series, ts, value, flags, lat, lon, alt) "
            "VALUES (?,?,?,?,?,?,?,?)",
            [r.db_row for r in readings],
        )
        conn.executemany(
            "INSERT INTO uplinks (name, done, live_mark, delivered, rejected, evicted, state) "
            "VALUES (?,?,?,?,?,?,?)",
            [
                (
                    name,
                    json.dumps(c["done"]),  # IntervalSet.to_json: [[lo, hi], ...]
                    c["live_mark"],
                    c["delivered"],
                    c["rejected"],
                    c["evicted"],
                    json.dumps(c["state"]),
                )
                for name, c in V1_CURSORS.items()
            ],
        )
        conn.executemany(
            "INSERT INTO dead_letters (id, uplink, series, ts, value, flags, lat, lon, alt, "
            "reason, at) VALUES (?,?,?,?,?,?,NULL,NULL,NULL,?,?)",
            [(i, u, s, t0 + dt, v, f, why, t0 + at) for i, u, s, dt, v, f, why, at, _ in V1_DEAD],
        )
        conn.execute(
            "INSERT INTO retry (id, uplink, series, ts, value, flags, lat, lon, alt) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            retry_db,
        )
        conn.execute("INSERT INTO meta (key, value) VALUES ('clock', ?)", (json.dumps(CLOCK_META),))
        if clean is not None:
            conn.execute("INSERT INTO meta (key, value) VALUES ('clean', ?)", (clean,))
        conn.execute("COMMIT")
        if crash:
            # The power cut: the files as they are now, with the writer still holding them.
            shutil.copyfile(src, path)
            shutil.copyfile(f"{src}-wal", f"{path}-wal")
    finally:
        conn.close()
    if crash:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{src}{suffix}").unlink(missing_ok=True)
    return V1File(path, t0, readings, retry)


# ----------------------------------------------------------------------------------------------
# Helpers


def same(r: StoredReading) -> tuple[Any, ...]:
    """A reading compared exactly: the value's type and repr (True is not 1, 3.0 is not 3,
    nan equals nan, -0.0 is not 0.0), and everything else as it is."""
    return (r.id, r.series, r.ts, type(r.value).__name__, repr(r.value), r.position, r.quality)


def raw(path: Path, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A query on a connection of its own (the store may have the file open: WAL reads)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, args).fetchall()


_CHECK = re.compile(r"\b(quick|integrity)_check\b", re.IGNORECASE)


@pytest.fixture
def integrity_checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every ``PRAGMA quick_check`` / ``integrity_check`` run on any SQLite connection opened
    from now on (the store's pre-open check opens its own), whichever part of the store runs
    it."""
    seen: list[str] = []
    real = sqlite3.connect

    def tracing(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real(*args, **kwargs)
        conn.set_trace_callback(lambda sql: seen.append(sql) if _CHECK.search(sql) else None)
        return conn

    monkeypatch.setattr(sqlite3, "connect", tracing)
    yield seen


async def drain(
    store: Store,
    uplink: str,
    *,
    live_first: bool,
    reject: Callable[[StoredReading], str | None] = lambda _: None,
) -> list[StoredReading]:
    """Lease and complete until nothing is pending for ``uplink``; every item, in lease order.
    Items ``reject`` gives a reason for are rejected (dead-lettered), the rest delivered."""
    got: list[StoredReading] = []
    for _ in range(1000):  # a bound, not a wait: far more leases than the backlog needs
        lease = await store.lease(uplink, 7, live_first=live_first)
        if lease is None:
            return got
        got.extend(lease.items)
        rejected = {i.id: why for i in lease.items if (why := reject(i)) is not None}
        await store.complete(lease, [i.id for i in lease.items if i.id not in rejected], rejected)
    raise AssertionError(f"uplink {uplink}: leases never ran out ({len(got)} items)")


async def start(cfg: StoreConfig) -> tuple[Store, asyncio.Task[None]]:
    store = await Store.open(cfg, ROUTES)
    return store, asyncio.create_task(store.run(), name="store:writer")


async def stop(store: Store, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await store.aclose()


def assert_kept_in_place(v1: V1File, store: Store, inode: int) -> None:
    """Nothing moved aside, nothing salvaged: the store runs on the very file v1 left."""
    assert [e for e in store.events if e.kind in ("moved_aside", "salvaged")] == []
    assert store.salvaged is None
    assert list(v1.path.parent.glob("*.corrupt-*")) == []
    assert v1.path.stat().st_ino == inode


# ----------------------------------------------------------------------------------------------
# Tests


async def test_a_v1_file_with_a_backlog_opens_and_loses_nothing(
    tmp_path: Path, integrity_checks: list[str]
) -> None:
    v1 = write_v1(tmp_path / "q.db", clean=1)
    # A clean stop: the last connection folded the WAL into the file.
    assert not Path(f"{v1.path}-wal").exists()
    inode = v1.path.stat().st_ino
    want_a, want_b = v1.pending("a"), v1.pending("b")
    assert len(want_a) > 50 and len(want_b) > 40  # the fixture holds a real backlog

    cfg = StoreConfig(path=v1.path, commit_interval_ms=20)
    store = await Store.open(cfg, ROUTES)
    task: asyncio.Task[None] | None = None
    try:
        # Opened in place, migrated to the version of the code in the tree.
        assert_kept_in_place(v1, store, inode)
        assert raw(v1.path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        # The v1 clean-shutdown mark is honoured: no full integrity check of a clean file.
        assert integrity_checks == []

        # Cursors, counters, state and meta as v1 left them, before anything is leased.
        stats = {u: store.uplink_stats(u) for u in ROUTES}
        assert stats["a"]["delivered"] == 29
        assert stats["a"]["rejected_total"] == 2
        assert stats["a"]["evicted"] == 3
        assert stats["a"]["dead_letters"] == 2
        assert stats["a"]["backlog"] == len(want_a)
        assert stats["b"]["delivered"] == 7
        assert stats["b"]["rejected_total"] == 1
        assert stats["b"]["dead_letters"] == 0
        assert stats["b"]["backlog"] == len(want_b) + 1  # and the replayed row
        assert store.done_floor("a") == 40 and store.done_floor("b") == 10
        assert store.uplink_state("a") == V1_CURSORS["a"]["state"]
        assert await store.load_meta("clock") == CLOCK_META
        assert await store.count_unsynced() == sum(r.flags & UNSYNCED for r in v1.readings)
        assert store.next_id() == LAST_ID + 1  # ids are never reused
        assert store.stats()["readings_stored"] == LAST_ID - FIRST_ID + 1

        task = asyncio.create_task(store.run(), name="store:writer")

        # "a", oldest first: strictly its pending readings in capture order, exactly once, its
        # done ids (1..40 and 90..95) never again. One is refused by the service on the way.
        got_a = await drain(
            store,
            "a",
            live_first=False,
            reject=lambda i: "bad unit" if i.series == "plant.mode" and i.value == "12" else None,
        )
        assert [same(r) for r in got_a] == [same(r) for r in want_a]
        assert {r.id for r in got_a}.isdisjoint(v1.done_ids("a"))
        by_id = {r.id: r.value for r in got_a}
        assert by_id[41] == 2**64 - 1 and type(by_id[41]) is int
        assert by_id[50] is True and by_id[44] == math.inf and math.isnan(by_id[45])

        # "b" still needs every reading from 11 on: a prune must not take them.
        await store.maintain()
        assert raw(v1.path, "SELECT count(*) FROM readings") == [(len(v1.readings),)]

        # "b", live first: the replayed row leads (as a negative id), then each pending
        # reading exactly once; the series only "a" takes never come.
        got_b = await drain(store, "b", live_first=True)
        assert same(got_b[0]) == same(v1.retry)
        rest = got_b[1:]
        assert all(r.id > 0 for r in rest)
        assert len({r.id for r in rest}) == len(rest)
        assert sorted(map(same, rest)) == sorted(map(same, want_b))
        assert {r.id for r in rest}.isdisjoint(v1.done_ids("b"))

        # Dead letters: v1's with their reasons, then the one refused now; per uplink.
        letters = await store.dead_letters("a")
        listed = [(d["series"], d["ts"], d["value"], d["reason"]) for d in letters]
        assert listed == [
            ("plant.count", v1.t0 + 5_000, 2**64, "value exceeds int64"),
            ("plant.mode", v1.t0 + 7_000, "auto", "unit 'bar' is not valid"),
            ("plant.mode", v1.t0 + 48_000, "12", "bad unit"),
        ]
        assert [d["id"] for d in letters][:2] == [1, 3]
        assert letters[2]["id"] > 3
        assert [d["at"] for d in letters][:2] == [v1.t0 + 9_000, v1.t0 + 10_000]
        assert await store.dead_letters("b") == []

        # Counters continue from the v1 values.
        a, b = store.uplink_stats("a"), store.uplink_stats("b")
        assert a["delivered"] == 29 + len(want_a) - 1
        assert a["rejected_total"] == 3 and a["dead_letters"] == 3 and a["evicted"] == 3
        assert b["delivered"] == 7 + len(want_b) + 1
        assert b["rejected_total"] == 1 and b["evicted"] == 0
        assert a["backlog"] == 0 and b["backlog"] == 0

        # A reading captured now follows the v1 ids and reaches both uplinks.
        await store.ingest([Reading("plant.temp", int(time.time() * 1000), 99.5)], durable=True)
        for uplink in ROUTES:
            new = await drain(store, uplink, live_first=True)
            assert [(r.id, r.series, r.value) for r in new] == [(LAST_ID + 1, "plant.temp", 99.5)]

        # Done for every configured uplink (the retired one's old cursor does not count): gone.
        await store.maintain()
        assert store.stats()["readings_stored"] == 0
        assert raw(v1.path, "SELECT count(*) FROM readings") == [(0,)]
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await store.aclose()

    # As persisted: counters, cursors, the retry queue drained, dead letters, the clean mark.
    assert raw(v1.path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    rows = {
        name: cols
        for name, *cols in raw(
            v1.path, "SELECT name, delivered, rejected, evicted, done FROM uplinks"
        )
    }
    assert rows["a"][:3] == [29 + len(want_a) - 1 + 1, 3, 3]
    assert rows["b"][:3] == [7 + len(want_b) + 1 + 1, 1, 0]
    assert json.loads(rows["a"][3]) == [[0, LAST_ID + 1]]
    assert json.loads(rows["b"][3]) == [[0, LAST_ID + 1]]
    assert rows["retired"] == [5, 0, 0, json.dumps(V1_CURSORS["retired"]["done"])]
    assert raw(v1.path, "SELECT count(*) FROM retry") == [(0,)]
    assert raw(v1.path, "SELECT uplink, count(*) FROM dead_letters GROUP BY uplink") == [
        ("a", 3),
        ("retired", 1),
    ]
    assert raw(v1.path, "SELECT value FROM meta WHERE key = 'clean'") == [(1,)]


@pytest.mark.parametrize("clean", [0, None], ids=["clean-mark-0", "no-clean-mark"])
async def test_a_v1_file_left_by_a_crash_is_checked_and_kept_in_place(
    tmp_path: Path, integrity_checks: list[str], clean: int | None
) -> None:
    v1 = write_v1(tmp_path / "q.db", clean=clean, crash=True)
    # As a power cut leaves it: everything only in the WAL, the main file never checkpointed.
    assert Path(f"{v1.path}-wal").stat().st_size > 0
    with contextlib.closing(sqlite3.connect(f"file:{v1.path}?immutable=1", uri=True)) as main:
        assert main.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    inode = v1.path.stat().st_ino

    store, task = await start(StoreConfig(path=v1.path, commit_interval_ms=20))
    try:
        # Unclean: the integrity check ran, passed, and the file stayed where it was.
        assert any(_CHECK.search(sql) for sql in integrity_checks)
        assert_kept_in_place(v1, store, inode)
        assert raw(v1.path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        # Nothing lost: what lived only in the WAL is all there, for each uplink.
        got_a = await drain(store, "a", live_first=False)
        assert [same(r) for r in got_a] == [same(r) for r in v1.pending("a")]
        got_b = await drain(store, "b", live_first=False)
        assert [same(r) for r in got_b] == [same(v1.retry)] + [same(r) for r in v1.pending("b")]
        assert [d["reason"] for d in await store.dead_letters("a")] == [
            "value exceeds int64",
            "unit 'bar' is not valid",
        ]
    finally:
        await stop(store, task)
    assert raw(v1.path, "SELECT value FROM meta WHERE key = 'clean'") == [(1,)]
