"""Time on a box without a real-time clock: is the clock synchronised, did it step, and what
timestamp a reading gets.

A box without an RTC boots at 1970 or at its last shutdown time (fake-hwclock) and steps when NTP
syncs. ``adjtimex(2)`` reports ``TIME_ERROR`` (5) while the kernel considers the clock
unsynchronised; systemd-timesyncd touches ``/run/systemd/timesync/synchronized`` once it has synced.

:class:`Clock` is the one place readings get their final timestamp. The supervisor runs
:meth:`Clock.run` as task ``clock`` (one look per ``check_interval_s``) and passes
:meth:`Clock.stamp` to the store's ``ingest`` for every source; uplinks ask :meth:`Clock.gate`
what of a lease they may send now. Both clocks are injectable (tests fake them); production uses
the wall clock and ``CLOCK_BOOTTIME`` (monotonic, and it keeps counting through a suspend, so a
suspended box does not look like a stepped clock). The *offset* is wall minus monotonic time; it
changes only when the clock is stepped (NTP slews change both clocks' rate alike), so a change
above ``step_threshold_s`` between two looks is a **step**.

What callers may rely on:

* **Synchronised** means: the probe (timesyncd's flag, else adjtimex; or ``trust = "always"``)
  says so *and* the wall clock is after 2020-01-01. While running, a change to synchronised must
  be seen on two consecutive looks with no step between them (so a step that lands just after the
  flag is not missed); at start-up one look is enough.
* **Unsynchronised readings** are flagged ``CLOCK_UNSYNCED`` and stamped on this boot's
  *reference frame*: ``ts = capture time on the monotonic clock + ref_offset``. ``ref_offset`` is
  the offset when this boot's first reading was stamped (kept in the store's ``meta`` table with
  the boot id and the first reading id of the boot), later the offset at the last sync. So steps
  while unsynchronised do not move them: one series stays in order and every unsynchronised
  reading of the boot is repaired by the same amount.
* **Repair**: when the clock becomes synchronised, every ``CLOCK_UNSYNCED`` reading stamped in this
  boot (committed or still buffered, also by an earlier run of this process in the same boot) gets
  ``offset_now - ref_offset`` added and ``CLOCK_REPAIRED`` instead of ``CLOCK_UNSYNCED``, in one
  transaction that also saves the new ``ref_offset``. Its timestamp is then the monotonic time of
  capture on the synchronised clock: exact up to the step threshold (a step smaller than it is
  not seen) and to the gap between the step and the sync. Readings flagged unsynchronised by an
  earlier boot cannot be repaired (the monotonic clock restarted) and stay flagged.
* **A reading stamped just before a step but handed over after it** (a source is slow to emit)
  is recognised for a minute after the step by where its capture time falls, and moved by the
  step (``CLOCK_REPAIRED``) or put on the reference frame.
* **Per series, timestamps strictly increase** in the order readings are handed to the store,
  within one run of the process: a timestamp at or before the series' previous one becomes
  previous + 1 ms and is flagged ``CLOCK_REPAIRED`` (after a backward step of a synchronised
  clock by D, that series is stamped 1 ms apart for up to D when D is less than
  ``max_future_s``: order is kept over accuracy). So a series is never reordered and never has
  two readings at one instant, whatever the wall clock does, except where the future bound
  (below) makes the clock forget a series' last timestamp; repair keeps this (it moves a boot's
  unsynchronised readings together).
* **Implausible timestamps are rejected** before the frame, the repair or the per-series order
  touch them: counted per reason (``rejected_timestamps`` in :meth:`Clock.status`, with the last
  one), never stored, never moving the series' last timestamp; a warning when a series starts
  being rejected (or for another reason), repeats at debug until it has a reading accepted. A
  reading carries no mark of who stamped it (a source with its own clock, say a logger's
  timestamp column, or the gateway's clock at capture): it is judged by where its time falls.
  While the clock is **synchronised**: ``future`` when more than ``max_future_s`` ahead of the
  clock, ``past`` when more than ``max_age_days`` behind it. While it is **not**, the system
  clock is taken to be behind the true time or right (it boots at 1970 or at its last shutdown
  time and is stepped forward), never ahead, so it cannot judge the future: a reading more than
  ``max_future_s`` ahead of it cannot have been stamped by it and is a source's own time (a
  logger's battery clock is often right while the box is at 1970). That reading is kept as it
  is, **unflagged and not on the boot's frame** (a repair would move a correct time by the
  clock's error, 56 years from 1970; so a holding uplink sends it at once, with no repair to wait
  for), unless no clock this software runs with can show it:
  after 2100-01-01 (``future``: 9999-12-31, 2106 or 2165 wrap-arounds) or before 2020-01-01
  (``past``: it could never be sent). A reading within ``max_future_s`` of the unsynchronised
  clock is taken as stamped by it (frame, flag, repair, as above), and ``past`` when more than
  ``max_age_days`` behind it (with the clock behind the truth, it is older still). So a source's
  own time, received while unsynchronised and less than ``max_future_s`` ahead of the system
  clock, is repaired like the gateway's own: at most ``max_future_s`` too late, within the bound.
* **Per series, timestamps stay within the future bound**: ``max_future_s`` ahead of the
  synchronised clock; while unsynchronised, as much ahead of the frame (or of the clock, if
  later) for flagged stamps and 2100-01-01 for a source's own. A bump (above) that would cross
  it, or a series' last timestamp left beyond it by a backward step of the synchronised clock or
  by a sync (a source's own time accepted unsynchronised), makes the clock forget that last
  timestamp: the series restarts from the reading's own time (``series_restarted_total``; a
  warning). Ordering is given up there, not accuracy: the times before were wrong by more than
  the bound. So is a frame stamp at or before a source's own time (the repair moves the one and
  not the other).
* **Never before 2020 unflagged**: a timestamp before 2020-01-01 is always ``CLOCK_UNSYNCED``, and
  :meth:`Clock.gate` never lets one go to any uplink (it waits for the repair, or is dead-lettered
  when no repair can come).
* **Gate** (per uplink, ``hold_unsynced``): a holding uplink sends nothing at or after the first
  repairable unsynchronised reading of a lease; those stay pending and the store does not lease
  them again until the repair releases them (no backoff, no polling). Unsynchronised readings
  that no repair will reach (an earlier boot, or stamped unsynchronised although the clock is
  synchronised) are dead-lettered with the reason, where they stay visible and replayable. A
  non-holding uplink sends unsynchronised readings at once with the flag in ``quality`` (for a
  plugin whose service has a place for it) and the time the clock showed; it still never sends
  one before 2020.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import repeat
from operator import and_, attrgetter
from pathlib import Path
from typing import Any, Protocol

import structlog

from gateway.configbase import ClockConfig
from gateway.models import Quality, Reading, ReadingBatch, StoredReading

log = structlog.get_logger(__name__)

TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
TIME_ERROR = 5
#: 2020-01-01T00:00:00Z in ms: no reading is stamped before it unflagged, none is sent.
MIN_PLAUSIBLE_MS = 1_577_836_800_000
#: 2100-01-01T00:00:00Z in ms: while unsynchronised, a source's own time after it is rejected.
MAX_PLAUSIBLE_MS = 4_102_444_800_000
#: How long after a step a reading is still checked for having been stamped before it.
STRAGGLER_MS = 60_000
#: Slack for comparing times read from two clocks, each rounded to the millisecond.
_TOLERANCE_MS = 5
#: Key of the clock's state in the store's meta table.
META_KEY = "clock"

UNSYNCED = int(Quality.CLOCK_UNSYNCED)
REPAIRED = int(Quality.CLOCK_REPAIRED)

# What a series' last timestamp was (Clock._last): on the synchronised clock (or a source's own,
# judged by it), on the boot's frame (flagged: moved by the repair), or a source's own time kept
# while unsynchronised (not moved by the repair, so never compared with frame stamps).
CLOCK, FRAME, OWN = 0, 1, 2
#: What a series with no stamp yet compares as (before any timestamp).
_NO_PREV = (-(1 << 63), CLOCK)
_TS = attrgetter("ts")
_QUALITY = attrgetter("quality")

_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


class ClockStore(Protocol):
    """What the clock uses of the store (``gateway.store.Store`` provides it): its meta table,
    the id the next ingested reading gets, and the repair of unsynchronised readings."""

    async def load_meta(self, key: str) -> Any: ...

    async def save_meta(self, key: str, value: Any) -> None: ...

    def next_id(self) -> int: ...

    async def count_unsynced(self) -> int: ...

    async def repair_unsynced(
        self, first_id: int, upto: int, delta_ms: int, meta: tuple[str, Any] | None = None
    ) -> int: ...

    async def release_holds(self) -> None: ...


def boottime_ns() -> int:
    """Monotonic nanoseconds since boot, suspend included where the OS has CLOCK_BOOTTIME."""
    return time.clock_gettime_ns(_BOOTTIME) if _BOOTTIME is not None else time.monotonic_ns()


def read_boot_id() -> str | None:
    """This boot's id (Linux); None where there is none, so every start counts as a new boot."""
    try:
        return BOOT_ID.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# The sync probe


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux); only the return value of adjtimex is read, but
    # the kernel writes the whole struct, so it must be full-size.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 204)]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    # Loaded once: find_library may run ldconfig, far too slow for a once-a-second probe.
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _adjtimex_state() -> int | None:
    libc = _libc()
    if libc is None:
        return None
    try:
        tx = _Timex()
        tx.modes = 0  # read only
        rc: int = libc.adjtimex(ctypes.byref(tx))
    except AttributeError:  # no adjtimex in this libc (not Linux)
        return None
    return None if rc < 0 else rc


