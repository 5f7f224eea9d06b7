"""The clock service's pure logic: sync state, steps, stamping, and what an uplink may send.

Both clocks and the sync probe are fakes that move only when told; no test sleeps. The store's
side of the repair (SQLite, buffered readings, restarts) and delivery through a real uplink are
in tests/integration/test_clock_repair.py.
"""

from __future__ import annotations

from collections import defaultdict

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.clock import (
    MIN_PLAUSIBLE_MS,
    REPAIRED,
    STRAGGLER_MS,
    UNSYNCED,
    Clock,
    ClockState,
    clock_state,
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
@example(script=[("emit", 1), ("sync", 1), ("step", -1), ("look", 0), ("look", 0), ("emit", 1)],
         start=REAL - 30 * DAY, synced=False)
async def test_whatever_the_wall_clock_does_a_series_never_goes_back_nor_repeats_an_instant(
    script: list[tuple[str, int]], start: int, synced: bool
) -> None:
    t = FakeTime(start, synced=synced)
    clock = t.clock()
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
                last = {s: ((ts + delta, False) if unsynced else (ts, False))
                        for s, (ts, unsynced) in last.items()}
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
    items = [stored(11, REAL, UNSYNCED), stored(12, 5_000, UNSYNCED), stored(13, REAL),
             stored(3, 7_000)]
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
