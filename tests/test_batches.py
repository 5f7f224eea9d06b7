"""One poll as one batch (gateway.models.ReadingBatch): every stage that takes the batch whole
gives exactly what it gives the same readings one by one.

* The batch itself: as a sequence it *is* its readings.
* The clock: a clock stamping batches and a twin stamping the same readings as a list, driven by
  the same wall clock through the same script, return the same readings and end in the same
  state (bumps, rejections, restarts and repairs included).
* The store: batches and single readings in any mix, any commit size, any values (the plain
  columns path and the per-reading path), with the clock's repair of buffered readings, come
  back from a lease exactly as the readings they stand for.
"""

from __future__ import annotations

import asyncio
import math
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.clock import UNSYNCED
from gateway.config import StoreConfig
from gateway.models import Position, Reading, ReadingBatch, Value
from gateway.store import Store
from tests.test_clock import DAY, REAL, FakeTime

# ----------------------------------------------------------------------------------------------
# The batch as a sequence


def test_a_batch_is_the_sequence_of_its_readings() -> None:
    b = ReadingBatch(("a", "b", "c"), 1_000, [1, 2.5, "x"], 1)
    assert len(b) == 3
    assert list(b) == [
        Reading("a", 1_000, 1, None, 1),
        Reading("b", 1_000, 2.5, None, 1),
        Reading("c", 1_000, "x", None, 1),
    ]
    assert b[1] == Reading("b", 1_000, 2.5, None, 1) and b[-1].series == "c"
    part = b[1:]
    assert isinstance(part, ReadingBatch) and list(part) == list(b)[1:]
    moved = b.with_stamp(2_000, 0)
    assert [r.ts for r in moved] == [2_000] * 3 and moved.series is b.series
    assert b[0].ts == 1_000  # the original is unchanged


def test_a_batch_with_more_values_than_series_is_refused() -> None:
    try:
        ReadingBatch(("a",), 0, [1, 2])
    except ValueError as exc:
        assert "1 series for 2 values" in str(exc)
    else:
        raise AssertionError("accepted")


# ----------------------------------------------------------------------------------------------
# The clock: batch and list twins

_NAMES = ("p0", "p1", "p2", "p3")


