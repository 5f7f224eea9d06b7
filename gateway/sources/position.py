"""The latest position of each GPS source, shared with the sources that carry it.

A GPS source (``type = "nmea"``) publishes every fix it accepts, and ``None`` when it loses the
fix or its port; any other source whose config says ``position_from = "<gps source>"`` gets that
position attached to its readings by :func:`positioned_emit`, which the app wraps around the
source's ``emit``. One board per process; everything runs on the event loop, so no locks.

Callers may rely on:

- :meth:`PositionBoard.latest` never returns a fix older than ``max_age_s``, measured on the
  monotonic clock (a wall-clock step at NTP sync neither ages nor revives a fix);
- publishing ``None`` withdraws the fix at once (GGA quality 0, RMC status V, port lost);
- :meth:`PositionBoard.next_update` wakes on every publish for that name, fix or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway.models import Position, Reading
from gateway.sources.base import Emit


@dataclass(frozen=True, slots=True)
class Published:
    """One publish: the position (None: no fix), its wall time and when it was published."""

    position: Position | None
    at_ms: int
    monotonic: float


class PositionBoard:
    """Latest published position per source name."""

    def __init__(self) -> None:
        self._latest: dict[str, Published] = {}
        self._updated: dict[str, asyncio.Event] = {}

    def publish(self, source_name: str, position: Position | None, at_ms: int) -> None:
        """Record ``position`` (None: the source has no fix now) as of wall time ``at_ms``."""
        self._latest[source_name] = Published(position, at_ms, time.monotonic())
        event = self._updated.pop(source_name, None)
        if event is not None:
            event.set()

    def latest(self, source_name: str, max_age_s: float) -> Position | None:
        """The source's position if it has a fix published less than ``max_age_s`` ago."""
        entry = self._latest.get(source_name)
        if entry is None or entry.position is None:
            return None
        if time.monotonic() - entry.monotonic > max_age_s:
            return None
        return entry.position

    def entry(self, source_name: str) -> Published | None:
        """The last publish of ``source_name`` whatever its age (for status pages and tests)."""
        return self._latest.get(source_name)

    async def next_update(self, source_name: str) -> Position | None:
        """Wait for the next publish of ``source_name`` and return what it published.

        Callers put their own timeout around it; a source that never publishes never wakes it.
        """
        event = self._updated.get(source_name)
        if event is None:
            event = self._updated[source_name] = asyncio.Event()
        await event.wait()
        entry = self._latest[source_name]
        return entry.position

    def resolve(
        self, position_from: str | None, fixed: Position | None, max_age_s: float
    ) -> Position | None:
        """The position a source's readings carry now: the GPS fix if fresh, else ``fixed``."""
        if position_from is not None:
            live = self.latest(position_from, max_age_s)
            if live is not None:
                return live
        return fixed


def positioned_emit(
    emit: Emit,
    board: PositionBoard,
    *,
    position_from: str | None,
    fixed: Position | None,
    max_age_s: float,
) -> Emit:
    """Wrap ``emit`` so readings without a position get the source's current one.

    A reading that already carries a position (a GPS source's own lat/lon readings) keeps it.
    With neither ``position_from`` nor ``fixed`` the original ``emit`` is returned unchanged.
    """
    if position_from is None and fixed is None:
        return emit

    async def wrapped(batch: Sequence[Reading]) -> None:
        pos = board.resolve(position_from, fixed, max_age_s)
        if pos is None:
            await emit(batch)
            return
        await emit([r if r.position is not None else replace(r, position=pos) for r in batch])

    return wrapped
