"""Changing the uplinks of a running store (a config reload, issue 15): ``Store.set_routes`` and
``Store.drop_leases`` against a real SQLite file with its writer running."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.models import Reading
from gateway.store import Store


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def cfg(tmp_path: Path) -> StoreConfig:
    return StoreConfig(path=tmp_path / "q.db", commit_interval_ms=20)


@pytest.fixture
async def store(cfg: StoreConfig) -> AsyncIterator[Store]:
    s = await Store.open(cfg, {"a": ["s1", "s2"], "b": ["s2"]})
    task = asyncio.create_task(s.run(), name="store:writer")
    yield s
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await s.aclose()


async def take_all(store: Store, uplink: str) -> list[tuple[str, object]]:
    """Lease and deliver everything pending for ``uplink``; (series, value) in capture order."""
    out: list[tuple[str, object]] = []
    while (lease := await store.lease(uplink, 1000, live_first=False)) is not None:
        out.extend((i.series, i.value) for i in lease.items)
        await store.complete(lease, [i.id for i in lease.items], {})
    return out


async def test_an_added_uplink_takes_what_is_committed_from_then_on(store: Store) -> None:
    t = now_ms()
    await store.ingest([Reading("s1", t, 1), Reading("s2", t, 2)], durable=True)
    await store.set_routes({"a": ["s1", "s2"], "b": ["s2"], "c": ["s1", "s2"]})
    assert store.uplink_names == ["a", "b", "c"]
    assert store.uplink_stats("c")["backlog"] == 0
    await store.ingest([Reading("s1", t + 1, 3), Reading("s2", t + 1, 4)], durable=True)
    assert store.uplink_stats("c")["backlog"] == 2
    assert await take_all(store, "c") == [("s1", 3), ("s2", 4)]
    assert await take_all(store, "a") == [("s1", 1), ("s2", 2), ("s1", 3), ("s2", 4)]


async def test_a_removed_uplink_no_longer_keeps_readings_and_resumes_when_added_again(
    store: Store,
) -> None:
    t = now_ms()
    await store.ingest([Reading("s2", t + i, i) for i in range(4)], durable=True)
    lease = await store.lease("b", 2, live_first=False)
    assert lease is not None
    await store.complete(lease, [i.id for i in lease.items], {})  # b took 0 and 1
    await take_all(store, "a")
    await store.maintain()
    assert store.stats()["readings_stored"] == 2  # b still needs 2 and 3

    await store.set_routes({"a": ["s1", "s2"]})
    assert store.uplink_names == ["a"]
    await store.ingest([Reading("s2", t + 10, 10)], durable=True)
    await take_all(store, "a")
    await store.maintain()
    assert store.stats()["readings_stored"] == 0  # nothing waits for b any more

    # b comes back: from where its row left it (as a restart would), not from scratch.
    await store.ingest([Reading("s2", t + 20, 20)], durable=True)
    await store.set_routes({"a": ["s1", "s2"], "b": ["s2"]})
    assert store.uplink_stats("b")["delivered"] == 2
    assert await take_all(store, "b") == [("s2", 20)]


async def test_a_rerouted_uplink_takes_its_new_series_and_leaves_the_old(store: Store) -> None:
    t = now_ms()
    await store.ingest([Reading("s1", t, 1), Reading("s2", t, 2)], durable=True)
    assert store.uplink_stats("b")["backlog"] == 1
    await store.set_routes({"a": ["s1", "s2"], "b": ["s1", "s3"]})
    # Pending for b and now routed to it: s1's reading; s2's no longer.
    assert store.uplink_stats("b")["backlog"] == 1
    await store.ingest([Reading("s2", t + 1, 3), Reading("s3", t + 1, 4)], durable=True)
    assert store.uplink_stats("b")["backlog"] == 2
    assert await take_all(store, "b") == [("s1", 1), ("s3", 4)]
    assert store.series_sql("b").startswith("series IN (")


async def test_a_lease_left_out_by_a_cancelled_runner_is_pending_after_drop_leases(
    store: Store,
) -> None:
    await store.ingest([Reading("s1", now_ms() + i, i) for i in range(5)], durable=True)
    lost = await store.lease("a", 10, live_first=False)
    assert lost is not None and len(lost.items) == 5
    assert await store.lease("a", 10, live_first=False) is None  # all leased out
    store.drop_leases("a")  # its runner is gone: the lease will never come back
    assert [v for _, v in await take_all(store, "a")] == [0, 1, 2, 3, 4]


async def test_set_routes_while_readings_are_committed_counts_every_one(store: Store) -> None:
    """Commits go on while the routes change; every reading is counted once for each uplink
    it is routed to, and leased once."""
    t = now_ms()
    rerouted = asyncio.Event()
    produced = 0

    async def produce() -> None:
        nonlocal produced
        more = 50  # readings after the last change
        while more:
            await store.ingest([Reading("s1", t + produced, produced)])
            await store.ingest([Reading("s2", t + produced, produced)])
            produced += 1
            more -= rerouted.is_set()
            if produced % 10 == 0:
                await store.flush()  # a commit between batches: re-routing meets it mid-way

    producer = asyncio.create_task(produce())
    await store.set_routes({"a": ["s1", "s2"], "b": ["s1", "s2"]})
    await store.set_routes({"a": ["s1"], "b": ["s1", "s2"], "c": ["s2"]})
    rerouted.set()
    await producer
    await store.flush()
    for name in ("a", "b", "c"):
        backlog = store.uplink_stats(name)["backlog"]
        got = await take_all(store, name)
        assert len(got) == len(set(got)) == backlog, name
        assert store.uplink_stats(name)["backlog"] == 0
    # c was added while s2 was being produced: it has an unbroken tail of s2.
    assert got and {s for s, _ in got} == {"s2"}
    values = [v for _, v in got]
    assert len(values) >= 50 and values == list(range(produced - len(values), produced))