@st.composite
def stamp_scripts(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Time passes, the wall clock jumps, the probe changes its mind, the clock looks, and
    polls arrive: a set of series (sometimes one twice) at the wall clock's time, or at a time
    of their own (a logger's: late, early, 1970, 9999)."""
    when = st.one_of(
        st.just(0),
        st.integers(-3 * DAY, 3 * DAY),
        st.integers(-5_000, 5_000),
        st.sampled_from([-REAL, 250_000 * 365 * DAY]),
    )
    poll = st.tuples(
        st.lists(st.sampled_from(_NAMES), min_size=1, max_size=6), when, st.integers(0, 3)
    )
    op = st.one_of(
        st.tuples(st.just("advance"), st.integers(1, 5_000)),
        st.tuples(
            st.just("step"), st.one_of(st.integers(-5 * DAY, 5 * DAY), st.integers(-10_000, 10_000))
        ),
        st.tuples(st.just("sync"), st.booleans()),
        st.tuples(st.just("look"), st.just(0)),
        st.tuples(st.just("poll"), poll),
    )
    return draw(st.lists(op, min_size=1, max_size=60))


def _as_tuples(readings: Any) -> list[tuple[Any, ...]]:
    return [(r.series, r.ts, r.value, r.position, r.quality) for r in readings]


@settings(max_examples=300, deadline=None)
@given(
    script=stamp_scripts(), start=st.sampled_from([0, REAL - 30 * DAY, REAL]), synced=st.booleans()
)
@example(  # a series polled twice in one batch: the second is bumped, as one by one
    script=[("poll", (["p0", "p0"], 0, 0))], start=REAL, synced=True
)
@example(  # a series whose last stamp is ahead of the poll: bumped, as one by one
    script=[("poll", (["p1"], 5_000, 0)), ("poll", (["p0", "p1"], 0, 0))], start=REAL, synced=True
)
async def test_a_batch_is_stamped_as_its_readings_one_by_one(
    script: list[tuple[str, Any]], start: int, synced: bool
) -> None:
    t = FakeTime(start, synced=synced)
    whole, single = t.clock(), t.clock()
    for op, arg in script:
        if op == "advance":
            t.advance(arg)
        elif op == "step":
            t.step(arg)
        elif op == "sync":
            t.synced = arg
        elif op == "look":
            await whole.tick()
            await single.tick()
        else:
            names, offset, q = arg
            ts = max(0, t.wall + offset)
            batch = ReadingBatch(tuple(names), ts, [float(i) for i in range(len(names))], q)
            got = whole.stamp(batch)
            want = single.stamp(list(batch))
            assert _as_tuples(got) == _as_tuples(want)
    assert whole._last == single._last
    assert whole._rejecting == single._rejecting
    assert whole.status() == single.status()
    assert whole.series_restarted_total == single.series_restarted_total


def test_a_plain_poll_is_stamped_whole_and_keeps_its_columns() -> None:
    t = FakeTime(REAL, synced=True)
    clock = t.clock()
    batch = ReadingBatch(("a", "b"), t.wall, [1, 2])
    out = clock.stamp(batch)
    assert out is batch  # nothing to change: the same object, no reading made
    t.synced = False
    unsynced = FakeTime(REAL, synced=False).clock().stamp(batch)
    assert isinstance(unsynced, ReadingBatch) and unsynced.quality == UNSYNCED
    assert unsynced.values is batch.values


# ----------------------------------------------------------------------------------------------
# The store: batches through commit and lease

_values = st.one_of(
    st.integers(0, 65535),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=8),
)


@st.composite
def entries(draw: st.DrawFn) -> list[Reading | ReadingBatch | list[Reading]]:
    """What sources hand the store: polls as batches (plain registers, or any values, some
    flagged), and single readings (some with a position)."""
    out: list[Reading | ReadingBatch | list[Reading]] = []
    ts = REAL
    for _ in range(draw(st.integers(1, 12))):
        ts += draw(st.integers(1, 2_000))
        n = draw(st.integers(1, 9))
        names = tuple(f"s{i}" for i in range(n))
        kind = draw(st.sampled_from(["plain", "any", "readings"]))
        if kind == "plain":
            values: list[Value] = draw(st.lists(st.integers(0, 65535), min_size=n, max_size=n))
            out.append(ReadingBatch(names, ts, values))
        elif kind == "any":
            values = draw(st.lists(_values, min_size=n, max_size=n))
            q = draw(st.sampled_from([0, 0, UNSYNCED, 2]))
            out.append(ReadingBatch(names, ts, values, q))
        else:
            pos = draw(
                st.sampled_from([None, Position(55.5, 12.25, None), Position(-1.0, 2.0, 3.5)])
            )
            values = draw(st.lists(_values, min_size=n, max_size=n))
            out.append([Reading(s, ts, v, pos) for s, v in zip(names, values, strict=True)])
    return out


def _same(value: Value) -> tuple[type, str]:
    return (type(value), "nan" if isinstance(value, float) and math.isnan(value) else repr(value))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batches=entries(), commit_rows=st.integers(1, 20), repair=st.integers(0, 3))
