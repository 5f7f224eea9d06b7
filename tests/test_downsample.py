"""Per-series minimum interval: aligned windows, aggregates, held open windows, late readings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.configbase import RouteBase, StoreConfig, UplinkConfigBase
from gateway.models import Reading, StoredReading
from gateway.routes import RouteTable
from gateway.store import Store
from gateway.uplinks.base import Outcome, SendResult
from gateway.uplinks.dispatch import UplinkRunner
from gateway.uplinks.downsample import Downsampler

from .test_dispatch import RuleUplink

MIN = 60_000


def sr(i: int, ts: int, v: float, series: str = "s") -> StoredReading:
    return StoredReading(i, series, ts, v)


def route(mode: str = "last", every: float = 60) -> dict[str, RouteBase]:
    return {"s": RouteBase(series="s", min_interval_s=every, downsample=mode)}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "expected"), [("last", 3.0), ("mean", 2.0), ("min", 1.0), ("max", 3.0)]
)
def test_closed_window_becomes_one_aggregate_at_the_window_start(
    mode: str, expected: float
) -> None:
    d = Downsampler(route(mode))
    t0 = 1_700_000_040_000  # a minute boundary
    items = [
        sr(1, t0 + 5_000, 1.0),
        sr(2, t0 + 20_000, 2.0),
        sr(3, t0 + 59_000, 3.0),
        sr(4, t0 + MIN + 1, 9.0),
    ]
    plan = d.plan(items, now_ms=t0 + MIN + 2)
    [agg] = plan.send
    assert (agg.id, agg.ts, agg.value) == (3, t0, expected)
    assert sorted(plan.members[3]) == [1, 2]
    assert plan.held == [4]  # the next window is still open
    assert plan.recheck_s == (t0 + 3 * MIN - (t0 + MIN + 2)) / 1000  # its end plus a grace


def test_window_closes_by_the_clock_without_later_data() -> None:
    d = Downsampler(route())
    t0 = 1_700_000_040_000
    assert d.plan([sr(1, t0 + 1, 1.0)], now_ms=t0 + MIN + 10).held == [1]
    plan = d.plan([sr(1, t0 + 1, 1.0)], now_ms=t0 + 2 * MIN)
    assert [a.id for a in plan.send] == [1]


def test_a_replayed_window_stays_open_while_its_series_is_being_captured() -> None:
    # A logger replaying its memory: the window ended hours ago by the wall clock, but the series
    # was captured a second ago, so more of its readings may be on the way.
    d = Downsampler(route("mean"))
    t0 = 1_700_000_040_000
    now = t0 + 180 * MIN
    items = [sr(1, t0 + 1_000, 1.0), sr(2, t0 + 30_000, 2.0)]
    plan = d.plan(items, now_ms=now, quiet_s=lambda s: 1.0)
    assert plan.send == [] and plan.held == [1, 2]
    assert plan.recheck_s == 59.0  # closes after a grace of quiet (one window here)
    # The next window's first reading is in hand: the first window closes with both readings.
    plan = d.plan([*items, sr(3, t0 + MIN, 7.0)], now_ms=now, quiet_s=lambda s: 0.0)
    [agg] = plan.send
    assert (agg.ts, agg.value, plan.held) == (t0, 1.5, [3])
    # Quiet for the grace: the last window closes too.
    plan = d.plan([sr(3, t0 + MIN, 7.0)], now_ms=now, quiet_s=lambda s: 60.0)
    assert [(a.ts, a.value) for a in plan.send] == [(t0 + MIN, 7.0)]


def test_a_live_window_stays_open_until_its_end_even_when_the_series_is_quiet() -> None:
    # An hourly mean of a source polled every 10 minutes: quiet for longer than the grace
    # (5 min) inside a window that has not ended.
    d = Downsampler(route("mean", every=3600))
    t0 = 1_700_000_000_000 - 1_700_000_000_000 % 3_600_000
    plan = d.plan([sr(1, t0 + 600_000, 1.0)], now_ms=t0 + 1_200_000, quiet_s=lambda s: 600.0)
    assert plan.held == [1]
    assert plan.recheck_s == pytest.approx(3600 - 1200 + 300)


def test_late_reading_for_a_sent_window_is_dead_lettered() -> None:
    d = Downsampler(route())
    t0 = 1_700_000_040_000
    plan = d.plan([sr(1, t0, 1.0), sr(2, t0 + MIN, 2.0)], now_ms=t0 + 10 * MIN)
    for a in plan.send:
        d.mark_sent(a)
    late = d.plan([sr(3, t0 + 30_000, 5.0)], now_ms=t0 + 10 * MIN)
    assert list(late.late) == [3] and late.send == []


def test_series_without_interval_pass_through_untouched() -> None:
    d = Downsampler({"s": RouteBase(series="s")})
    items = [sr(1, 5, 1.0), sr(2, 6, 2.0)]
    assert not d.active
    assert d.plan(items, now_ms=10).send == items


@given(st.lists(st.tuples(st.integers(0, 10 * MIN), st.floats(-1e6, 1e6)), min_size=1, max_size=60))
def test_never_two_values_in_one_window_and_every_reading_accounted(
    data: list[tuple[int, float]],
) -> None:
    d = Downsampler(route("mean"))
    items = [sr(i + 1, ts, v) for i, (ts, v) in enumerate(sorted(data))]
    plan = d.plan(items, now_ms=100 * MIN)
    starts = [a.ts for a in plan.send]
    assert len(starts) == len(set(starts))
    assert all(ts % MIN == 0 for ts in starts)
    accounted = {a.id for a in plan.send} | {i for m in plan.members.values() for i in m}
    assert accounted | set(plan.held) | set(plan.late) == {i.id for i in items}


class RoutedConfig(UplinkConfigBase):
    routes: list[RouteBase]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(
        StoreConfig(path=tmp_path / "q.db", commit_interval_ms=10), {"rule": ["s"]}
    )
    task = asyncio.create_task(s.run())
    yield s
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await s.aclose()


async def test_dispatcher_sends_one_value_per_window_and_accounts_for_all(store: Store) -> None:
    up = RuleUplink()
    cfg = RoutedConfig(
        name="rule",
        rate_limit_requests=0,
        routes=[RouteBase(series="s", min_interval_s=60, downsample="max")],
    )
    r = UplinkRunner(up, cfg, store)  # type: ignore[arg-type]
    now = int(time.time() * 1000)
    t0 = now - now % MIN - 10 * MIN  # ten closed windows ago
    values = [(t0 + k * 6_000, float(k)) for k in range(100)]  # 10 per minute, 10 minutes
    # and the first reading of an 11th window, which closes the 10th (captured just now, the
    # 10th would otherwise wait for a grace of quiet)
    await store.ingest(
        [Reading("s", ts, v) for ts, v in [*values, (t0 + 10 * MIN, 100.0)]], durable=True
    )
    lease = await store.lease("rule", 1000, live_first=False)
    assert lease is not None
    await r.process(lease)
    assert up.received == [float(k) for k in range(9, 100, 10)]  # the max of each window
    assert store.uplink_stats("rule")["backlog"] == 1  # the 11th window is still open
    assert store.uplink_stats("rule")["delivered"] == 100
    # The windows handed out survive a restart (no second value for a window after a crash).
    assert store.uplink_state("rule")["windows"]["s"] == t0 + 9 * MIN


async def run_until_drained(store: Store, r: UplinkRunner, total: int) -> None:
    task = asyncio.create_task(r.run())
    try:
        async with asyncio.timeout(30):
            while (
                store.uplink_stats("rule")["delivered"] + store.uplink_stats("rule")["dead_letters"]
                < total
            ):
                await store.wait_for_data(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("window_s", [60, 600])
async def test_backlog_in_small_leases_is_never_late_nor_split(store: Store, window_s: int) -> None:
    # Default order is live_first; the runner must still hand windows out in order, whole, even
    # when a window holds more readings than a lease (600 s: 100 readings, leases of 30).
    up = RuleUplink()
    cfg = RoutedConfig(
        name="rule",
        rate_limit_requests=0,
        batch_max_items=3,
        routes=[RouteBase(series="s", min_interval_s=window_s, downsample="mean")],
    )
    r = UplinkRunner(up, cfg, store)  # type: ignore[arg-type]
    w = window_s * 1000
    now = int(time.time() * 1000)
    t0 = now - now % w - 7 * w  # every window closed, grace included
    n = 5 * w // 6_000
    # Plus the first reading of a sixth window: it closes the fifth (the data was captured just
    # now, so without a later reading in hand the fifth would wait for a grace of quiet).
    await store.ingest([Reading("s", t0 + k * 6_000, float(k)) for k in range(n + 1)], durable=True)
    await run_until_drained(store, r, n)
    per = w // 6_000
    assert up.received == [sum(range(i * per, (i + 1) * per)) / per for i in range(5)]
    assert await store.dead_letters("rule") == []
    assert store.uplink_stats("rule")["backlog"] == 1  # the sixth window is still open


class GroupUplink(RuleUplink):
    """Requests must carry whole groups (like one NILU packet per sensor and instant)."""

    def sends_whole_groups(self) -> bool:
        return True

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[list[float]] = []

    def group_key(self, item: StoredReading) -> object:
        return item.ts

    async def send(self, batch):  # type: ignore[no-untyped-def]
        self.groups.append(sorted(float(i.value) for i in batch))
        return await super().send(batch)


async def test_a_cut_lease_never_splits_a_group(store: Store) -> None:
    up = GroupUplink()
    r = runner_for(store, up, batch_max_items=9)
    t0 = int(time.time() * 1000) - 100_000
    # 10 instants x 2 parameters; leases of 9 readings end in the middle of an instant.
    await store.ingest(
        [Reading("s", t0 + k * 1000, float(k * 10 + p)) for k in range(10) for p in range(2)],
        durable=True,
    )
    await run_until_drained(store, r, 20)
    assert sorted(up.groups) == [[k * 10.0, k * 10.0 + 1] for k in range(10)]


def runner_for(store: Store, up: RuleUplink, **kw: object) -> UplinkRunner:
    cfg = UplinkConfigBase(name="rule", rate_limit_requests=0, **kw)  # type: ignore[arg-type]
    return UplinkRunner(up, cfg, store)  # type: ignore[arg-type]


class FailOldest(RuleUplink):
    """The first batch: the oldest window fails (transient), the newer ones are delivered."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_once = False

    async def send(self, batch):  # type: ignore[no-untyped-def]
        from gateway.uplinks.base import Failure

        if not self.failed_once and len(batch) > 1:
            self.failed_once = True
            oldest = min(batch, key=lambda i: i.ts)
            ok = [i for i in batch if i is not oldest]
            self.received.extend(float(i.value) for i in ok)
            return SendResult(
                delivered=[i.id for i in ok],
                failure=Failure(Outcome.TRANSIENT, "later", retry_after=0.01),
            )
        return await super().send(batch)


