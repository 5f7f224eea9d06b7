"""The shared delivery machinery's logic: bisection, splitting, outcomes, rate limiting.

The uplink here is an in-memory rule (refuses values it was told to refuse, refuses batches over
a size) so the dispatcher's own logic is what is under test; the real HTTP path is tested against
the emulators in tests/integration/.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Hashable, Mapping, Sequence
from pathlib import Path

import pytest

from gateway.config import StoreConfig, UplinkConfigBase
from gateway.models import Reading, StoredReading
from gateway.store import Store
from gateway.uplinks.base import Outcome, SendResult, Settle, SettlesEarly
from gateway.uplinks.dispatch import UplinkRunner, UplinkState
from gateway.uplinks.ratelimit import RateLimiter


class RuleUplink:
    """Refuses ``bad`` values without naming them (like a service answering 400 for the batch),
    answers 413 above ``max_batch``, and fails ``fail_next`` sends with ``fail_outcome``."""

    def __init__(self, bad: set[float] = frozenset(), max_batch: int = 10**9) -> None:  # type: ignore[assignment]
        self.name = "rule"
        self.bad = set(bad)
        self.max_batch = max_batch
        self.fail_next = 0
        self.fail_outcome = Outcome.TRANSIENT
        self.received: list[float] = []
        self.batches: list[int] = []

    @property
    def routes(self) -> Mapping[str, object]:
        return {"s": object()}

    def check(self, item: StoredReading) -> str | None:
        return "negative" if isinstance(item.value, float) and item.value < 0 else None

    def group_key(self, item: StoredReading) -> Hashable:
        return None

    def item_size(self, item: StoredReading) -> int:
        return 10

    async def send(self, batch: Sequence[StoredReading]) -> SendResult:
        self.batches.append(len(batch))
        if self.fail_next:
            self.fail_next -= 1
            return SendResult.failed(self.fail_outcome, "injected", retry_after=0.01)
        if len(batch) > self.max_batch:
            return SendResult.failed(Outcome.TOO_LARGE, "HTTP 413")
        if any(i.value in self.bad for i in batch):
            return SendResult.failed(Outcome.REJECTED, "HTTP 400: bad row")
        self.received.extend(float(i.value) for i in batch)  # type: ignore[arg-type]
        return SendResult.all_delivered(batch)

    async def aclose(self) -> None:
        return None


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


def runner(store: Store, uplink: RuleUplink, **kw: object) -> UplinkRunner:
    cfg = UplinkConfigBase(
        name="rule", rate_limit_requests=0, backoff_initial_s=0.01, backoff_max_s=0.02, **kw
    )  # type: ignore[arg-type]
    return UplinkRunner(uplink, cfg, store)  # type: ignore[arg-type]


async def fill(store: Store, values: list[float]) -> None:
    t = int(time.time() * 1000)
    await store.ingest([Reading("s", t + i, v) for i, v in enumerate(values)], durable=True)


async def drain(store: Store, r: UplinkRunner) -> None:
    while (lease := await store.lease("rule", r.batch_limit, live_first=False)) is not None:
        await r.process(lease)


async def test_bisection_isolates_each_refused_item_and_delivers_the_rest(store: Store) -> None:
    values = [float(i) for i in range(64)]
    up = RuleUplink(bad={5.0, 6.0, 40.0})
    r = runner(store, up, batch_max_items=64)
    await fill(store, values)
    await drain(store, r)
    assert sorted(up.received) == [v for v in values if v not in {5.0, 6.0, 40.0}]
    letters = await store.dead_letters("rule")
    assert sorted(d["value"] for d in letters) == [5.0, 6.0, 40.0]
    assert {d["reason"] for d in letters} == {"HTTP 400: bad row"}
    # Bisection, not one request per item: far fewer sends than items.
    assert len(up.batches) < 40
    assert store.uplink_stats("rule")["backlog"] == 0


async def test_local_check_dead_letters_without_a_request(store: Store) -> None:
    up = RuleUplink()
    r = runner(store, up)
    await fill(store, [-1.0, -2.0])
    await drain(store, r)
    assert up.batches == []
    assert [d["reason"] for d in await store.dead_letters("rule")] == ["negative", "negative"]


async def test_too_large_splits_and_lowers_the_batch_size(store: Store) -> None:
    up = RuleUplink(max_batch=10)
    r = runner(store, up, batch_max_items=100)
    await fill(store, [float(i) for i in range(100)])
    await drain(store, r)
    assert sorted(up.received) == [float(i) for i in range(100)]
    assert r.batch_limit <= 10
    assert await store.dead_letters("rule") == []


async def test_transient_keeps_everything_and_backs_off(store: Store) -> None:
    up = RuleUplink()
    up.fail_next = 1
    r = runner(store, up, batch_max_items=10)
    await fill(store, [float(i) for i in range(10)])
    lease = await store.lease("rule", 10, live_first=False)
    assert lease is not None
    await r.process(lease)
    assert r.state is UplinkState.BACKING_OFF
    assert r.last_error == "injected"
    assert store.uplink_stats("rule")["backlog"] == 10
    await drain(store, r)
    assert r.state is UplinkState.OK
    assert sorted(up.received) == [float(i) for i in range(10)]


async def test_auth_failure_keeps_data_and_sets_state(store: Store) -> None:
    up = RuleUplink()
    up.fail_next = 1
    up.fail_outcome = Outcome.AUTH
    r = runner(store, up, auth_retry_s=3600)
    await fill(store, [1.0, 2.0])
    lease = await store.lease("rule", 10, live_first=False)
    assert lease is not None
    await r.process(lease)
    assert r.state is UplinkState.AUTH_FAILED
    assert r.status()["retry_in_s"] > 3000
    assert store.uplink_stats("rule")["backlog"] == 2


async def test_worker_loop_delivers_as_data_arrives(store: Store) -> None:
    up = RuleUplink()
    r = runner(store, up, batch_max_items=7)
    task = asyncio.create_task(r.run())
    await fill(store, [float(i) for i in range(50)])
    async with asyncio.timeout(20):
        while store.uplink_stats("rule")["delivered"] < 50:
            await store.wait_for_data(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sorted(up.received) == [float(i) for i in range(50)]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_sliding_window_never_exceeds_the_limit_in_any_window() -> None:
    clock = FakeClock()
    rl = RateLimiter(20, 60.0, clock=clock)
    sent: list[float] = []
    for _ in range(200):
        d = rl.delay()
        clock.t += d
        assert rl.delay() == 0
        rl._sent.append(clock.t)  # what acquire() records
        sent.append(clock.t)
        clock.t += 0.5
    for i, start in enumerate(sent):
        assert sum(1 for s in sent[i:] if s < start + 60.0) <= 20


def test_history_from_a_previous_run_is_honoured() -> None:
    clock = FakeClock()
    history = [clock.t - 10 + i * 0.1 for i in range(20)]  # 20 sends in the last 10 s
    rl = RateLimiter(20, 60.0, history=history, clock=clock)
    assert 50.0 < rl.delay() <= 51.0
    # A clock that stepped back does not make the history vanish.
    clock.t -= 3600
    assert rl.delay() > 0


def test_even_pacing_spaces_requests_across_the_window() -> None:
    clock = FakeClock()
    rl = RateLimiter(20, 60.0, clock=clock, even=True)
    assert rl.delay() == 0
    rl._sent.append(clock.t)  # one request went now
    assert rl.delay() == pytest.approx(rl.period / 20)  # ~3.15 s, not 0 until the quota is gone
    burst = RateLimiter(20, 60.0, clock=clock)
    burst._sent.append(clock.t)
    assert burst.delay() == 0


async def test_a_retry_after_received_while_a_send_is_recorded_holds_that_send() -> None:
    # Worker A passed the check and is writing its send time; meanwhile worker B's request comes
    # back 429 with Retry-After. A's request must not leave before the pause is over.
    rl: RateLimiter

    writes: list[list[float]] = []

    async def persist(sent: list[float]) -> None:
        if not writes:
            rl.pause_until(time.time() + 0.3)  # what B's 429 does while A awaits the store
        writes.append(sent)

    rl = RateLimiter(60, 60.0, persist=persist)
    await rl.acquire()
    assert time.time() >= rl._paused_until  # returned only once the pause had elapsed
    # The send time kept is when the request really left, not the one recorded before the pause.
    assert len(writes) == 2 and len(rl.history) == 1
    assert rl.history[0] >= rl._paused_until


async def test_rate_limit_history_survives_a_restart(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path / "q.db")
    s = await Store.open(cfg, {"rule": ["s"]})
    up = RuleUplink()
    r = UplinkRunner(
        up,
        UplinkConfigBase(
            name="rule",
            rate_limit_requests=3,  # type: ignore[arg-type]
            rate_limit_period_s=3600,
            pacing="burst",
        ),
        s,
    )
    for _ in range(3):
        await r.limiter.acquire()
    await s.aclose()
    s2 = await Store.open(cfg, {"rule": ["s"]})
    r2 = UplinkRunner(
        up,
        UplinkConfigBase(
            name="rule",
            rate_limit_requests=3,  # type: ignore[arg-type]
            rate_limit_period_s=3600,
            pacing="burst",
        ),
        s2,
    )
    assert r2.limiter.delay() > 3500
    await s2.aclose()


class TwoPartUplink(RuleUplink):
    """Sends each batch in two parts (like Energydata's MQTT beside an import) and settles the
    first part as soon as it is done."""

    def __init__(self) -> None:
        super().__init__()
        self.second_part_done = False

    async def send_settling(self, batch: Sequence[StoredReading], settle: Settle) -> SendResult:
        half = len(batch) // 2
        await settle(SendResult(delivered=[i.id for i in batch[:half]]))
        self.second_part_done = True
        return SendResult.all_delivered(batch)


async def test_an_early_settled_part_is_recorded_once_and_a_failed_early_record_loses_nothing(
    store: Store,
) -> None:
    up = TwoPartUplink()
    assert isinstance(up, SettlesEarly)
    r = UplinkRunner(up, UplinkConfigBase(name="rule", rate_limit_requests=0), store)  # type: ignore[arg-type]
    await store.ingest(
        [Reading("s", 1_700_000_000_000 + i, float(i)) for i in range(10)], durable=True
    )
    lease = await store.lease("rule", 100)
    assert lease is not None
    await r.process(lease)
    assert store.uplink_stats("rule")["delivered"] == 10  # the settled half is not counted twice
    assert store.uplink_stats("rule")["backlog"] == 0

    # The early record fails (a full disk, say): the part goes on and the lease's completion
    # records everything.
    await store.ingest(
        [Reading("s", 1_700_000_001_000 + i, float(i)) for i in range(10)], durable=True
    )

    async def failing_settle(*a: object, **kw: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    store.settle = failing_settle  # type: ignore[method-assign]
    up.second_part_done = False
    lease = await store.lease("rule", 100)
    assert lease is not None
    await r.process(lease)
    assert up.second_part_done
    await store.refresh_stats()
    assert store.uplink_stats("rule")["delivered"] == 20
    assert store.uplink_stats("rule")["backlog"] == 0


class FailingUplink(RuleUplink):
    """Fails every send with the failure it is given (what a plugin reports)."""

    def __init__(self) -> None:
        super().__init__()
        self.failure = SendResult.failed(Outcome.TRANSIENT, "connect failed", unreachable=True)

    async def send(self, batch: Sequence[StoredReading]) -> SendResult:
        self.batches.append(len(batch))
        return self.failure


async def test_the_failure_picks_the_schedule_short_when_unreachable_long_when_refused(
    store: Store,
) -> None:
    up = FailingUplink()
    cfg = UplinkConfigBase(
        name="rule",
        rate_limit_requests=0,  # type: ignore[arg-type]
        backoff_initial_s=10.0,
        backoff_max_s=600.0,
        reconnect_max_s=2.0,
        auth_retry_s=3600.0,
    )
    r = UplinkRunner(up, cfg, store)  # type: ignore[arg-type]
    await fill(store, [1.0, 2.0])

    async def fail_once() -> dict[str, object]:
        r.resume_now()  # each failure's own wait, not the one before it
        lease = await store.lease("rule", 10, live_first=False)
        assert lease is not None
        await r.process(lease)
        return r.status()

    # Not reached: every retry within the short cap, however often it fails.
    for _ in range(6):
        st = await fail_once()
        assert st["retry_kind"] == "unreachable" and 0 < st["retry_in_s"] <= 2.0  # type: ignore[operator]
    # The service answered 503: the long schedule, from its own first step (5-10 s), growing.
    up.failure = SendResult.failed(Outcome.TRANSIENT, "HTTP 503", status=503)
    first = await fail_once()
    assert first["retry_kind"] == "refused" and first["retry_in_s"] > 2.0  # type: ignore[operator]
    second = await fail_once()
    assert second["retry_in_s"] > 9.0  # type: ignore[operator]  # 10-20 s
    # Refused credentials: auth_retry_s.
    up.failure = SendResult.failed(Outcome.AUTH, "HTTP 401", status=401)
    st = await fail_once()
    assert st["retry_kind"] == "auth" and st["retry_in_s"] > 3000  # type: ignore[operator]
    assert r.state is UplinkState.AUTH_FAILED
    assert store.uplink_stats("rule")["backlog"] == 2  # nothing lost meanwhile
    # A delivery resets both schedules and clears the kind.
    r.resume_now()
    lease = await store.lease("rule", 10, live_first=False)
    assert lease is not None
    up.failure = SendResult.all_delivered(lease.items)
    await r.process(lease)
    assert r.state is UplinkState.OK and r.status()["retry_kind"] is None
    assert r.retry.unreachable.attempts == 0 and r.retry.refused.attempts == 0