async def test_batches_and_readings_in_any_mix_come_back_from_a_lease_exactly(
    tmp_path: Path,
    batches: list[Reading | ReadingBatch | list[Reading]],
    commit_rows: int,
    repair: int,
) -> None:
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "q.db"  # one file per example
    cfg = StoreConfig(path=path, commit_interval_ms=5, commit_max_rows=commit_rows)
    store = await Store.open(cfg, {"a": ["s*"]})
    try:
        expected: list[Reading] = []
        for e in batches:
            if isinstance(e, ReadingBatch):
                await store.ingest(e)
                expected.extend(e)
            else:
                await store.ingest(e)
                expected.extend(e)
        # The clock's repair of readings still buffered (ids from the second one on, up to
        # ``repair`` before the end), then everything committed in groups of commit_rows.
        first, upto, delta = 2, len(expected) - repair, 60_000
        await store.repair_unsynced(first, upto, delta)
        for i, r in enumerate(expected, start=1):
            if first <= i <= upto and r.quality & UNSYNCED:
                expected[i - 1] = Reading(
                    r.series, r.ts + delta, r.value, r.position, (r.quality & ~UNSYNCED) | 2
                )
        writer = asyncio.create_task(store.run())
        await store.flush()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        lease = await store.lease("a", 10_000, live_first=False)
        assert lease is not None
        got = [(i.series, i.ts, _same(i.value), i.position, i.quality) for i in lease.items]
        want = [(r.series, r.ts, _same(r.value), r.position, r.quality) for r in expected]
        assert got == want
        assert [i.id for i in lease.items] == list(range(1, len(expected) + 1))
        assert store.uplink_stats("a")["backlog"] == len(expected)
    finally:
        await store.aclose()


async def test_a_poll_larger_than_a_commit_is_split_and_every_part_captured(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path / "q.db", commit_interval_ms=5, commit_max_rows=50)
    store = await Store.open(cfg, {"a": ["r*"]})
    writer = asyncio.create_task(store.run())
    try:
        names = tuple(f"r{i}" for i in range(125))
        await store.ingest(ReadingBatch(names, REAL, list(range(125))), durable=True)
        assert store.commits_total >= 3  # 50 + 50 + 25
        lease = await store.lease("a", 1_000, live_first=False)
        assert lease is not None
        assert [(i.series, i.value) for i in lease.items] == list(
            zip(names, range(125), strict=True)
        )
        assert store.stats()["buffered"] == 0 and store.next_id() == 126
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.aclose()


async def test_a_batch_with_a_value_sqlite_cannot_take_keeps_the_rest(tmp_path: Path) -> None:
    cfg = StoreConfig(path=tmp_path / "q.db", commit_interval_ms=5)
    store = await Store.open(cfg, {"a": ["v*"]})
    writer = asyncio.create_task(store.run())
    try:
        bad: Any = object()
        await store.ingest(ReadingBatch(("v0", "v1", "v2"), REAL, [1, bad, 3]), durable=True)
        lease = await store.lease("a", 10, live_first=False)
        assert lease is not None and [(i.series, i.value) for i in lease.items] == [
            ("v0", 1),
            ("v2", 3),
        ]
        assert store.rejected_total == 1
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.aclose()


async def test_a_positioned_reading_evicted_between_the_lease_s_two_queries_is_left_out(
    tmp_path: Path,
) -> None:
    from gateway.models import StoredReading
    from gateway.store.cursors import _AT_BIT

    cfg = StoreConfig(path=tmp_path / "q.db", commit_interval_ms=5)
    store = await Store.open(cfg, {"a": ["g*"]})
    writer = asyncio.create_task(store.run())
    try:
        here = Position(55.5, 12.25, 7.0)
        await store.ingest(
            [Reading("g0", REAL, 1.5, here), Reading("g1", REAL, 2, here)], durable=True
        )
        # As the lease's first query returns them: the position bit set, the position not yet read;
        # id 2 as if evicted before the second query (no such row any more: 99).
        marked = [
            StoredReading(1, "g0", REAL, 1.5, None, 1 << _AT_BIT),
            StoredReading(99, "g1", REAL, 2, None, (1 << _AT_BIT) | 1),
            StoredReading(3, "g2", REAL, 7, None, 0),
        ]
        got = await store._decode_special(marked)
        assert got == [StoredReading(1, "g0", REAL, 1.5, here, 0), marked[2]]
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.aclose()
