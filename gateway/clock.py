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
  clock by D, that series is stamped 1 ms apart for up to D: order is kept over accuracy). So a
  series is never reordered and never has two readings at one instant, whatever the wall clock
  does; repair keeps this (it moves a boot's unsynchronised readings together).
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway.configbase import ClockConfig
from gateway.models import Quality, Reading, StoredReading

if TYPE_CHECKING:
    from gateway.store import Store

log = structlog.get_logger(__name__)

TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
TIME_ERROR = 5
#: 2020-01-01T00:00:00Z in ms: no reading is stamped before it unflagged, none is sent.
MIN_PLAUSIBLE_MS = 1_577_836_800_000
#: How long after a step a reading is still checked for having been stamped before it.
STRAGGLER_MS = 60_000
#: Slack for comparing times read from two clocks, each rounded to the millisecond.
_TOLERANCE_MS = 5
#: Key of the clock's state in the store's meta table.
META_KEY = "clock"

UNSYNCED = int(Quality.CLOCK_UNSYNCED)
REPAIRED = int(Quality.CLOCK_REPAIRED)

_BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)


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
        self._store: Store | None = None
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
        #: Per series: its last timestamp and whether that one was unsynchronised.
        self._last: dict[str, tuple[int, bool]] = {}
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
            s: ((ts + delta, False) if unsynced else (ts, False))
            for s, (ts, unsynced) in self._last.items()
        }
        if self._store is not None and self.first_id is not None:
            self._repair = _Repair(self._store.next_id() - 1, delta, self._offset)
        else:
            self._ref = self._offset
        log.info("clock_synchronized", source=self.source, repair_by_s=round(delta / 1000, 3))

    # ------------------------------------------------------------------------------------------
    # Running

    async def start(self, store: Store) -> None:
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

    def stamp(self, readings: Sequence[Reading]) -> list[Reading]:
        """The readings as they are to be stored: flags and timestamps per the module docstring.

        Called by the store right before the readings join its queue, in that order.
        """
        mono = self._look(probe=False)
        step = self.step
        if step is not None and mono - step.seen_mono_ms > STRAGGLER_MS:
            step = None
        synced, offset, ref = self.synchronized, self._offset, self._ref
        last = self._last
        out: list[Reading] = []
        for r in readings:
            ts, q = r.ts, r.quality
            taken = offset if step is None else _offset_at_capture(ts, mono, offset, step)
            if synced:
                if taken != offset:
                    ts += offset - taken
                    q |= REPAIRED
                if ts < MIN_PLAUSIBLE_MS:
                    q |= UNSYNCED
            else:
                ts += ref - taken
                q |= UNSYNCED
            prev = last.get(r.series)
            if prev is not None and ts <= prev[0]:
                ts = prev[0] + 1
                q |= REPAIRED
            last[r.series] = (ts, bool(q & UNSYNCED))
            out.append(r if ts == r.ts and q == r.quality else replace(r, ts=ts, quality=q))
        return out

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
        if not any(i.quality & UNSYNCED or i.ts < MIN_PLAUSIBLE_MS for i in items):
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
        }


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
