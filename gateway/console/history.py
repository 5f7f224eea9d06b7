"""A small bounded in-memory history of /status for the console's plots.

Every sample keeps, per uplink, its backlog and delivered count and, per source, its readings
count (counters: the page draws rates from their differences). Names are kept once per change of
the set of names (a reload), values as a flat tuple: 360 samples of a dozen sources and uplinks
take well under 200 KB.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

#: One sample every this many seconds, this many kept: the last hour.
INTERVAL_S = 10.0
POINTS = 360


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    uplinks: tuple[str, ...]
    #: (backlog, delivered) per uplink, flattened in the order of ``uplinks``.
    uplink_values: tuple[int, ...]
    sources: tuple[str, ...]
    readings: tuple[int, ...]


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int | float) else 0


class History:
    def __init__(self, points: int = POINTS, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(maxlen=points)
        self._unames: tuple[str, ...] = ()
        self._snames: tuple[str, ...] = ()

    def sample(self, t: float, status: dict[str, Any]) -> Sample:
        """A sample of ``status`` (the shape of :meth:`gateway.app.Gateway.status`), not kept."""
        uplinks = status.get("uplinks") or {}
        sources = status.get("sources") or {}
        unames, snames = tuple(uplinks), tuple(sources)
        # The same tuple object while the names stay the same: one copy for every sample.
        if unames != self._unames:
            self._unames = unames
        if snames != self._snames:
            self._snames = snames
        uvals: list[int] = []
        for n in unames:
            u = uplinks[n]
            uvals += (_int(u.get("backlog")), _int(u.get("delivered")))
        readings = tuple(_int(sources[n].get("readings")) for n in snames)
        return Sample(t, self._unames, tuple(uvals), self._snames, readings)

    def record(self, t: float, status: dict[str, Any]) -> None:
        self.samples.append(self.sample(t, status))

    def as_dict(self, now: Sample | None = None) -> dict[str, Any]:
        """Column form for ``/history``: ``t_epoch`` and, per name, one value per time (None
        where the name was absent). ``now``, when given, is appended as the latest point."""
        samples = [*self.samples, *([now] if now is not None else [])]
        ups: dict[str, dict[str, list[int | None]]] = {}
        srcs: dict[str, dict[str, list[int | None]]] = {}
        for i, s in enumerate(samples):
            for j, n in enumerate(s.uplinks):
                col = ups.setdefault(n, {"backlog": [None] * i, "delivered": [None] * i})
                col["backlog"].append(s.uplink_values[2 * j])
                col["delivered"].append(s.uplink_values[2 * j + 1])
            for j, n in enumerate(s.sources):
                scol = srcs.setdefault(n, {"readings": [None] * i})
                scol["readings"].append(s.readings[j])
            for col in ups.values():
                for v in col.values():
                    if len(v) < i + 1:
                        v.append(None)
            for scol in srcs.values():
                if len(scol["readings"]) < i + 1:
                    scol["readings"].append(None)
        return {
            "interval_s": self.interval_s,
            "t_epoch": [round(s.t, 3) for s in samples],
            "uplinks": ups,
            "sources": srcs,
        }