async def test_partial_failure_does_not_make_older_windows_late(store: Store) -> None:
    up = FailOldest()
    cfg = RoutedConfig(
        name="rule", rate_limit_requests=0, routes=[RouteBase(series="s", min_interval_s=60)]
    )
    r = UplinkRunner(up, cfg, store)  # type: ignore[arg-type]
    now = int(time.time() * 1000)
    t0 = now - now % MIN - 6 * MIN
    # 5 windows of 6 readings and the first reading of a sixth, which closes the fifth.
    await store.ingest([Reading("s", t0 + k * 10_000, float(k)) for k in range(31)], durable=True)
    await run_until_drained(store, r, 30)
    assert await store.dead_letters("rule") == []
    assert sorted(up.received) == [float(k) for k in range(5, 30, 6)]


def test_a_pattern_route_downsamples_each_series_it_takes_on_its_own() -> None:
    routes = RouteTable(
        [
            RouteBase(series="well*.level", min_interval_s=60, downsample="max"),
            RouteBase(series="well2.level"),
        ]
    )
    d = Downsampler(routes)
    assert d.active
    items = [
        StoredReading(i, s, 60_000 * k + i, float(i))
        for i, (s, k) in enumerate(
            [
                ("well1.level", 0),
                ("well1.level", 0),
                ("well2.level", 0),
                ("well3.level", 0),
                ("well1.level", 1),
                ("well3.level", 1),
            ],
            start=1,
        )
    ]
    plan = d.plan(items, now_ms=10 * 60_000)
    # well2.level has its own exact route (no window): sent as it is.
    assert [(a.series, a.value) for a in plan.send] == [
        ("well2.level", 3.0),
        ("well1.level", 2.0),
        ("well3.level", 4.0),
        ("well1.level", 5.0),
        ("well3.level", 6.0),
    ]
