"""The clock service's pure logic: sync state, steps, stamping, and what an uplink may send.

Both clocks and the sync probe are fakes that move only when told; no test sleeps. The store's
side of the repair (SQLite, buffered readings, restarts) and delivery through a real uplink are
in tests/integration/test_clock_repair.py.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.clock import (
    MAX_PLAUSIBLE_MS,
    MIN_PLAUSIBLE_MS,
    OWN,
    REPAIRED,
    STRAGGLER_MS,
    UNSYNCED,
    Clock,
    ClockState,
    clock_state,
    iso_ms,
)
from gateway.configbase import ClockConfig
from gateway.models import Reading, StoredReading

DAY = 86_400_000
#: A plausible "now" for the tests (2026-11-01T00:00:00Z).
REAL = 1_793_491_200_000


class FakeTime:
    """Wall and monotonic clocks in ms, and the sync probe's answer."""

    def __init__(self, wall: int, mono: int = 5_000, synced: bool | None = False) -> None:
        self.wall, self.mono, self.synced = wall, mono, synced

    def advance(self, ms: int) -> None:
        """Time passes: both clocks move."""
        self.wall += ms
        self.mono += ms

    def step(self, ms: int) -> None:
        """The wall clock is set: only it moves."""
        self.wall += ms

    def clock(self, **cfg: object) -> Clock:
        return Clock(
            ClockConfig(**cfg),  # type: ignore[arg-type]
            wall_ns=lambda: self.wall * 1_000_000,
            mono_ns=lambda: self.mono * 1_000_000,
            probe=lambda: ClockState(self.synced, "fake", self.wall / 1000),
            boot_id=lambda: "boot-1",
        )


def reading(t: FakeTime, series: str = "s", value: float = 1.0) -> Reading:
    """What a source hands over: stamped with the wall clock now."""
    return Reading(series, t.wall, value)


def stored(i: int, ts: int, quality: int = 0) -> StoredReading:
    return StoredReading(i, "s", ts, 1.0, None, quality)


async def look(clock: Clock, times: int = 1) -> None:
    for _ in range(times):
        await clock.tick()


# ----------------------------------------------------------------------------------------------
# Sync state and steps


async def test_unsynchronised_readings_are_flagged_and_synchronised_ones_are_not() -> None:
    t = FakeTime(REAL)
    clock = t.clock()
    assert clock.synchronized is False and clock.source == "fake"
    [r] = clock.stamp([reading(t)])
    assert r.quality == UNSYNCED and r.ts == t.wall
    t.synced = True
    t.advance(1000)
    await look(clock, 2)
    assert clock.synchronized is True
    t.advance(1000)
    [r] = clock.stamp([reading(t)])
    assert r.quality == 0 and r.ts == t.wall


async def test_a_sync_is_believed_only_on_two_looks_without_a_step_between() -> None:
    t = FakeTime(REAL - 3 * DAY)
    clock = t.clock()
    t.synced = True
    await look(clock)
    assert not clock.synchronized  # one look: the step may still be on its way
    t.step(3 * DAY)
    t.advance(1000)
    await look(clock)
    assert not clock.synchronized and clock.steps_total == 1  # the step resets the count
    t.advance(1000)
    await look(clock)
    assert clock.synchronized


def test_at_start_one_look_is_enough_and_unknown_is_not_synchronised() -> None:
    assert FakeTime(REAL, synced=True).clock().synchronized
    unknown = FakeTime(REAL, synced=None).clock()
    assert not unknown.synchronized
    assert FakeTime(REAL, synced=None).clock(trust="always").synchronized


async def test_steps_are_told_from_drift_and_recorded() -> None:
    t = FakeTime(REAL)
    clock = t.clock(step_threshold_s=2.0)
    t.advance(1000)
    t.step(1500)  # below the threshold: not a step
    await look(clock)
    assert clock.steps_total == 0 and clock.status()["last_step_s"] is None
    t.advance(1000)
    t.step(-3 * DAY)
    await look(clock)
    st_ = clock.status()
    assert st_["steps_total"] == 1
    assert st_["last_step_s"] == -3 * DAY / 1000
    assert st_["last_step_at"] == t.wall / 1000
    assert {"synchronized", "source", "unsynced_pending", "wall_time"} <= set(st_)


