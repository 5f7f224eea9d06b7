"""Is the system clock synchronised? (Kernel NTP state, or systemd-timesyncd's flag file.)

A box without a real-time clock boots at 1970 or at its last shutdown time and steps when NTP
syncs. ``adjtimex(2)`` reports ``TIME_ERROR`` (5) while the kernel considers the clock
unsynchronised; timesyncd touches ``/run/systemd/timesync/synchronized`` once it has synced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass
from pathlib import Path

TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
TIME_ERROR = 5


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux); only the return value of adjtimex is read, but
    # the kernel writes the whole struct, so it must be full-size.
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 204)]


def _adjtimex_state() -> int | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        tx = _Timex()
        tx.modes = 0  # read only
        rc: int = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    return None if rc < 0 else rc


@dataclass(frozen=True, slots=True)
class ClockState:
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
    now = time.time()
    if TIMESYNC_FLAG.exists():
        return ClockState(True, "timesyncd", now)
    rc = _adjtimex_state()
    if rc is None:
        return ClockState(None, "unknown", now)
    return ClockState(rc != TIME_ERROR, "adjtimex", now)