@dataclass(frozen=True, slots=True)
class ClockState:
    """What the probe says: ``synchronized`` is None when it cannot tell."""

    synchronized: bool | None
    source: str
    wall_time: float

    def as_dict(self) -> dict[str, object]:
        return {
            "synchronized": self.synchronized,
            "source": self.source,
            "wall_time": self.wall_time,
        }


def clock_state() -> ClockState:
    """The system's own view: timesyncd's flag file, else the kernel's NTP state."""
    now = time.time()
    if TIMESYNC_FLAG.exists():
        return ClockState(True, "timesyncd", now)
    rc = _adjtimex_state()
    if rc is None:
        return ClockState(None, "unknown", now)
    return ClockState(rc != TIME_ERROR, "adjtimex", now)


# ----------------------------------------------------------------------------------------------
# The clock service


@dataclass(frozen=True, slots=True)
class Step:
    """A step of the wall clock, as seen between two looks (monotonic ms)."""

    before_mono_ms: int
    seen_mono_ms: int
    old_offset_ms: int
    new_offset_ms: int

    @property
    def delta_ms(self) -> int:
        return self.new_offset_ms - self.old_offset_ms


@dataclass(frozen=True, slots=True)
class _Repair:
    """A repair decided at sync, to be written: readings up to ``upto`` move by ``delta_ms``."""

    upto: int
    delta_ms: int
    new_ref_ms: int