async def test_a_clock_before_2020_is_never_trusted_and_its_stamps_are_flagged() -> None:
    t = FakeTime(10_000, synced=True)  # 1970, whatever the probe says
    clock = t.clock(trust="always")
    assert not clock.synchronized
    [r] = clock.stamp([reading(t)])
    assert r.ts < MIN_PLAUSIBLE_MS and r.quality & UNSYNCED
    t.step(REAL)
    await look(clock, 3)
    assert clock.synchronized


def test_the_system_probe_answers() -> None:
    state = clock_state()
    assert state.source in {"timesyncd", "adjtimex", "unknown"}
    assert state.synchronized in {True, False, None}


# ----------------------------------------------------------------------------------------------
# Stamping through steps


async def test_unsynchronised_stamps_stay_on_one_frame_through_steps() -> None:
    t = FakeTime(REAL - 2 * DAY)
    clock = t.clock()
    ref = t.wall - t.mono
    got = []
    for k in range(30):
        t.advance(1000)
        if k == 10:
            t.step(2 * DAY)  # fake-hwclock, NTP, a person: a forward step
        if k == 20:
            t.step(-DAY // 2)
        got.append((t.mono, clock.stamp([reading(t)])[0]))
    # Every stamp is capture time on the monotonic clock plus the boot's frame, so a single
    # repair (offset at sync minus the frame) gives each reading its true time.
    assert all(r.ts == mono + ref and r.quality == UNSYNCED for mono, r in got)
    assert clock.steps_total == 2


async def test_a_reading_stamped_before_a_step_and_emitted_after_it_is_moved_by_it() -> None:
    t = FakeTime(REAL, synced=True)
    clock = t.clock()
    t.advance(1000)
    [before] = clock.stamp([reading(t)])
    late = reading(t, "other")  # stamped now, handed over after the step
    t.advance(200)
    t.step(-10_000)
    await look(clock)
    t.advance(100)
    [moved] = clock.stamp([late])
    assert moved.ts == late.ts - 10_000 and moved.quality == REPAIRED
    # The step put "s" 10 s back: it is bumped past its last reading, not reordered.
    [again] = clock.stamp([reading(t)])
    assert again.ts == before.ts + 1 and again.quality == REPAIRED
    t.advance(STRAGGLER_MS + 1000)
    [r] = clock.stamp([reading(t)])
    assert (r.ts, r.quality) == (t.wall, 0)


async def test_an_unsynchronised_straggler_is_put_on_the_frame() -> None:
    t = FakeTime(REAL - DAY)
    clock = t.clock()
    ref = t.wall - t.mono
    t.advance(1000)
    captured_at = t.mono
    late = reading(t)
    t.advance(300)
    t.step(DAY)
    await look(clock)
    [r] = clock.stamp([late])
    assert r.ts == captured_at + ref and r.quality == UNSYNCED


def test_collisions_and_backward_stamps_of_a_series_are_bumped_and_flagged() -> None:
    t = FakeTime(REAL, synced=True)
    clock = t.clock()
    a, b, c = clock.stamp([reading(t, "x"), reading(t, "x"), reading(t, "y")])
    assert (a.ts, a.quality) == (t.wall, 0)
    assert (b.ts, b.quality) == (t.wall + 1, REPAIRED)
    assert (c.ts, c.quality) == (t.wall, 0)  # another series may share the instant
    [d] = clock.stamp([Reading("x", t.wall - 5000, 1.0)])
    assert d.ts == t.wall + 2 and d.quality == REPAIRED


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Operations: time passes, the wall clock jumps (far, near, forwards, backwards), a source
    emits, the sync probe changes its mind, the clock task looks."""
    op = st.one_of(
        st.tuples(st.just("advance"), st.integers(1, 5_000)),
        st.tuples(
            st.just("step"),
            st.one_of(st.integers(-5 * DAY, 5 * DAY), st.integers(-10_000, 10_000)),
        ),
        st.tuples(st.just("emit"), st.integers(0, 3)),
        st.tuples(st.just("sync"), st.integers(0, 1)),
        st.tuples(st.just("look"), st.just(0)),
    )
    return draw(st.lists(op, min_size=1, max_size=80))


@settings(max_examples=300, deadline=None)
@given(
    script=scripts(),
    start=st.sampled_from([0, REAL - 30 * DAY, REAL]),
    synced=st.booleans(),
)
# Found by hypothesis: a reading, a sync, a step back, then one more reading (the first one's
# repaired time must be the one the second is compared with).
@example(
    script=[("emit", 1), ("sync", 1), ("step", -1), ("look", 0), ("look", 0), ("emit", 1)],
    start=REAL - 30 * DAY,
    synced=False,
)
# A step back by days while synchronised: still bumped, within the bound.
@example(script=[("emit", 1), ("step", -2 * DAY), ("emit", 1)], start=REAL, synced=True)
async def test_whatever_the_wall_clock_does_a_series_never_goes_back_nor_repeats_an_instant(
    script: list[tuple[str, int]], start: int, synced: bool
) -> None:
    t = FakeTime(start, synced=synced)
    # A future bound beyond every step the script can make (80 x 5 days): a step back further
    # than it makes the series restart instead (tested with the bound, below).
    clock = t.clock(max_future_s=3650 * DAY / 1000)
    # What the store holds: a sync repairs every unsynchronised reading by the clock's delta,
    # so the model applies the same repair before comparing later readings with them.
    last: dict[str, tuple[int, bool]] = {}
    seen: dict[str, set[int]] = defaultdict(set)
    flagged: dict[str, set[int]] = defaultdict(set)
    for op, arg in script:
        if op == "advance":
            t.advance(arg)
        elif op == "step":
            t.step(arg)
        elif op == "sync":
            t.synced = bool(arg)
        elif op == "look":
            ref_before, was_synced = clock._ref, clock.synchronized
            await clock.tick()
            if clock.synchronized and not was_synced:
                rep = clock._repair
                delta = rep.delta_ms if rep is not None else clock._ref - ref_before
                for s in list(flagged):
                    seen[s] = (seen[s] - flagged[s]) | {ts + delta for ts in flagged[s]}
                    flagged[s] = set()
                last = {
                    s: ((ts + delta, False) if unsynced else (ts, False))
                    for s, (ts, unsynced) in last.items()
                }
        else:
            batch = [reading(t, f"s{k % 2}", float(k)) for k in range(arg)]
            for r in clock.stamp(batch):
                prev = last.get(r.series, (-(2**62), False))[0]
                assert r.ts > prev, "a series went back or stood still"
                assert r.ts not in seen[r.series]
                unsynced = bool(r.quality & UNSYNCED)
                last[r.series] = (r.ts, unsynced)
                seen[r.series].add(r.ts)
                if unsynced:
                    flagged[r.series].add(r.ts)
                if r.ts < MIN_PLAUSIBLE_MS:
                    assert r.quality & UNSYNCED, "a pre-2020 time without the flag"
                if not clock.synchronized:
                    assert r.quality & UNSYNCED


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.integers(1, 10_000), min_size=1, max_size=40),
    jumps=st.lists(st.integers(-5 * DAY, 5 * DAY), max_size=5),
    boot_wall=st.sampled_from([0, REAL - 400 * DAY, REAL - DAY]),
)
async def test_unsynchronised_readings_repair_to_their_true_time(
    gaps: list[int], jumps: list[int], boot_wall: int
) -> None:
    """Readings taken before the sync, through any steps, come out (after the repair the sync
    calls for) at their monotonic capture time on the synchronised clock, in order."""
    t = FakeTime(boot_wall)
    clock = t.clock()
    ref = clock._ref
    taken: list[tuple[int, Reading]] = []
    for k, gap in enumerate(gaps):
        t.advance(gap)
        if k < len(jumps):
            t.step(jumps[k])
            await clock.tick()
        taken.append((t.mono, clock.stamp([reading(t)])[0]))
    # NTP: the true time, then the flag.
    t.step(REAL - t.wall)
    t.synced = True
    for _ in range(3):
        t.advance(1000)
        await clock.tick()
    assert clock.synchronized
    true_offset = t.wall - t.mono
    repaired = [r.ts + (true_offset - ref) for _, r in taken]
    assert repaired == [mono + true_offset for mono, _ in taken]
    t.advance(1)
    [after] = clock.stamp([reading(t)])
    assert after.quality == 0 and after.ts > repaired[-1]


# ----------------------------------------------------------------------------------------------
# What an uplink may send


def test_a_holding_uplink_holds_from_the_first_repairable_unsynchronised_reading() -> None:
    t = FakeTime(REAL - DAY)
    clock = t.clock()
    clock.first_id = 10  # as if attached to a store: ids below are an earlier boot's
    items = [
        stored(-3, REAL, UNSYNCED),  # a replayed dead letter: no repair reaches it
        stored(5, REAL, UNSYNCED),  # an earlier boot's
        stored(6, REAL),
        stored(12, REAL),
        stored(13, REAL, UNSYNCED),
        stored(14, REAL),  # after the first held one: waits too, so order is kept
    ]
    gate = clock.gate(items, hold_unsynced=True)
    assert [i.id for i in gate.send] == [6, 12]
    assert gate.hold_from == 13
    assert sorted(gate.rejected) == [-3, 5]
    assert all("unsynchronised" in r for r in gate.rejected.values())


def test_a_non_holding_uplink_sends_flagged_readings_but_never_a_1970_one() -> None:
    t = FakeTime(REAL - DAY)
    clock = t.clock()
    clock.first_id = 10
    items = [
        stored(11, REAL, UNSYNCED),
        stored(12, 5_000, UNSYNCED),
        stored(13, REAL),
        stored(3, 7_000),
    ]
    gate = clock.gate(items, hold_unsynced=False)
    assert [i.id for i in gate.send] == [11]
    assert gate.hold_from == 12
    assert gate.rejected == {3: "timestamp before 2020-01-01: the clock was not set"}


async def test_once_synchronised_a_reading_flagged_later_is_not_waited_for() -> None:
    t = FakeTime(REAL, synced=True)
    clock = t.clock()
    clock.first_id = 1
    late = stored(50, REAL, UNSYNCED)  # flagged though the clock was synchronised
    gate = clock.gate([late], hold_unsynced=True)
    assert gate.hold_from is None and list(gate.rejected) == [50]


# ----------------------------------------------------------------------------------------------
# Implausible timestamps (issue 12)

#: 9999-12-31T23:59:59Z, what one logger line carried.
NINES = 253_402_300_799_000
#: 2000-01-01T00:00:00Z, where many a logger's clock starts when its battery died.
Y2K = 946_684_800_000
#: The defaults: max_future_s and max_age_days, in ms.
F = 86_400_000
A = 365 * DAY


def test_a_far_future_logger_timestamp_is_rejected_and_does_not_poison_its_series() -> None:
    t = FakeTime(REAL, synced=True)
    clock = t.clock()
    t.advance(1000)
    [first] = clock.stamp([reading(t, "s", 0.0)])
    bad = clock.stamp([Reading("s", NINES, 1.0)])
    later = []
    for k in range(3):
        t.advance(1000)
        later.append((t.wall, clock.stamp([reading(t, "s", 2.0 + k)])))
    # The later readings keep their own times, unflagged: the bad one did not move the series.
    assert [(r.ts, r.quality) for _, [r] in later] == [(wall, 0) for wall, _ in later]
    assert bad == []
    st_ = clock.status()
    assert st_["rejected_timestamps"] == {"future": 1, "past": 0}
    assert st_["last_rejected_timestamp"]["series"] == "s"
    assert st_["last_rejected_timestamp"]["ts"] == "9999-12-31T23:59:59.000Z"
    assert st_["last_rejected_timestamp"]["reason"] == "future"
    assert first.ts < later[0][0]


async def test_a_logger_s_own_times_at_a_1970_system_clock_are_kept_not_repaired() -> None:
    """A logger with its own battery clock is right while the box is at 1970: its times are far
    "ahead" of the unsynchronised system clock. They are kept as they are (not rejected, not put
    on the boot's frame), so the repair at sync does not move them 56 years on, and the series
    goes on from them after the sync."""
    t = FakeTime(10_000)
    clock = t.clock()
    logger = REAL - 3_600_000  # the logger's (correct) clock, an hour before the NTP time below
    got = []
    for k in range(3):
        t.advance(1000)
        logger += 1000
        got += clock.stamp([Reading("rtc", logger, float(k))])
    assert [(r.ts, r.quality) for r in got] == [(logger - 2000, 0), (logger - 1000, 0), (logger, 0)]
    t.step(REAL - t.wall)  # NTP
    t.synced = True
    for _ in range(2):
        t.advance(500)
        await clock.tick()
    assert clock.synchronized
    t.advance(1000)
    logger += 2000
    [after] = clock.stamp([Reading("rtc", logger, 9.0)])
    assert (after.ts, after.quality) == (logger, 0)
    assert clock.status()["rejected_timestamps"] == {"future": 0, "past": 0}


def test_the_bounds_are_max_future_s_ahead_and_max_age_days_behind_the_synchronised_clock() -> None:
    t = FakeTime(REAL, synced=True)
    clock = t.clock(max_future_s=3600, max_age_days=30)
    hour, month = 3_600_000, 30 * DAY
    cases = {
        "at_future": t.wall + hour,
        "over_future": t.wall + hour + 1,
        "at_past": t.wall - month,
        "over_past": t.wall - month - 1,
    }
    out = clock.stamp([Reading(name, ts, 1.0) for name, ts in cases.items()])
    assert [(r.series, r.ts, r.quality) for r in out] == [
        ("at_future", t.wall + hour, 0),
        ("at_past", t.wall - month, 0),
    ]
    st_ = clock.status()
    assert st_["rejected_timestamps"] == {"future": 1, "past": 1}
    assert (st_["max_future_s"], st_["max_age_days"]) == (3600, 30)


def test_rejections_are_counted_with_the_last_one_and_warned_when_a_series_starts_failing() -> None:
    t = FakeTime(REAL, synced=True)
    clock = t.clock()
    with capture_logs() as logs:
        clock.stamp(
            [
                Reading("a", NINES, 1.0),
                Reading("a", NINES, 2.0),  # the same again: counted, not warned
                Reading("a", 0, 3.0),  # another reason: news
                Reading("b", REAL + 2 * DAY, 4.0),
            ]
        )
        clock.stamp([reading(t, "a")])  # accepted: the next rejection of "a" is news again
        clock.stamp([Reading("a", 10**16, 5.0)])  # beyond year 9999: no date to show
    events = [
        (e["log_level"], e["series"], e["reason"])
        for e in logs
        if e["event"] == "clock_timestamp_rejected"
    ]
    assert events == [
        ("warning", "a", "future"),
        ("debug", "a", "future"),
        ("warning", "a", "past"),
        ("warning", "b", "future"),
        ("warning", "a", "future"),
    ]
    st_ = clock.status()
    assert st_["rejected_timestamps"] == {"future": 4, "past": 1}
    assert st_["last_rejected_timestamp"] == {
        "series": "a",
        "ts": "10000000000000000 ms since 1970",
        "ts_ms": 10**16,
        "reason": "future",
        "at": t.wall / 1000,
    }
    assert clock._last["a"] == (t.wall, 0)
    assert iso_ms(NINES) == "9999-12-31T23:59:59.000Z" and iso_ms(-1) == "1969-12-31T23:59:59.999Z"


def test_a_logger_replaying_weeks_of_memory_is_kept_and_a_dead_logger_clock_is_not() -> None:
    t = FakeTime(REAL, synced=True)
    clock = t.clock()
    replay = [Reading("mem", REAL - 21 * DAY + k * 600_000, float(k)) for k in range(6)]
    assert clock.stamp(replay) == replay  # three weeks old, in order: kept as they are
    [live] = clock.stamp([reading(t, "mem")])
    assert (live.ts, live.quality) == (t.wall, 0)
    # 1970 and 2000-01-01 (a logger whose battery died) after live readings: rejected, not
    # made previous + 1 ms (a made-up time that looked right).
    assert clock.stamp([Reading("mem", 0, 1.0), Reading("mem", Y2K, 2.0)]) == []
    assert clock._last["mem"][0] == t.wall
    assert clock.status()["rejected_timestamps"] == {"future": 0, "past": 2}


def test_while_unsynchronised_only_times_no_clock_can_show_are_rejected() -> None:
    t = FakeTime(10_000)  # 1970: a logger's own times are all "ahead" of it
    clock = t.clock()
    out = clock.stamp(
        [
            Reading("nines", NINES, 1.0),
            Reading("wrap", MAX_PLAUSIBLE_MS + 1, 2.0),
            Reading("late", MAX_PLAUSIBLE_MS, 3.0),
            Reading("y2k", Y2K, 4.0),  # ahead of the 1970 clock, but before 2020: never sendable
            Reading("first", MIN_PLAUSIBLE_MS, 5.0),
            Reading("gw", t.wall, 6.0),  # the gateway's own stamp: on the frame, flagged
        ]
    )
    assert [(r.series, r.ts, r.quality) for r in out] == [
        ("late", MAX_PLAUSIBLE_MS, 0),
        ("first", MIN_PLAUSIBLE_MS, 0),
        ("gw", t.wall, UNSYNCED),
    ]
    assert clock.status()["rejected_timestamps"] == {"future": 2, "past": 1}


def test_an_unsynchronised_clock_is_taken_as_behind_the_truth() -> None:
    """Booted at its last shutdown time (fake-hwclock), the box is behind: a time more than
    max_age_days before it is older still (rejected); one more than max_future_s ahead is a
    source's own (kept as it is). Within those, a source's own time cannot be told from the
    clock's: it goes on the frame and the repair moves it (the documented limit)."""
    t = FakeTime(REAL - 30 * DAY)
    clock = t.clock()
    out = clock.stamp(
        [
            Reading("old", t.wall - A - 1, 1.0),
            Reading("replay", t.wall - 20 * DAY, 2.0),
            Reading("rtc", REAL, 3.0),
        ]
    )
    assert [(r.series, r.ts, r.quality) for r in out] == [
        ("replay", t.wall - 20 * DAY, UNSYNCED),
        ("rtc", REAL, 0),
    ]
    assert clock.status()["rejected_timestamps"] == {"future": 0, "past": 1}


async def test_a_step_back_beyond_the_future_bound_restarts_the_series_a_smaller_one_bumps() -> (
    None
):
    t = FakeTime(REAL, synced=True)
    clock = t.clock(max_future_s=3600)
    [a] = clock.stamp([reading(t, "s")])
    clock.stamp([reading(t, "other")])
    t.advance(1000)
    t.step(-1_800_000)  # half an hour back: within the bound, order is kept over accuracy
    [b] = clock.stamp([reading(t, "s")])
    assert (b.ts, b.quality) == (a.ts + 1, REPAIRED)
    t.advance(1000)
    t.step(-7_200_000)  # two hours more: both series are now beyond the bound
    with capture_logs() as logs:
        await look(clock)
    assert clock.status()["series_restarted_total"] == 2 and clock._last == {}
    [restarted] = [e for e in logs if e["event"] == "clock_series_restarted"]
    assert restarted["log_level"] == "warning" and restarted["series"] == 2
    [c] = clock.stamp([reading(t, "s")])
    assert (c.ts, c.quality) == (t.wall, 0)


async def test_a_source_s_own_time_kept_while_unsynchronised_is_judged_at_the_sync() -> None:
    t = FakeTime(REAL - 30 * DAY)  # fake-hwclock: a month behind
    clock = t.clock()
    [r] = clock.stamp([Reading("rtc", REAL + 3 * DAY, 1.0)])  # a month ahead of it: kept
    assert (r.ts, r.quality) == (REAL + 3 * DAY, 0)
    t.step(REAL - t.wall)  # NTP: that logger was 3 days ahead after all
    t.synced = True
    for _ in range(2):
        t.advance(500)
        await clock.tick()
    assert clock.synchronized
    assert "rtc" not in clock._last and clock.status()["series_restarted_total"] == 1
    t.advance(STRAGGLER_MS)
    [n] = clock.stamp([Reading("rtc", t.wall, 2.0)])
    assert (n.ts, n.quality) == (t.wall, 0)


def test_a_frame_stamp_is_not_bumped_past_a_source_s_own_time() -> None:
    t = FakeTime(10_000)
    clock = t.clock()
    clock.stamp([Reading("x", REAL, 1.0)])  # the logger's own time
    t.advance(1000)
    [frame] = clock.stamp([reading(t, "x")])  # a stamp of the 1970 clock, same series
    # Not REAL + 1 ms flagged: the repair would move that 56 years on.
    assert (frame.ts, frame.quality) == (t.wall, UNSYNCED)
    assert clock.status()["series_restarted_total"] == 1


#: The true time at monotonic 0 in the property test below (its NTP sets the wall clock so).
TRUTH = REAL - 5_000

_LOGGER_TS = st.one_of(
    st.tuples(
        st.just("abs"),
        st.one_of(
            st.sampled_from(
                [
                    0,
                    10_000,
                    -DAY,
                    Y2K,
                    MIN_PLAUSIBLE_MS - 1,
                    MIN_PLAUSIBLE_MS,
                    REAL,
                    REAL - 21 * DAY,
                    REAL + 3 * DAY,
                    REAL + 400 * DAY,
                    MAX_PLAUSIBLE_MS,
                    MAX_PLAUSIBLE_MS + 1,
                    NINES,
                ]
            ),
            st.integers(-(10**13), 3 * 10**14),
        ),
    ),
    st.tuples(st.just("future"), st.integers(-2, 2)),  # the future bound, +- a few ms
    st.tuples(st.just("past"), st.integers(-2, 2)),  # the past bound
    st.tuples(st.just("rel"), st.integers(-800 * DAY, 3 * DAY)),  # from the system clock
    st.tuples(st.just("dup"), st.just(0)),  # the series' previous time again
    st.tuples(st.just("back"), st.integers(1, 10 * DAY)),  # before the series' previous time
)


@st.composite
def logger_scripts(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """Operations: time passes, a logger hands over 1-3 readings of series a/b with its own
    timestamps, the clock task looks, NTP sets the clock and says so."""
    op = st.one_of(
        st.tuples(st.just("advance"), st.integers(1, 600_000)),
        st.tuples(
            st.just("emit"),
            st.lists(st.tuples(st.sampled_from("ab"), _LOGGER_TS), min_size=1, max_size=3),
        ),
        st.tuples(st.just("look"), st.none()),
        st.tuples(st.just("sync"), st.none()),
    )
    return draw(st.lists(op, min_size=1, max_size=40))


@settings(max_examples=300, deadline=None)
@given(
    script=logger_scripts(),
    start=st.sampled_from(
        [("synced", REAL), ("1970", 10_000), ("behind", REAL - 30 * DAY), ("right", REAL)]
    ),
    future_s=st.sampled_from([60, 3600, 86_400, 10 * 86_400]),
    age_days=st.sampled_from([7, 365]),
)
# The issue: one 9999 line, then good ones.
@example(
    script=[
        ("emit", [("a", ("rel", 0))]),
        ("emit", [("a", ("abs", NINES))]),
        ("advance", 1000),
        ("emit", [("a", ("rel", 0))]),
    ],
    start=("synced", REAL),
    future_s=86_400,
    age_days=365,
)
# A logger's own (right) times at a 1970 boot, the sync, then more.
@example(
    script=[
        ("emit", [("a", ("abs", REAL))]),
        ("sync", None),
        ("advance", 1000),
        ("emit", [("a", ("rel", 0)), ("a", ("dup", 0))]),
    ],
    start=("1970", 10_000),
    future_s=86_400,
    age_days=365,
)
# At 1970: 9999 (beyond any clock), 2000 (before 2020), a right time; the sync; more.
@example(
    script=[
        ("emit", [("a", ("abs", NINES)), ("a", ("abs", Y2K)), ("a", ("abs", REAL))]),
        ("sync", None),
        ("emit", [("a", ("rel", 0)), ("a", ("dup", 0))]),
    ],
    start=("1970", 10_000),
    future_s=86_400,
    age_days=365,
)
# Unsynchronised: a time just beyond the bound (a source's own), the clock catches up, then a
# time of the same series on the frame, before it: not bumped past the own time, restarted.
@example(
    script=[("emit", [("a", ("future", 2))]), ("advance", 1000), ("emit", [("a", ("back", 5))])],
    start=("right", REAL),
    future_s=60,
    age_days=7,
)
# A logger's own time days ahead of the truth, kept while unsynchronised, judged at the sync.
@example(
    script=[
        ("emit", [("b", ("abs", REAL + 3 * DAY))]),
        ("sync", None),
        ("emit", [("b", ("rel", 0))]),
    ],
    start=("behind", REAL - 30 * DAY),
    future_s=86_400,
    age_days=365,
)
async def test_whatever_times_a_logger_sends_series_stay_within_the_bounds(
    script: list[tuple[str, Any]], start: tuple[str, int], future_s: int, age_days: int
) -> None:
    """The documented rule as a model: which readings are rejected and why, where the rest
    land (their own time, on the frame, or bumped by the per-series order), and that every
    reading out, and every series' last time, is within the bounds of the moment."""
    state, wall = start
    t = FakeTime(wall, synced=state == "synced")
    clock = t.clock(max_future_s=future_s, max_age_days=age_days)
    fut, age = future_s * 1000, age_days * DAY
    last: dict[str, tuple[int, str]] = {}  # per series: last time out, and "clock"/"frame"/"own"
    sent: dict[str, int] = {}  # per series: the last time the logger sent (for dup and back)
    rejected = {"future": 0, "past": 0}
    last_rejected: tuple[str, str, str] | None = None
    restarts = 0
    value = 0

    def check_state() -> None:
        W, mono, ref = t.wall, t.mono, clock._ref
        for ts, kind in clock._last.values():
            if clock.synchronized:
                assert ts <= W + fut, "a series' last time beyond the future bound"
            elif kind == OWN:
                assert ts <= MAX_PLAUSIBLE_MS
            else:
                assert ts <= mono + ref + fut, "a series' last frame time beyond the bound"
        assert {s: ts for s, (ts, _) in clock._last.items()} == {s: v[0] for s, v in last.items()}
        st_ = clock.status()
        assert st_["rejected_timestamps"] == rejected
        assert st_["series_restarted_total"] == restarts
        lr = st_["last_rejected_timestamp"]
        assert (lr and (lr["series"], lr["ts"], lr["reason"])) == last_rejected

    for op, arg in script:
        if op == "advance":
            t.advance(arg)
        elif op == "look":
            await clock.tick()
        elif op == "sync" and not clock.synchronized:
            ref_before = clock._ref
            t.step(TRUTH + t.mono - t.wall)
            t.synced = True
            for _ in range(2):
                t.advance(500)
                await clock.tick()
            assert clock.synchronized
            delta = clock._ref - ref_before
            moved = {s: (ts + delta if kind == "frame" else ts) for s, (ts, kind) in last.items()}
            last = {s: (ts, "clock") for s, ts in moved.items() if ts <= t.wall + fut}
            restarts += len(moved) - len(last)
            check_state()
            t.advance(STRAGGLER_MS + 1)  # past the step's stragglers (tested above)
        elif op == "emit":
            W, mono, ref, synced = t.wall, t.mono, clock._ref, clock.synchronized
            offset = W - mono
            batch: list[Reading] = []
            expected: list[tuple[str | None, str, int, int]] = []
            for series, (how, n) in arg:
                prev_sent = sent.get(series, W)
                ts = {
                    "abs": n,
                    "future": W + fut + n,
                    "past": W - age + n,
                    "rel": W + n,
                    "dup": prev_sent,
                    "back": prev_sent - n,
                }[how]
                sent[series] = ts
                value += 1
                batch.append(Reading(series, ts, float(value)))
                why: str | None = None
                if ts > W + fut:
                    if synced or ts > MAX_PLAUSIBLE_MS:
                        why = "future"
                    elif ts < MIN_PLAUSIBLE_MS:
                        why = "past"
                    kind, base, hi = "own", ts, MAX_PLAUSIBLE_MS
                elif ts < W - age:
                    why, kind, base, hi = "past", "", 0, 0
                elif synced:
                    kind, base, hi = "clock", ts, W + fut
                else:
                    kind, base, hi = "frame", ts - offset + ref, mono + fut + max(offset, ref)
                expected.append((why, kind, base, hi))
            out = clock.stamp(batch)
            kept = [r for r, e in zip(batch, expected, strict=True) if e[0] is None]
            assert [r.value for r in out] == [r.value for r in kept], "a reading in bounds lost"
            got = iter(out)
            for r_in, (why, kind, base, hi) in zip(batch, expected, strict=True):
                if why is not None:
                    rejected[why] += 1
                    last_rejected = (r_in.series, iso_ms(r_in.ts), why)
                    continue
                r = next(got)
                prev = last.get(r.series)
                q = UNSYNCED if kind == "frame" else 0
                if prev is None or base > prev[0]:
                    assert (r.ts, r.quality) == (base, q)
                elif prev[0] < hi and not (kind == "frame" and prev[1] == "own"):
                    assert (r.ts, r.quality) == (prev[0] + 1, q | REPAIRED), "not bumped"
                else:  # the series' last time is beyond what this reading may be bumped to
                    assert (r.ts, r.quality) == (base, q)
                    restarts += 1
                if synced:
                    assert W - age <= r.ts <= W + fut
                elif kind == "frame":
                    assert mono + ref - age <= r.ts <= mono + ref + fut
                else:
                    assert MIN_PLAUSIBLE_MS <= r.ts <= MAX_PLAUSIBLE_MS
                last[r.series] = (r.ts, kind)
        check_state()
