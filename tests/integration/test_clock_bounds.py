"""Implausible timestamps (issue 12) through a real store: what is rejected never reaches the
readings table, and the repair at sync moves the gateway's own unsynchronised stamps but not a
logger's own times kept meanwhile. The clocks are tests/test_clock.py's fakes; no sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.clock import REPAIRED, UNSYNCED, Clock
from gateway.config import StoreConfig
from gateway.models import Reading, StoredReading
from gateway.store import Store
from tests.integration.test_clock_repair import clock_for
from tests.test_clock import NINES, REAL, FakeTime

SERIES = ["log.temp", "gw.level"]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(StoreConfig(path=tmp_path / "q.db", commit_interval_ms=10), {"u": SERIES})
    writer = asyncio.create_task(s.run(), name="store:writer")
    yield s
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await s.aclose()


async def everything(store: Store) -> list[StoredReading]:
    await store.flush()
    lease = await store.lease("u", 1000, live_first=False)
    assert lease is not None
    items = list(lease.items)
    store.release(lease)
    return items


async def test_a_9999_line_never_reaches_the_store_and_the_series_goes_on(store: Store) -> None:
    t = FakeTime(REAL, synced=True)
    clock = clock_for(t, "boot-1")
    await clock.start(store)
    sent = []
    for k in range(4):
        t.advance(1000)
        ts = NINES if k == 1 else t.wall
        sent.append(ts)
        await store.ingest([Reading("log.temp", ts, float(k))], prepare=clock.stamp, durable=True)
    got = await everything(store)
    assert [(i.ts, i.value, i.quality) for i in got] == [
        (sent[0], 0.0, 0),
        (sent[2], 2.0, 0),
        (sent[3], 3.0, 0),
    ]
    assert clock.status()["rejected_timestamps"] == {"future": 1, "past": 0}


async def test_the_repair_moves_the_gateway_s_stamps_not_a_logger_s_own_times(
    store: Store,
) -> None:
    t = FakeTime(10_000)  # booted at 1970, no RTC
    clock: Clock = clock_for(t, "boot-1")
    await clock.start(store)
    logger = REAL - 60_000  # the logger's battery clock: right
    gw_taken = []
    for k in range(3):
        t.advance(1000)
        logger += 1000
        gw_taken.append(t.mono)
        await store.ingest(
            [Reading("log.temp", logger, float(k)), Reading("gw.level", t.wall, float(k))],
            prepare=clock.stamp,
            durable=True,
        )
    true_offset = REAL - t.mono
    t.step(true_offset - (t.wall - t.mono))  # NTP
    t.synced = True
    for _ in range(2):
        t.advance(500)
        await clock.tick()
    assert clock.synchronized and clock.repaired_total == 3
    got = await everything(store)
    own = [(i.ts, i.quality) for i in got if i.series == "log.temp"]
    ours = [(i.ts, i.quality) for i in got if i.series == "gw.level"]
    assert own == [(logger - 2000, 0), (logger - 1000, 0), (logger, 0)]
    assert ours == [(m + true_offset, REPAIRED) for m in gw_taken]
    assert not any(i.quality & UNSYNCED for i in got)
    assert clock.status()["rejected_timestamps"] == {"future": 0, "past": 0}
