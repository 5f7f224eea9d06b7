"""A small bounded in-memory history of /status for the console's plots.

Every sample keeps, per uplink, its backlog and delivered count and, per source, its readings
count (counters: the page draws rates from their differences). Names are kept once per change of
the set of names (a reload), values as a flat tuple: 360 samples of a dozen sources and uplinks
take well under 200 KB.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from gateway.models import Reading, ReadingBatch, Value

#: One sample every this many seconds, this many kept: the last hour.
INTERVAL_S = 10.0
POINTS = 360
#: Per-series record: at most this many series, each with its last this many numeric values
#: (two float arrays: about 1 KiB a series, 0.5 MiB at the cap).
MAX_SERIES = 500
RECENT = 60


def rates(t: list[float], v: list[int | None], min_window_s: float) -> list[float | None]:
    """Per-minute rates of the counter ``v`` sampled at ``t``: at each point, the change since
    the latest earlier point at least ``min_window_s`` before it (None without one, or where a
    value is missing). Never over a sliver of time: the current values appended just after a
    sample would otherwise make a burst of a few readings look like thousands a minute."""
    out: list[float | None] = []
    j = -1  # the latest index at least min_window_s before i
    for i, (ti, vi) in enumerate(zip(t, v, strict=True)):
        while j + 1 < i and ti - t[j + 1] >= min_window_s:
            j += 1
        vj = v[j] if j >= 0 else None
        if vi is None or vj is None or ti <= t[j]:
            out.append(None)
        else:
            out.append(round(max(0, vi - vj) / (ti - t[j]) * 60, 3))
    return out


class _Ring:
    __slots__ = ("i", "n", "t", "v")

    def __init__(self) -> None:
        self.t = array("d", bytes(8 * RECENT))
        self.v = array("d", bytes(8 * RECENT))
        self.i = 0
        self.n = 0

    def add(self, t: float, v: float) -> None:
        self.t[self.i], self.v[self.i] = t, v
        self.i = (self.i + 1) % RECENT
        self.n = min(self.n + 1, RECENT)

    def items(self) -> list[tuple[float, float]]:
        start = (self.i - self.n) % RECENT
        return [(self.t[(start + k) % RECENT], self.v[(start + k) % RECENT]) for k in range(self.n)]


class SeriesLog:
    """The last value and capture time of each series (per source), and its recent numeric
    values. Bounded: :data:`MAX_SERIES` series (later new ones are not kept), :data:`RECENT`
    values each. Fed by the gateway's emit path with every batch a source hands over."""

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self.max_series = max_series
        #: series -> [source, value, ts_epoch, ring or None]
        self._last: dict[str, list[Any]] = {}

    def note(self, source: str, readings: Sequence[Reading]) -> None:
        last = self._last
        pairs: Iterable[tuple[str, Value, int]]
        if isinstance(readings, ReadingBatch):
            # A poll: its columns, no reading made. Once the log is full only series it keeps
            # matter, and a poll of none of them costs one set test.
            names, ts_ms = readings.series, readings.ts
            if len(last) >= self.max_series:
                if last.keys().isdisjoint(names):
                    return
                pairs = [
                    (n, v, ts_ms) for n, v in zip(names, readings.values, strict=True) if n in last
                ]
            else:
                pairs = zip(names, readings.values, repeat(ts_ms))
        else:
            pairs = ((r.series, r.value, r.ts) for r in readings)
        for series, value, ms in pairs:
            e = last.get(series)
            if e is None:
                if len(last) >= self.max_series:
                    continue
                e = last[series] = [source, value, 0.0, None]
            ts = ms / 1000
            if ts < e[2]:
                continue  # an older reading (a logger's memory replayed): keep the latest
            e[0], e[1], e[2] = source, value, ts
            if isinstance(value, int | float) and not isinstance(value, bool):
                if e[3] is None:
                    e[3] = _Ring()
                e[3].add(ts, float(value))

    def last(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{source: {series: {"value", "ts_epoch"}}}``."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for name, (src, value, ts, _) in sorted(self._last.items()):
            out.setdefault(src, {})[name] = {"value": value, "ts_epoch": round(ts, 3)}
        return out

    def recent(self, series: str) -> dict[str, Any] | None:
        """``{"t_epoch": [...], "values": [...]}`` for ``series``, or None when not kept."""
        e = self._last.get(series)
        if e is None:
            return None
        pts = e[3].items() if e[3] is not None else []
        return {
            "series": series,
            "source": e[0],
            "t_epoch": [round(t, 3) for t, _ in pts],
            "values": [v for _, v in pts],
        }


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
        self.series = SeriesLog()

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
        ups: dict[str, dict[str, list[Any]]] = {}
        srcs: dict[str, dict[str, list[Any]]] = {}
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
        t = [s.t for s in samples]
        # Rates over at least most of an interval (samples drift a little late).
        w = 0.9 * self.interval_s
        for col in ups.values():
            col["delivered_per_min"] = rates(t, col["delivered"], w)
        for scol in srcs.values():
            scol["readings_per_min"] = rates(t, scol["readings"], w)
        return {
            "interval_s": self.interval_s,
            "t_epoch": [round(x, 3) for x in t],
            "uplinks": ups,
            "sources": srcs,
            "series": self.series.last(),
        }
