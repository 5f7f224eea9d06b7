"""The store against real SQLite files: capture, leases, order, dead letters, eviction, repair."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.models import Position, Reading
from gateway.store import Store


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def cfg(tmp_path: Path) -> StoreConfig:
    return StoreConfig(path=tmp_path / "q.db", commit_interval_ms=20)


async def opened(
    cfg: StoreConfig, routes: dict[str, list[str]]
) -> tuple[Store, asyncio.Task[None]]:
    store = await Store.open(cfg, routes)
    return store, asyncio.create_task(store.run(), name="store:writer")


async def close(store: Store, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await store.aclose()


@pytest.fixture
async def store(cfg: StoreConfig) -> AsyncIterator[Store]:
    s, t = await opened(cfg, {"a": ["s1", "s2"], "b": ["s2"]})
    yield s
    await close(s, t)


async def test_values_round_trip_with_types_and_positions(store: Store) -> None:
    t = now_ms()
    sent = [
        Reading("s1", t, 1.5),
        Reading("s1", t + 1, 3),
        Reading("s1", t + 2, 3.0),
        Reading("s1", t + 3, True),
        Reading("s1", t + 4, "12"),
        Reading("s1", t + 4, float("inf")),
        Reading("s2", t + 5, -7, Position(55.7, 12.5, 10.0), quality=1),
    ]
    await store.ingest(sent, durable=True)
    lease = await store.lease("a", 100, live_first=False)
    assert lease is not None
    got = [(i.series, i.ts, i.value, type(i.value), i.position, i.quality) for i in lease.items]
    assert got == [(r.series, r.ts, r.value, type(r.value), r.position, r.quality) for r in sent]


async def test_captured_means_committed_and_survives_reopen(cfg: StoreConfig) -> None:
    s, t = await opened(cfg, {"a": ["s1"]})
    await s.ingest([Reading("s1", now_ms() + i, i) for i in range(500)], durable=True)
    # A second connection sees them: they are in the file, not just in memory.
    with sqlite3.connect(cfg.path) as raw:
        assert raw.execute("SELECT count(*) FROM readings").fetchone()[0] == 500
    await close(s, t)
    s2, t2 = await opened(cfg, {"a": ["s1"]})
    assert s2.uplink_stats("a")["backlog"] == 500
    await close(s2, t2)


async def test_each_uplink_gets_only_its_series_and_readings_go_when_all_are_done(
    store: Store, cfg: StoreConfig
) -> None:
    t = now_ms()
    await store.ingest(
        [Reading("s1", t, 1), Reading("s2", t, 2), Reading("s3", t, 3)], durable=True
    )
    la = await store.lease("a", 10)
    lb = await store.lease("b", 10)
    assert la is not None and lb is not None
    assert sorted(i.series for i in la.items) == ["s1", "s2"]
    assert [i.series for i in lb.items] == ["s2"]
    await store.complete(la, [i.id for i in la.items], {})
    await store.maintain()
    assert store.stats()["readings_stored"] == 3  # b has not taken s2 yet
    await store.complete(lb, [i.id for i in lb.items], {})
    await store.maintain()
    assert store.stats()["readings_stored"] == 0
    assert await store.lease("a", 10) is None


async def test_unfinished_items_stay_pending_and_come_back(store: Store) -> None:
    t = now_ms()
    await store.ingest([Reading("s1", t + i, i) for i in range(10)], durable=True)
    lease = await store.lease("a", 10, live_first=False)
    assert lease is not None
    ids = [i.id for i in lease.items]
    await store.complete(lease, ids[:3], {ids[3]: "bad unit"}, unfinished=ids[4:])
    again = await store.lease("a", 10, live_first=False)
    assert again is not None
    assert [i.id for i in again.items] == ids[4:]
    assert store.uplink_stats("a")["backlog"] == 6
    assert store.uplink_stats("a")["dead_letters"] == 1


async def test_leased_items_are_not_leased_twice(store: Store) -> None:
    await store.ingest([Reading("s1", now_ms() + i, i) for i in range(10)], durable=True)
    first = await store.lease("a", 6, live_first=False)
    second = await store.lease("a", 6, live_first=False)
    assert first is not None and second is not None
    assert {i.id for i in first.items}.isdisjoint({i.id for i in second.items})
    assert len(first.items) + len(second.items) == 10
    store.release(first)
    third = await store.lease("a", 10, live_first=False)
    assert third is not None
    assert [i.id for i in third.items] == [i.id for i in first.items]


async def test_live_first_sends_newest_then_drains_backlog_oldest_first(store: Store) -> None:
    t = now_ms()
    await store.ingest([Reading("s1", t + i, i) for i in range(100)], durable=True)
    newest = await store.lease("a", 10, live_first=True)
    assert newest is not None
    assert [i.value for i in newest.items] == list(range(90, 100))
    await store.complete(newest, [i.id for i in newest.items], {})
    # New live data arrives while 90 are still in the backlog: it goes first, then the oldest.
    await store.ingest([Reading("s1", t + 1000 + i, 1000 + i) for i in range(3)], durable=True)
    mixed = await store.lease("a", 10, live_first=True)
    assert mixed is not None
    assert [i.value for i in mixed.items] == [1000, 1001, 1002, 0, 1, 2, 3, 4, 5, 6]


async def test_oldest_first_is_strict_capture_order(store: Store) -> None:
    t = now_ms()
    await store.ingest([Reading("s1", t + i, i) for i in range(30)], durable=True)
    seen: list[float | int | bool | str] = []
    while (lease := await store.lease("a", 7, live_first=False)) is not None:
        seen.extend(i.value for i in lease.items)
        await store.complete(lease, [i.id for i in lease.items], {})
    assert seen == list(range(30))


async def test_dead_letters_keep_reason_and_replay_to_that_uplink_only(store: Store) -> None:
    t = now_ms()
    await store.ingest([Reading("s2", t, 4.2)], durable=True)
    la = await store.lease("a", 10)
    lb = await store.lease("b", 10)
    assert la is not None and lb is not None
    await store.complete(la, [], {la.items[0].id: "unit 'bar' is not valid"})
    await store.complete(lb, [lb.items[0].id], {})
    letters = await store.dead_letters("a")
    assert [(d["series"], d["ts"], d["value"], d["reason"]) for d in letters] == [
        ("s2", t, 4.2, "unit 'bar' is not valid")
    ]
    assert await store.replay_dead_letters("a") == 1
    assert await store.dead_letters("a") == []
    assert await store.lease("b", 10) is None  # b already has it: no duplicate
    again = await store.lease("a", 10)
    assert again is not None
    assert [(i.series, i.ts, i.value) for i in again.items] == [("s2", t, 4.2)]
    assert again.items[0].id < 0
    await store.complete(again, [again.items[0].id], {})
    assert await store.lease("a", 10) is None
    assert store.uplink_stats("a")["backlog"] == 0


async def test_quota_evicts_oldest_counts_per_uplink_and_keeps_newest(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path / "q.db", quota_bytes=1 << 20, commit_interval_ms=20)
    s, t = await opened(cfg, {"a": ["s1"], "b": ["s2"]})
    base = now_ms()
    n = 60_000
    await s.ingest(
        [Reading("s1" if i % 2 else "s2", base + i, float(i)) for i in range(n)], durable=True
    )
    await s.maintain()
    stats = s.stats()
    assert stats["bytes"] <= cfg.quota_bytes
    evicted = {u: s.uplink_stats(u)["evicted"] for u in ("a", "b")}
    assert evicted["a"] > 0 and evicted["b"] > 0
    assert stats["evicted_total"] == evicted["a"] + evicted["b"]
    assert any(e["kind"] == "evicted" for e in stats["events"])
    # Nothing vanished uncounted: stored + evicted == captured, and the newest is still there.
    assert stats["readings_stored"] + stats["evicted_total"] == n
    assert s.uplink_stats("a")["backlog"] + evicted["a"] == n // 2
    lease = await s.lease("a", 1, live_first=True)
    assert lease is not None and lease.items[0].value == float(n - 1)
    await close(s, t)


async def test_retention_evicts_old_readings_but_not_unsynced_clock_ones(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path / "q.db", retention_days=1, commit_interval_ms=20)
    s, t = await opened(cfg, {"a": ["s1"]})
    old = now_ms() - 3 * 86_400_000
    await s.ingest([Reading("s1", old + i, i) for i in range(10)], durable=True)
    await s.ingest([Reading("s1", 1000, 99, quality=1)], durable=True)  # stamped at "1970"
    await s.ingest([Reading("s1", now_ms(), 100)], durable=True)
    await s.maintain()
    assert s.uplink_stats("a")["evicted"] == 10
    lease = await s.lease("a", 10, live_first=False)
    assert lease is not None
    assert [i.value for i in lease.items] == [99, 100]
    await close(s, t)


async def test_garbage_file_is_moved_aside_and_a_fresh_store_runs(cfg: StoreConfig) -> None:
    cfg.path.write_bytes(b"this is not a database" * 100)
    s, t = await opened(cfg, {"a": ["s1"]})
    aside = list(cfg.path.parent.glob("q.db.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b"this is not a database")
    assert [e["kind"] for e in s.stats()["events"]] == ["moved_aside", "salvaged"]
    assert s.stats()["salvaged"]["readings"] == 0
    await s.ingest([Reading("s1", now_ms(), 1)], durable=True)
    assert s.uplink_stats("a")["backlog"] == 1
    await close(s, t)


async def test_torn_database_after_unclean_stop_is_moved_aside(cfg: StoreConfig) -> None:
    s, t = await opened(cfg, {"a": ["s1"]})
    await s.ingest([Reading("s1", now_ms() + i, i) for i in range(20_000)], durable=True)
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    await s.abandon()  # no clean-shutdown mark: as after a power cut
    # Tear the file: overwrite pages in the middle with zeros.
    size = cfg.path.stat().st_size
    with cfg.path.open("r+b") as f:
        f.seek(size // 2)
        f.write(b"\0" * 8192)
    s2, t2 = await opened(cfg, {"a": ["s1"]})
    assert any(e["kind"] == "moved_aside" for e in s2.stats()["events"])
    # What is still readable was salvaged with its ids; the torn pages' readings are counted.
    salvaged = s2.stats()["salvaged"]
    assert 0 < salvaged["readings"] < 20_000
    assert salvaged["readings"] + salvaged["unreadable_ids"] >= 20_000
    assert s2.uplink_stats("a")["backlog"] == salvaged["readings"]
    got = []
    while (lease := await s2.lease("a", 5000, live_first=False)) is not None and lease.items:
        got.extend(lease.items)
        await s2.complete(lease, [i.id for i in lease.items], {})
    assert len(got) == salvaged["readings"]
    assert all(r.value == r.id - 1 for r in got)  # each reading kept its own id and value
    await s2.ingest([Reading("s1", now_ms(), 1)], durable=True)
    await close(s2, t2)


async def test_a_newer_schema_is_not_touched_but_moved_aside(cfg: StoreConfig) -> None:
    with sqlite3.connect(cfg.path) as raw:
        raw.execute("CREATE TABLE future (x)")
        raw.execute("PRAGMA user_version = 99")
    s, t = await opened(cfg, {"a": ["s1"]})
    assert "newer" in s.stats()["events"][0]["detail"]
    await close(s, t)


async def test_concurrent_completions_keep_every_mark(store: Store) -> None:
    t = now_ms()
    await store.ingest([Reading("s1", t + i, i) for i in range(200)], durable=True)
    leases = [await store.lease("a", 50, live_first=False) for _ in range(4)]
    assert all(lease is not None for lease in leases)
    await asyncio.gather(
        *(
            store.complete(lease, [i.id for i in lease.items], {})  # type: ignore[union-attr]
            for lease in leases
        )
    )
    assert await store.lease("a", 10) is None
    assert store.uplink_stats("a")["backlog"] == 0
    # And as persisted: a reopened store agrees.
    assert store.done_floor("a") >= 200


async def test_ids_are_never_reused_after_everything_was_delivered_and_pruned(
    cfg: StoreConfig,
) -> None:
    s, t = await opened(cfg, {"a": ["s1"]})
    await s.ingest([Reading("s1", now_ms() + i, i) for i in range(5)], durable=True)
    lease = await s.lease("a", 10)
    assert lease is not None
    await s.complete(lease, [i.id for i in lease.items], {})
    await s.maintain()
    assert s.stats()["readings_stored"] == 0  # delivered and pruned: the table is empty
    await close(s, t)
    s2, t2 = await opened(cfg, {"a": ["s1"]})
    await s2.ingest([Reading("s1", now_ms() + 10, 99)], durable=True)
    lease = await s2.lease("a", 10)
    assert lease is not None and [i.value for i in lease.items] == [99]
    await close(s2, t2)


async def test_a_batch_committed_while_its_task_was_cancelled_commits_again_harmlessly(
    cfg: StoreConfig,
) -> None:
    s, t = await opened(cfg, {"a": ["s1"]})
    batch = [Reading("s1", now_ms() + i, i) for i in range(3)]
    s._buffer.extend(batch)
    s._buffered += 3
    await s._commit_batch(list(batch), 3)  # committed ...
    s._max_id -= 3  # ... but as if the awaiting task was cancelled before its bookkeeping
    s._buffer[:0] = batch
    s._buffered += 3
    await s.ingest([], durable=False)
    await s._commit_buffer()
    assert s.last_commit_error is None
    lease = await s.lease("a", 10, live_first=False)
    assert lease is not None and [i.value for i in lease.items] == [0, 1, 2]
    await close(s, t)


async def test_an_uplink_routed_every_known_series_still_skips_a_series_added_later(
    cfg: StoreConfig,
) -> None:
    # "a" is routed every series the store knows, so its queries drop the series filter
    # (bench/e2e.py: a 25,000-entry IN list cost every lease). A series no uplink routes, first
    # seen later, must bring the filter back before its first reading is committed.
    s, t = await opened(cfg, {"a": ["s1", "s2"]})
    try:
        ts = now_ms()
        await s.ingest([Reading("s1", ts, 1), Reading("s2", ts, 2)], durable=True)
        assert s.series_sql("a") == "1"
        await s.ingest([Reading("s9", ts, 9), Reading("s1", ts + 1, 3)], durable=True)
        assert s.series_sql("a").startswith("series IN")
        la = await s.lease("a", 10, live_first=False)
        assert la is not None
        assert [(i.series, i.value) for i in la.items] == [("s1", 1), ("s2", 2), ("s1", 3)]
        assert s.uplink_stats("a")["backlog"] == 3
        await s.complete(la, [i.id for i in la.items], {})
        assert await s.lease("a", 10) is None
    finally:
        await close(s, t)


async def test_a_pattern_route_takes_series_as_they_appear_and_after_a_restart(
    cfg: StoreConfig,
) -> None:
    s, t = await opened(cfg, {"a": ["u*.r*", "x"], "b": ["u1.r0"]})
    ts = now_ms()
    try:
        await s.ingest(
            [
                Reading("u1.r0", ts, 1),
                Reading("u2.r5", ts, 2),
                Reading("v1.r0", ts, 3),
                Reading("x", ts, 4),
            ],
            durable=True,
        )
        assert s.uplink_stats("a")["backlog"] == 3 and s.uplink_stats("b")["backlog"] == 1
        la = await s.lease("a", 10, live_first=False)
        assert la is not None
        assert [i.series for i in la.items] == ["u1.r0", "u2.r5", "x"]
    finally:
        await close(s, t)
    # Reopened: the pattern matches the series already in the file.
    s, t = await opened(cfg, {"a": ["u*.r*", "x"], "b": ["u1.r0"]})
    try:
        assert s.uplink_stats("a")["backlog"] == 3
        la = await s.lease("a", 10, live_first=False)
        assert la is not None and [i.series for i in la.items] == ["u1.r0", "u2.r5", "x"]
    finally:
        await close(s, t)
