"""Per-series minimum interval: downsampling into aligned windows, shared by every uplink.

A route with ``min_interval_s = W`` sends at most one value per window ``[k*W, (k+1)*W)`` (UTC,
aligned to multiples of W since the epoch). The value is the window's aggregate (``last``,
``mean``, ``min`` or ``max``; non-numeric values always take ``last``) and its timestamp is the
window's start, so a service with minute resolution never sees two values in one minute.

A window is sent only once it is **closed**:

* a later reading of the same series is in hand (the next window has begun in the data), or
* no reading of that series has been **captured** for the grace time (the uplink's
  ``window_grace_s``, by default one window and at most 5 minutes, measured on the gateway's
  monotonic clock from the store's last commit of that series) *and* the wall clock is past
  the window's end plus the grace,

and the lease was not cut short by its size. The first rule closes nearly every window, live or
replayed. The second closes the last window of a series that stopped. It asks for both clocks
because each alone breaks a real case: a logger replaying its memory after an outage (one
logger-minute a second) has windows whose end is long past on the wall clock, but more of their
readings are still arriving; an hourly mean of a source polled every 10 minutes goes quiet for
longer than the grace inside a window that has not ended. So historical data aggregates exactly
like live data, and a live window is never closed before its end.

Readings of an open window are **held** (they stay pending, nothing is
sent). The dispatcher runs such an uplink oldest-first with one worker, so windows are handed out
in capture order and never split between two leases in flight. A reading that arrives for a window
that was already sent (out of order, a repaired timestamp, a logger replaying data it sent before)
is dead-lettered with that reason, so it stays visible and replayable instead of silently producing
a second value.

The aggregate travels as a :class:`StoredReading` carrying the id of the window's last reading;
:attr:`Plan.members` maps it to the ids it stands for, which share its outcome.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.configbase import RouteBase
from gateway.models import StoredReading
from gateway.routes import RouteTable

MAX_GRACE_MS = 300_000


@dataclass(slots=True)
class Plan:
    send: list[StoredReading] = field(default_factory=list)
    #: aggregate id -> the other ids it stands for (its outcome is theirs)
    members: dict[int, list[int]] = field(default_factory=dict)
    held: list[int] = field(default_factory=list)
    late: dict[int, str] = field(default_factory=dict)
    #: seconds until the first held window may close without more data (None: nothing held)
    recheck_s: float | None = None


class Downsampler:
    """Holds, per series, the start of the last window handed out (persisted by the caller)."""

    def __init__(
        self,
        routes: Mapping[str, RouteBase] | RouteTable[RouteBase],
        sent: Mapping[str, int] | None = None,
        *,
        grace_s: float | None = None,
    ):
        """``grace_s``: the uplink's ``window_grace_s`` (None: one window, at most 5 min)."""
        self._grace_ms = None if grace_s is None else int(grace_s * 1000)
        table = routes if isinstance(routes, RouteTable) else RouteTable(routes.values())
        self._width: dict[str, int] = {}
        self._mode: dict[str, str] = {}
        for s, r in table.exact.items():
            self._learn(s, r)
        #: Pattern routes with a window: their series are looked up when first seen.
        self._patterns = table if any(r.min_interval_s > 0 for _, r in table.patterns) else None
        self._looked_up: set[str] = set()
        self.sent: dict[str, int] = dict(sent or {})

    def _learn(self, series: str, r: RouteBase) -> None:
        if r.min_interval_s > 0:
            self._width[series] = int(r.min_interval_s * 1000)
            self._mode[series] = r.downsample

    def _width_of(self, series: str) -> int | None:
        w = self._width.get(series)
        if w is None and self._patterns is not None and series not in self._looked_up:
            self._looked_up.add(series)
            r = self._patterns.get(series)
            if r is not None:
                self._learn(series, r)
                w = self._width.get(series)
        return w

    @property
    def active(self) -> bool:
        return bool(self._width) or self._patterns is not None

    def plan(
        self,
        items: Sequence[StoredReading],
        now_ms: int | None = None,
        *,
        cut: bool = False,
        quiet_s: Callable[[str], float] | None = None,
    ) -> Plan:
        """Aggregate closed windows, hold open ones. ``cut``: the lease was full, so readings past
        its end may belong to any window not yet closed by a later reading in hand; those windows
        are held whatever the clock says. ``quiet_s(series)``: seconds since a reading of the
        series was last captured (the store's :meth:`~gateway.store.Store.quiet_s`; None: no
        capture is known to be recent, only the wall clock counts)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        out = Plan()
        windows: dict[tuple[str, int], list[StoredReading]] = {}
        newest: dict[str, int] = {}
        for it in items:
            w = self._width_of(it.series)
            if w is None:
                out.send.append(it)
                continue
            start = it.ts - it.ts % w
            last = self.sent.get(it.series)
            if last is not None and start <= last:
                out.late[it.id] = (
                    f"arrived after its {w // 1000}s window starting "
                    f"{start} ms was sent (at most one value per window)"
                )
                continue
            windows.setdefault((it.series, start), []).append(it)
            newest[it.series] = max(newest.get(it.series, it.ts), it.ts)
        for (series, start), members in sorted(windows.items(), key=lambda kv: kv[0][1]):
            w = self._width[series]
            end = start + w
            grace = min(w, MAX_GRACE_MS) if self._grace_ms is None else self._grace_ms
            if newest[series] < end:
                # No later reading in hand: open while the wall clock has not passed its end plus
                # the grace, or while the series was captured within the grace.
                wall_left = (end + grace - now) / 1000
                quiet_left = grace / 1000 - quiet_s(series) if quiet_s is not None else 0.0
                left = max(wall_left, quiet_left)
                if cut or left > 0:
                    out.held.extend(m.id for m in members)
                    if left > 0 and (out.recheck_s is None or left < out.recheck_s):
                        out.recheck_s = left
                    continue
            members.sort(key=lambda m: (m.ts, m.id))
            agg = _aggregate(members, self._mode[series], start)
            out.send.append(agg)
            out.members[agg.id] = [m.id for m in members if m.id != agg.id]
        return out

    def mark_sent(self, item: StoredReading) -> None:
        """An aggregate reached a final outcome (delivered or dead-lettered): its window is done."""
        w = self._width_of(item.series)
        if w is not None:
            self.sent[item.series] = max(self.sent.get(item.series, item.ts), item.ts)

    def state(self) -> dict[str, Any]:
        return dict(self.sent)


def _aggregate(members: list[StoredReading], mode: str, start: int) -> StoredReading:
    last = members[-1]
    values = [m.value for m in members]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    value = last.value
    if numeric and mode != "last":
        nums = [float(v) for v in values]
        if mode == "mean":
            value = sum(nums) / len(nums)
        elif mode == "min":
            value = min(nums)
        else:
            value = max(nums)
    quality = 0
    for m in members:
        quality |= m.quality
    return StoredReading(last.id, last.series, start, value, last.position, quality)
