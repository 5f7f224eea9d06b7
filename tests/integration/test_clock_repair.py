"""Clock repair end to end: a real store, the real dispatcher and the Qatium emulator over HTTP.

The wall and monotonic clocks and the sync probe are fakes (tests/test_clock.py's FakeTime): a
boot with a wrong clock, the NTP step and the sync happen when the test says, with no sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.clock import REPAIRED, UNSYNCED, Clock, ClockState
from gateway.config import ClockConfig, Secret, StoreConfig, load_config_text
from gateway.models import Reading
from gateway.sandbox.qatium import QatiumEmulator
from gateway.store import Store
from gateway.uplinks.dispatch import UplinkRunner
from gateway.uplinks.qatium.config import QatiumConfig
from gateway.uplinks.qatium.uplink import QatiumUplink, iso_time
from tests.test_clock import DAY, REAL, FakeTime

SERIES = "tank1.level"
TOKEN = "clock-test-token-123"
NETWORK = {"Tank1": "tank"}


def qcfg(url: str, **kw: object) -> QatiumConfig:
    return QatiumConfig.model_validate(
        {
            "name": "qatium",
            "type": "qatium",
            "url": f"{url}/ingest",
            "token": {"env": "UNUSED"},
            "routes": [{"series": SERIES, "asset": "Tank1", "metric": "level", "unit": "m"}],
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
            "timeout_s": 5,
            "job_poll_s": 0.05,
            **kw,
        }
    )


class Rig:
    """One store, its clock and one Qatium uplink runner against the emulator."""

    def __init__(
        self, t: FakeTime, store: Store, clock: Clock, runner: UplinkRunner, emu: QatiumEmulator
    ) -> None:
        self.t, self.store, self.clock, self.runner, self.emu = t, store, clock, runner, emu
        self.writer = asyncio.create_task(store.run(), name="store:writer")
        self.task: asyncio.Task[None] | None = None
        #: Monotonic time (ms) at which each reading was taken, in order.
        self.taken: list[int] = []

    def start(self) -> None:
        self.task = asyncio.create_task(self.runner.run(), name="uplink:qatium")

    async def take(self, n: int, every_ms: int = 1000) -> None:
        """A source takes ``n`` readings, stamped by the wall clock, through the clock's stamp."""
        for k in range(n):
            self.t.advance(every_ms)
            self.taken.append(self.t.mono)
            r = Reading(SERIES, self.t.wall, round(2 + len(self.taken) / 100, 3))
            await self.store.ingest([r], prepare=self.clock.stamp, durable=k == n - 1)

    async def ntp_sync(self, true_offset: int) -> None:
        """NTP steps the clock to the truth, then says so; the clock task looks twice."""
        self.t.step(true_offset - (self.t.wall - self.t.mono))
        self.t.synced = True
        for _ in range(2):
            self.t.advance(500)
            await self.clock.tick()
        assert self.clock.synchronized

    async def until(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.store.wait_for_data(0.05)

    async def stop(self) -> None:
        for task in (self.task, self.writer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.runner.uplink.aclose()
        await self.store.aclose()


MakeRig = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[MakeRig]:
    made: list[Rig] = []
    emus: list[QatiumEmulator] = []

    async def make(t: FakeTime, *, boot: str = "boot-1", db: str = "q.db", **cfg_kw: object) -> Rig:
        emu = QatiumEmulator(token=TOKEN, assets=NETWORK)
        await emu.start()
        emus.append(emu)
        cfg = qcfg(emu.url, **cfg_kw)
        # REAL (tests/test_clock.py) is a fixed date that ages: retention must not evict the
        # readings these tests stamp with it while they wait for their turn to be sent.
        store = await Store.open(
            StoreConfig(path=tmp_path / db, commit_interval_ms=10, retention_days=36_500),
            {"qatium": cfg.routed_series()},
        )
        clock = clock_for(t, boot)
        await clock.start(store)
        runner = UplinkRunner(QatiumUplink(cfg, Secret(TOKEN, "test")), cfg, store, clock)
        r = Rig(t, store, clock, runner, emu)
        made.append(r)
        return r

    yield make
    for r in made:
        await r.stop()
    for emu in emus:
        await emu.aclose()


def clock_for(t: FakeTime, boot: str, **cfg: Any) -> Clock:
    return Clock(
        ClockConfig(**cfg),
        wall_ns=lambda: t.wall * 1_000_000,
        mono_ns=lambda: t.mono * 1_000_000,
        probe=lambda: ClockState(t.synced, "fake", t.wall / 1000),
        boot_id=lambda: boot,
    )


def times(emu: QatiumEmulator) -> list[str]:
    """Row times in time order (live-first delivery sends the newest lease first)."""
    return sorted(str(row["time"]) for row in emu.rows)


async def test_unsynchronised_readings_are_held_then_sent_with_repaired_times(
    rig: MakeRig,
) -> None:
    t = FakeTime(REAL - 2 * DAY - 123_456)  # fake-hwclock: the last shutdown, some days ago
    r = await rig(t)
    await r.take(5)
    counted = {"leases": 0}
    real_lease = r.store.lease

    async def counting_lease(*a: Any, **kw: Any) -> Any:
        counted["leases"] += 1
        return await real_lease(*a, **kw)

    r.store.lease = counting_lease  # type: ignore[method-assign]
    r.start()
    await r.until(lambda: r.store.held_from("qatium") is not None)
    assert r.emu.total_requests == 0
    assert r.runner.status()["clock_hold_from_id"] is not None
    await r.clock.tick()
    assert r.clock.status()["unsynced_pending"] == 5
    # Held, not polled: the worker waits for data like an idle one (no hot loop, no backoff).
    before = counted["leases"]
    # The window is the measurement, not a synchronisation: a hot loop leases thousands of
    # times in half a second, an idle worker at most once or twice.
    await asyncio.sleep(0.5)
    assert counted["leases"] - before <= 2
    assert r.runner.state.value == "ok"

    await r.take(2)  # more readings while still unsynchronised: held as well
    true_offset = REAL + 50_000 - t.mono
    wrong_offset = t.wall - t.mono
    await r.ntp_sync(true_offset)
    await r.until(lambda: len(r.emu.rows) >= 7)
    assert times(r.emu) == [iso_time(m + true_offset) for m in r.taken]
    assert r.clock.status()["repaired_total"] == 7
    assert r.clock.status()["last_step_s"] == (true_offset - wrong_offset) / 1000

    # After the sync: stamped by the wall clock, after the repaired ones, sent at once.
    await r.take(1)
    await r.until(lambda: len(r.emu.rows) >= 8)
    assert times(r.emu)[-1] == iso_time(t.wall) == r.emu.rows[-1]["time"]
    await r.until(lambda: r.store.uplink_stats("qatium")["backlog"] == 0)
    await r.clock.tick()
    assert r.clock.status()["unsynced_pending"] == 0


async def test_a_non_holding_uplink_sends_them_at_once_with_the_clock_s_time(
    rig: MakeRig,
) -> None:
    t = FakeTime(REAL - 2 * DAY)
    r = await rig(t, hold_unsynced=False)
    await r.take(3)
    wrong = [iso_time(m + REAL - 2 * DAY - 5_000) for m in r.taken]  # FakeTime's mono starts at 5 s
    r.start()
    await r.until(lambda: len(r.emu.rows) >= 3)
    assert times(r.emu) == wrong  # the flag has no place in a Qatium row
    await r.until(lambda: r.store.uplink_stats("qatium")["backlog"] == 0)
    # Sent is sent: the repair does not send them again.
    await r.ntp_sync(REAL - t.mono)
    await r.take(1)
    await r.until(lambda: len(r.emu.rows) >= 4)
    assert len(r.emu.rows) == 4


async def test_a_1970_timestamp_is_never_sent_even_without_holding(rig: MakeRig) -> None:
    t = FakeTime(60_000)  # no RTC, no fake-hwclock: the epoch
    r = await rig(t, hold_unsynced=False)
    await r.take(3)
    r.start()
    await r.until(lambda: r.store.held_from("qatium") is not None)
    assert r.emu.total_requests == 0
    true_offset = REAL - t.mono
    await r.ntp_sync(true_offset)
    await r.until(lambda: len(r.emu.rows) >= 3)
    assert times(r.emu) == [iso_time(m + true_offset) for m in r.taken]


async def test_buffered_and_committed_readings_are_repaired_alike(tmp_path: Path) -> None:
    t = FakeTime(REAL - DAY)
    store = await Store.open(
        StoreConfig(path=tmp_path / "q.db", commit_interval_ms=10), {"u": [SERIES]}
    )
    clock = clock_for(t, "boot-1")
    await clock.start(store)
    writer = asyncio.create_task(store.run())
    taken = []
    for _ in range(3):
        t.advance(1000)
        taken.append(t.mono)
        await store.ingest([Reading(SERIES, t.wall, 1.0)], prepare=clock.stamp, durable=True)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    for _ in range(2):  # no writer: these stay in the buffer
        t.advance(1000)
        taken.append(t.mono)
        await store.ingest([Reading(SERIES, t.wall, 2.0)], prepare=clock.stamp)
    assert store.stats()["buffered"] == 2
    t.step(DAY + 777)
    t.synced = True
    await clock.tick()
    await clock.tick()
    assert clock.synchronized
    offset = t.wall - t.mono
    writer = asyncio.create_task(store.run())
    await store.flush()
    lease = await store.lease("u", 10, live_first=False)
    assert lease is not None
    assert [i.ts for i in lease.items] == [m + offset for m in taken]
    assert all(i.quality == REPAIRED for i in lease.items)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await store.aclose()


async def test_a_restart_in_the_same_boot_still_repairs_and_another_boot_cannot(
    tmp_path: Path,
) -> None:
    cfg = StoreConfig(path=tmp_path / "q.db", commit_interval_ms=10)
    routes = {"u": [SERIES]}
    t = FakeTime(REAL - DAY)
    store = await Store.open(cfg, routes)
    clock = clock_for(t, "boot-1")
    await clock.start(store)
    writer = asyncio.create_task(store.run())
    taken = []
    for _ in range(3):
        t.advance(1000)
        taken.append(t.mono)
        await store.ingest([Reading(SERIES, t.wall, 1.0)], prepare=clock.stamp, durable=True)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await store.aclose()

    # The process restarts; meanwhile the clock was stepped and synced.
    t.advance(30_000)
    t.step(DAY + 4242)
    t.synced = True
    store = await Store.open(cfg, routes)
    clock = clock_for(t, "boot-1")
    await clock.start(store)
    offset = t.wall - t.mono
    lease = await store.lease("u", 10, live_first=False)
    assert lease is not None
    assert [(i.ts, i.quality) for i in lease.items] == [(m + offset, REPAIRED) for m in taken]
    store.release(lease)

    # Readings left unsynchronised by one boot cannot be repaired in the next.
    t2 = FakeTime(REAL - 5 * DAY)
    clock = clock_for(t2, "boot-1")
    writer = asyncio.create_task(store.run())
    await store.ingest([Reading(SERIES, t2.wall, 3.0)], prepare=clock.stamp, durable=True)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await store.aclose()
    store = await Store.open(cfg, routes)
    t3 = FakeTime(REAL, synced=True)
    clock = clock_for(t3, "boot-2")
    await clock.start(store)
    lease = await store.lease("u", 10, live_first=False)
    assert lease is not None
    [old] = [i for i in lease.items if i.value == 3.0]
    assert old.quality == UNSYNCED and old.ts == t2.wall
    gate = clock.gate(lease.items, hold_unsynced=True)
    assert gate.hold_from is None and list(gate.rejected) == [old.id]
    store.release(lease)
    await store.aclose()


GATEWAY_CONFIG = """
[store]
path = "{tmp}/fg.db"
commit_interval_ms = 20
[health]
port = 0
[[sources]]
name = "tank"
type = "synthetic"
interval_s = 0.05
[[sources.series]]
name = "tank1.level"
[[uplinks]]
name = "qatium"
type = "qatium"
url = "{url}/ingest"
token = {{ value = "{token}", plain_text = true }}
backoff_initial_s = 0.05
backoff_max_s = 0.2
[[uplinks.routes]]
series = "tank1.level"
asset = "Tank1"
metric = "level"
unit = "m"
"""


async def test_the_gateway_shows_the_clock_holds_and_releases(tmp_path: Path) -> None:
    # The synthetic source stamps with the real wall clock, the clock service reads the fake
    # one: they must agree (as the one system clock does in production), or the source's times
    # are days "ahead" of the clock and judged a source's own (gateway/clock.py).
    t = FakeTime(time.time_ns() // 1_000_000)
    clock = clock_for(t, "boot-1", check_interval_s=0.05)
    async with QatiumEmulator(token=TOKEN, assets=NETWORK) as emu:
        loaded = load_config_text(GATEWAY_CONFIG.format(tmp=tmp_path, url=emu.url, token=TOKEN))
        gw = Gateway(loaded, clock=clock)
        task = asyncio.create_task(gw.run(), name="gateway")
        try:
            async with asyncio.timeout(20):
                await gw.ready.wait()
            assert gw.health_server is not None
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{gw.health_server.port}"
            ) as client:

                async def status_until(pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
                    async with asyncio.timeout(20):
                        while True:
                            st: dict[str, Any] = (await client.get("/status")).json()
                            if pred(st):
                                return st
                            await gw.store.wait_for_data(0.05)  # type: ignore[union-attr]

                st = await status_until(
                    lambda s: (
                        s["clock"]["unsynced_pending"] >= 5
                        and s["uplinks"]["qatium"]["clock_hold_from_id"]
                    )
                )
                assert st["clock"]["synchronized"] is False
                assert st["clock"]["source"] == "fake"
                assert st["uplinks"]["qatium"]["delivered"] == 0
                assert emu.total_requests == 0
                t.step(DAY)
                st = await status_until(lambda s: s["clock"]["steps_total"] == 1)
                assert st["clock"]["last_step_s"] == DAY / 1000
                t.synced = True
                st = await status_until(lambda s: s["uplinks"]["qatium"]["delivered"] >= 5)
                assert st["clock"]["synchronized"] is True
                assert st["clock"]["repaired_total"] >= 5
                text = (await client.get("/metrics")).text
                fams = {f.name: f for f in text_string_to_metric_families(text)}
                assert fams["fieldgate_clock_synchronized"].samples[0].value == 1
                assert fams["fieldgate_clock_steps"].samples[0].value == 1
                assert "fieldgate_clock_unsynced_pending" in fams
        finally:
            gw.stop_event.set()
            assert await task == 0