@dataclass(slots=True)
class Gate:
    """What an uplink does with a lease now: send ``send``; keep every reading with id from
    ``hold_from`` on pending until the repair; dead-letter ``rejected`` (id -> reason)."""

    send: list[StoredReading]
    hold_from: int | None = None
    rejected: dict[int, str] = field(default_factory=dict)


class Clock:
    """The clock service (module docstring). Attach to the store with :meth:`start` before any
    reading is stamped; then :meth:`run` as task ``clock``."""

    def __init__(
        self,
        cfg: ClockConfig | None = None,
        *,
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = boottime_ns,
        probe: Callable[[], ClockState] = clock_state,
        boot_id: Callable[[], str | None] = read_boot_id,
    ) -> None:
        self.cfg = cfg or ClockConfig()
        self._wall_ns, self._mono_ns, self._probe = wall_ns, mono_ns, probe
        self._boot_id = boot_id
        self._threshold_ms = int(self.cfg.step_threshold_s * 1000)
        wall, mono = self._read()
        self._offset = wall - mono
        self._look_mono = mono
        #: Frame of unsynchronised stamps: ts = monotonic capture time + _ref.
        self._ref = self._offset
        self.synchronized = False
        self.source = "unknown"
        #: The previous look said synchronised and no step was seen since (confirms a sync).
        self._ok_before = False
        self._store: ClockStore | None = None
        self._boot: str | None = None
        #: Readings of this boot have ids from here on (None: not attached to a store).
        self.first_id: int | None = None
        self._repair: _Repair | None = None
        self._repaired_upto = 0
        self.step: Step | None = None
        self.steps_total = 0
        self.last_step_at: float | None = None
        self.repaired_total = 0
        self.unsynced_pending = 0
        self._future_ms = int(self.cfg.max_future_s * 1000)
        self._age_ms = int(self.cfg.max_age_days * 86_400_000)
        #: Readings rejected for an implausible timestamp, per reason; the last one.
        self.rejected: dict[str, int] = {"future": 0, "past": 0}
        self.last_rejected: dict[str, Any] | None = None
        #: Series whose last timestamp was forgotten for lying beyond the future bound.
        self.series_restarted_total = 0
        #: Series whose last reading was rejected, and why: repeats are only counted (debug).
        self._rejecting: dict[str, str] = {}
        #: Series already warned about restarting: later restarts are only counted.
        self._restart_warned: set[str] = set()
        #: Per series: its last timestamp and what it was (CLOCK, FRAME or OWN).
        self._last: dict[str, tuple[int, int]] = {}
        #: Never below any timestamp in ``_last``: a poll stamped later than it is later than
        #: every series' last stamp, with no need to look them up.
        self._newest = _NO_PREV[0]
        self._lock = asyncio.Lock()
        self._take_probe(self._probe(), wall, at_start=True)

    # ------------------------------------------------------------------------------------------
    # Looking at the clock

    def _read(self) -> tuple[int, int]:
        return self._wall_ns() // 1_000_000, self._mono_ns() // 1_000_000

    def _look(self, *, probe: bool) -> int:
        """Read both clocks, note a step; with ``probe`` also the sync state. Returns mono ms."""
        wall, mono = self._read()
        offset = wall - mono
        stepped = abs(offset - self._offset) > self._threshold_ms
        if stepped:
            self._on_step(Step(self._look_mono, mono, self._offset, offset), wall)
        self._offset = offset
        self._look_mono = mono
        if stepped and self.synchronized:
            self._forget_beyond(wall + self._future_ms, "step")
        if probe:
            self._take_probe(self._probe(), wall, stepped=stepped)
        return mono

    def _on_step(self, step: Step, wall: int) -> None:
        self.step = step
        self.steps_total += 1
        self.last_step_at = wall / 1000
        self._ok_before = False  # a sync must now be seen again, after the step
        log.warning(
            "clock_stepped",
            by_s=round(step.delta_ms / 1000, 3),
            synchronized=self.synchronized,
        )

    def _take_probe(
        self, state: ClockState, wall: int, *, stepped: bool = False, at_start: bool = False
    ) -> None:
        always = self.cfg.trust == "always"
        self.source = "config" if always else state.source
        ok = (always or state.synchronized is True) and wall >= MIN_PLAUSIBLE_MS
        if at_start:
            self.synchronized = ok
        elif ok and not self.synchronized and self._ok_before and not stepped:
            self._on_sync()
        elif not ok and self.synchronized and self._repair is None:
            # (While a repair is still to be written, the frame it moves readings to is not yet
            # saved; unsynchronised stamps wait for it, so this look is taken again next time.)
            self.synchronized = False
            log.warning("clock_unsynchronized", source=self.source)
        self._ok_before = ok  # read after any step this look saw

    def _on_sync(self) -> None:
        delta = self._offset - self._ref
        self.synchronized = True
        # The series' last unsynchronised stamps move with the repair, so order holds across it.
        self._last = {
            s: ((ts + delta, CLOCK) if kind == FRAME else (ts, CLOCK))
            for s, (ts, kind) in self._last.items()
        }
        self._newest = max((ts for ts, _ in self._last.values()), default=_NO_PREV[0])
        # A source's own time kept while unsynchronised may lie beyond the bound now judged.
        self._forget_beyond(self._look_mono + self._offset + self._future_ms, "sync")
        if self._store is not None and self.first_id is not None:
            self._repair = _Repair(self._store.next_id() - 1, delta, self._offset)
        else:
            self._ref = self._offset
        log.info("clock_synchronized", source=self.source, repair_by_s=round(delta / 1000, 3))

    # ------------------------------------------------------------------------------------------
    # Running

    async def start(self, store: ClockStore) -> None:
        """Attach to ``store`` (before any reading is stamped): resume this boot's reference
        frame from the store, or begin one; repair what an earlier run left if synchronised."""
        self._store = store
        self._boot = self._boot_id()
        saved = await store.load_meta(META_KEY)
        next_id = store.next_id()
        if (
            isinstance(saved, dict)
            and self._boot is not None
            and saved.get("boot_id") == self._boot
            and isinstance(saved.get("first_id"), int)
            and isinstance(saved.get("ref_offset_ms"), int)
        ):
            # Same boot: the monotonic clock runs on, so the saved frame still holds. (min: ids
            # are never reused for readings still in the store, whatever happened to the rest.)
            self.first_id = min(saved["first_id"], next_id)
            self._ref = saved["ref_offset_ms"]
            if self.synchronized:
                self._repair = _Repair(next_id - 1, self._offset - self._ref, self._offset)
        else:
            self.first_id = next_id
            self._ref = self._offset
            await store.save_meta(META_KEY, self._meta(self._ref))
        await self._write_repair()
        self.unsynced_pending = await store.count_unsynced()
        log.info(
            "clock_started",
            synchronized=self.synchronized,
            source=self.source,
            unsynced_pending=self.unsynced_pending,
        )

    def _meta(self, ref: int) -> dict[str, Any]:
        return {"boot_id": self._boot, "first_id": self.first_id, "ref_offset_ms": ref}

    async def tick(self) -> None:
        """One look at the clock and the sync state, and the repair a sync calls for."""
        async with self._lock:
            self._look(probe=True)
            await self._write_repair()
            if self._store is not None:
                self.unsynced_pending = await self._store.count_unsynced()

    async def run(self) -> None:
        """Look every ``check_interval_s`` until cancelled (the supervisor's task ``clock``)."""
        while True:
            await self.tick()
            await asyncio.sleep(self.cfg.check_interval_s)

    async def _write_repair(self) -> None:
        rep, store = self._repair, self._store
        if rep is None or store is None or self.first_id is None:
            return
        n = await store.repair_unsynced(
            self.first_id, rep.upto, rep.delta_ms, (META_KEY, self._meta(rep.new_ref_ms))
        )
        self._ref = rep.new_ref_ms
        self._repaired_upto = max(self._repaired_upto, rep.upto)
        self._repair = None
        self.repaired_total += n
        log.info("clock_repaired", readings=n, by_s=round(rep.delta_ms / 1000, 3))
        await store.release_holds()

    # ------------------------------------------------------------------------------------------
    # Stamping

    def stamp(self, readings: Sequence[Reading]) -> Sequence[Reading]:
        """The readings as they are to be stored: flags and timestamps per the module docstring.
        Readings with an implausible timestamp are left out (counted, see the module docstring),
        so fewer may come back, the rest in their order.

        Called by the store right before the readings join its queue, in that order.
        """
        mono = self._look(probe=False)
        step = self.step
        if step is not None and mono - step.seen_mono_ms > STRAGGLER_MS:
            step = None
        synced, offset, ref = self.synchronized, self._offset, self._ref
        # Bounds in capture time on the monotonic clock (the reading's time on the clock it was
        # stamped with, less that clock's offset); then the highest time a bump may reach: the
        # clock's future bound, unsynchronised the later of the frame's and the clock's (a
        # series' last stamp from before the clock lost its sync is on the latter).
        newest, oldest = mono + self._future_ms, mono - self._age_ms
        top = newest + (offset if synced else max(offset, ref))
        last, rejecting = self._last, self._rejecting
        if isinstance(readings, ReadingBatch) and readings:
            # One poll: one timestamp for all. When it is within bounds and every series' last
            # stamp is older, each reading gets exactly what the loop below would give it, so
            # the batch is stamped as a whole (columns untouched). Otherwise, the loop.
            b = readings
            ts, q = b.ts, b.quality
            taken = offset if step is None else _offset_at_capture(ts, mono, offset, step)
            captured = ts - taken
            if oldest <= captured <= newest:
                ts, q, kind = _in_bounds(
                    ts, q, captured, taken=taken, synced=synced, offset=offset, ref=ref
                )
                series = b.series
                newer = ts > self._newest or max(map(last.get, series, repeat(_NO_PREV)))[0] < ts
                if newer and len(set(series)) == len(series):  # no bump, no series twice
                    last.update(zip(series, repeat((ts, kind))))
                    self._newest = max(self._newest, ts)
                    if rejecting and not rejecting.keys().isdisjoint(series):
                        for name in series:
                            rejecting.pop(name, None)
                    return b if ts == b.ts and q == b.quality else b.with_stamp(ts, q)
        out: list[Reading] = []
        for r in readings:
            ts, q = r.ts, r.quality
            taken = offset if step is None else _offset_at_capture(ts, mono, offset, step)
            captured = ts - taken
            if captured > newest:
                if synced:
                    self._reject(r, "future", newest + offset, mono + offset)
                    continue
                if ts > MAX_PLAUSIBLE_MS:
                    self._reject(r, "future", MAX_PLAUSIBLE_MS, mono + offset)
                    continue
                if ts < MIN_PLAUSIBLE_MS:
                    self._reject(r, "past", MIN_PLAUSIBLE_MS, mono + offset)
                    continue
                kind, hi = OWN, MAX_PLAUSIBLE_MS  # ahead of an unsynchronised clock: kept
            elif captured < oldest:
                self._reject(r, "past", oldest + offset, mono + offset)
                continue
            else:
                ts, q, kind = _in_bounds(
                    ts, q, captured, taken=taken, synced=synced, offset=offset, ref=ref
                )
                hi = top
            prev = last.get(r.series)
            if prev is not None and ts <= prev[0]:
                # A frame stamp is not bumped past a source's own time: the repair moves the
                # one and not the other, so by the clock's whole error.
                if prev[0] < hi and not (kind == FRAME and prev[1] == OWN):
                    ts = prev[0] + 1
                    q |= REPAIRED
                else:
                    self._restarted(r.series, prev[0], hi)
            last[r.series] = (ts, kind)
            self._newest = max(self._newest, ts)
            if rejecting and r.series in rejecting:
                del rejecting[r.series]  # accepted again: the next rejection is news
            out.append(r if ts == r.ts and q == r.quality else replace(r, ts=ts, quality=q))
        return out

    def _reject(self, r: Reading, reason: str, bound: int, wall: int) -> None:
        """Count a reading left out for its timestamp (``bound``: the one it is beyond); warn
        when its series starts being rejected (or for another reason), else log at debug."""
        n = self.rejected[reason] = self.rejected[reason] + 1
        ts = iso_ms(r.ts)
        self.last_rejected = {
            "series": r.series,
            "ts": ts,
            "ts_ms": r.ts,
            "reason": reason,
            "at": wall / 1000,
        }
        emit = log.debug if self._rejecting.get(r.series) == reason else log.warning
        self._rejecting[r.series] = reason
        emit(
            "clock_timestamp_rejected",
            series=r.series,
            reason=reason,
            ts=ts,
            bound=iso_ms(bound),
            synchronized=self.synchronized,
            rejected_total=n,
        )

    def _restarted(self, series: str, prev: int, bound: int) -> None:
        self.series_restarted_total += 1
        emit = log.debug if series in self._restart_warned else log.warning
        self._restart_warned.add(series)
        emit("clock_series_restarted", series=series, last=iso_ms(prev), bound=iso_ms(bound))

    def _forget_beyond(self, bound: int, why: str) -> None:
        """Forget the series' last timestamps beyond ``bound`` (after a step back or a sync)."""
        stale = [s for s, (ts, _) in self._last.items() if ts > bound]
        for s in stale:
            del self._last[s]
        if stale:
            self.series_restarted_total += len(stale)
            log.warning(
                "clock_series_restarted",
                after=why,
                series=len(stale),
                example=stale[0],
                bound=iso_ms(bound),
            )

    # ------------------------------------------------------------------------------------------
    # Sending

    def repairable(self, item: StoredReading) -> bool:
        """True when ``item`` is flagged unsynchronised and a repair will still reach it."""
        if not item.quality & UNSYNCED or item.id <= 0:
            return False  # negative ids are replayed dead letters: no longer in the readings
        if self.first_id is not None and item.id < self.first_id:
            return False  # an earlier boot's: its monotonic clock is gone
        if not self.synchronized:
            return True
        # Synchronised: only readings a repair has covered or is about to cover (the lease may
        # predate it); anything later was flagged for its own time and no repair is coming.
        covered = max(self._repaired_upto, self._repair.upto if self._repair else 0)
        return item.id <= covered

    def gate(self, items: Sequence[StoredReading], *, hold_unsynced: bool) -> Gate:
        """Split a lease for an uplink: see :class:`Gate` and the module docstring."""
        if not items or (
            min(map(_TS, items)) >= MIN_PLAUSIBLE_MS
            and not any(map(and_, map(_QUALITY, items), repeat(UNSYNCED)))
        ):
            return Gate(list(items))  # the usual lease: nothing held, nothing refused

        def waits(i: StoredReading) -> bool:
            return bool(hold_unsynced and i.quality & UNSYNCED) or i.ts < MIN_PLAUSIBLE_MS

        held = [i.id for i in items if waits(i) and self.repairable(i)]
        hold_from = min(held) if held else None
        gate = Gate([], hold_from)
        for i in items:
            if hold_from is not None and i.id >= hold_from:
                continue  # the whole tail waits, so a series goes out in order after the repair
            if not waits(i):
                gate.send.append(i)
            elif i.quality & UNSYNCED:
                gate.rejected[i.id] = (
                    "stamped while the system clock was unsynchronised and no repair can reach "
                    "it (an earlier boot, or flagged while synchronised)"
                )
            else:
                gate.rejected[i.id] = "timestamp before 2020-01-01: the clock was not set"
        return gate

    # ------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The ``clock`` part of /status."""
        wall, _ = self._read()
        return {
            "synchronized": self.synchronized,
            "source": self.source,
            "wall_time": wall / 1000,
            "last_step_s": None if self.step is None else self.step.delta_ms / 1000,
            "last_step_at": self.last_step_at,
            "steps_total": self.steps_total,
            "unsynced_pending": self.unsynced_pending,
            "repaired_total": self.repaired_total,
            "rejected_timestamps": dict(self.rejected),
            "last_rejected_timestamp": self.last_rejected,
            "series_restarted_total": self.series_restarted_total,
            "max_future_s": self.cfg.max_future_s,
            "max_age_days": self.cfg.max_age_days,
        }


