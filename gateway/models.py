"""Readings and the small value types that travel with them.

A :class:`Reading` is one value of one series at one instant. It carries no unit and no service
identifier: those belong to an uplink's route for that series. A :class:`StoredReading` is a
reading the store has committed, with the id uplinks acknowledge it by.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntFlag

Value = float | int | bool | str

#: Longest string value a reading may carry; longer ones are refused at the source.
MAX_STRING_VALUE = 256


class Quality(IntFlag):
    """Flags about how a reading came to be. Stored as an integer column."""

    OK = 0
    #: Stamped while the system clock was not known to be synchronised (see gateway/clock.py).
    CLOCK_UNSYNCED = 1
    #: Timestamp was repaired after the clock stepped (the offset at the step was applied).
    CLOCK_REPAIRED = 2


@dataclass(frozen=True, slots=True)
class Position:
    """A WGS84 position, degrees and metres."""

    lat: float
    lon: float
    alt: float | None = None


# Readings are values: nothing changes one after it is made (``dataclasses.replace`` makes a new
# one). They are not ``frozen=True`` only because a frozen dataclass's __init__ costs ~8x more
# (one object.__setattr__ per field), and the hot path makes two per data point (bench/e2e.py).
@dataclass(slots=True, unsafe_hash=True)
class Reading:
    """One value of one series at one instant (``ts`` is UTC, integer milliseconds)."""

    series: str
    ts: int
    value: Value
    position: Position | None = None
    quality: int = 0


@dataclass(slots=True, unsafe_hash=True)
class StoredReading:
    """A captured reading as an uplink sees it: ``id`` is its place in the store's queue."""

    id: int
    series: str
    ts: int
    value: Value
    position: Position | None = None
    quality: int = 0


def value_problem(value: object) -> str | None:
    """Why ``value`` cannot be a reading's value, or None when it can.

    NaN and infinities are refused here, at the source, so they never reach a service that takes
    no null values.
    """
    if isinstance(value, bool | int):
        return None
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return f"value {value!r} is not a finite number"
        return None
    if isinstance(value, str):
        if len(value) > MAX_STRING_VALUE:
            return f"string value longer than {MAX_STRING_VALUE} characters"
        return None
    return f"value of type {type(value).__name__} is not a number, bool or string"
