"""Readings and the small value types that travel with them.

A :class:`Reading` is one value of one series at one instant. It carries no unit and no service
identifier: those belong to an uplink's route for that series. A :class:`StoredReading` is a
reading the store has committed, with the id uplinks acknowledge it by.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import IntFlag
from itertools import repeat
from typing import NamedTuple, overload

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


class StoredReading(NamedTuple):
    """A captured reading as an uplink sees it: ``id`` is its place in the store's queue.

    A named tuple, not a dataclass: the store's lease makes one per leased row, and a tuple is
    built from a result row in C (``tuple.__new__`` over zipped columns, gateway/store/cursors.py)
    where a dataclass runs its Python ``__init__``; its fields are read as fast.
    """

    id: int
    series: str
    ts: int
    value: Value
    position: Position | None = None
    quality: int = 0


class ReadingBatch(Sequence[Reading]):
    """Readings of one instant as columns: one poll of a device (``series[i]`` has
    ``values[i]``), all with the same ``ts`` and ``quality`` and no position.

    It travels from the source through the clock's stamp into the store's queue and its INSERT
    as one object, so a poll of 125 registers costs one object, not 125 (BENCHMARKS.md). It *is*
    a sequence of :class:`Reading`: anything that iterates or indexes it gets readings equal to
    what the source would have made one by one, so only the hot path needs to know it.
    ``series`` is usually one tuple shared by every poll of a device's request.
    """

    __slots__ = ("quality", "series", "ts", "values")

    def __init__(
        self, series: Sequence[str], ts: int, values: Sequence[Value], quality: int = 0
    ) -> None:
        if len(series) != len(values):
            raise ValueError(f"{len(series)} series for {len(values)} values")
        self.series = series
        self.ts = ts
        self.values = values
        self.quality = quality

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, i: int) -> Reading: ...
    @overload
    def __getitem__(self, i: slice) -> ReadingBatch: ...
    def __getitem__(self, i: int | slice) -> Reading | ReadingBatch:
        if isinstance(i, slice):
            return ReadingBatch(self.series[i], self.ts, self.values[i], self.quality)
        return Reading(self.series[i], self.ts, self.values[i], None, self.quality)

    def __iter__(self) -> Iterator[Reading]:
        return map(
            Reading, self.series, repeat(self.ts), self.values, repeat(None), repeat(self.quality)
        )

    def __repr__(self) -> str:
        return f"ReadingBatch({len(self)} readings, ts={self.ts}, quality={self.quality})"

    def with_stamp(self, ts: int, quality: int) -> ReadingBatch:
        """The same readings with another timestamp and quality (columns shared)."""
        return ReadingBatch(self.series, ts, self.values, quality)


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