def iso_ms(ms: int) -> str:
    """UTC ISO 8601 text of a timestamp in ms (``...Z``), or the number where no date is."""
    try:
        dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
    except OverflowError:
        return f"{ms} ms since 1970"
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _in_bounds(
    ts: int, q: int, captured: int, *, taken: int, synced: bool, offset: int, ref: int
) -> tuple[int, int, int]:
    """A reading's (timestamp, quality, kind) when its capture time is within the bounds: on
    the synchronised clock (moved by a step it was stamped before, flagged when the clock says
    before 2020), or on the frame of an unsynchronised clock, flagged (module docstring)."""
    if not synced:
        return captured + ref, q | UNSYNCED, FRAME
    kind = CLOCK
    if taken != offset:
        ts = captured + offset
        q |= REPAIRED
    if ts < MIN_PLAUSIBLE_MS:
        q |= UNSYNCED
        kind = FRAME
    return ts, q, kind


def _offset_at_capture(ts: int, mono: int, offset: int, step: Step) -> int:
    """The offset ``ts`` was stamped with, shortly after ``step``: the current one when its
    capture time on it falls after the look before the step and not in the future; else the one
    before the step when that puts its capture within a minute before the step was seen; else
    (a source's own, older timestamp) the current one."""
    if step.before_mono_ms - _TOLERANCE_MS <= ts - offset <= mono + _TOLERANCE_MS:
        return offset
    captured = ts - step.old_offset_ms
    if step.seen_mono_ms - STRAGGLER_MS <= captured <= step.seen_mono_ms + _TOLERANCE_MS:
        return step.old_offset_ms
    return offset
