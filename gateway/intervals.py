"""Sets of reading ids kept as sorted, disjoint, merged closed intervals.

An uplink's delivery position is one of these: every id inside it is done for that uplink
(delivered, dead-lettered, evicted, or not routed there). In steady state it is one interval
``[0, floor]``; after an outage with live-first delivery it is two or three. Small, so it is
kept in memory and persisted whole as JSON.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Iterator


class IntervalSet:
    __slots__ = ("_his", "_los")

    def __init__(self, intervals: Iterable[tuple[int, int]] = ()) -> None:
        self._los: list[int] = []
        self._his: list[int] = []
        for lo, hi in intervals:
            self.add(lo, hi)

    # -- queries -----------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._los, self._his, strict=True))

    def __len__(self) -> int:
        return len(self._los)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"IntervalSet({list(self)!r})"

    def __contains__(self, x: object) -> bool:
        if not isinstance(x, int):
            return False
        i = bisect.bisect_right(self._los, x) - 1
        return i >= 0 and self._his[i] >= x

    @property
    def floor(self) -> int:
        """Largest n such that every id in [0, n] is in the set (-1 when 0 is not)."""
        if self._los and self._los[0] <= 0:
            return self._his[0]
        return -1

    def gaps(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        """Maximal sub-intervals of [lo, hi] not in the set, ascending."""
        cur = lo
        i = max(bisect.bisect_right(self._los, lo) - 1, 0)
        while cur <= hi and i < len(self._los):
            a, b = self._los[i], self._his[i]
            if b < cur:
                i += 1
                continue
            if a > hi:
                break
            if a > cur:
                yield cur, min(a - 1, hi)
            cur = max(cur, b + 1)
            i += 1
        if cur <= hi:
            yield cur, hi

    def union(self, other: IntervalSet) -> IntervalSet:
        out = self.copy()
        for lo, hi in other:
            out.add(lo, hi)
        return out

    def copy(self) -> IntervalSet:
        c = IntervalSet()
        c._los = list(self._los)
        c._his = list(self._his)
        return c

    # -- updates -----------------------------------------------------------------------------

    def add(self, lo: int, hi: int) -> None:
        if hi < lo:
            return
        # Intervals touching [lo, hi] (adjacent counts: ids are integers) merge with it.
        i = bisect.bisect_left(self._his, lo - 1)
        j = bisect.bisect_right(self._los, hi + 1)
        if i < j:
            lo = min(lo, self._los[i])
            hi = max(hi, self._his[j - 1])
        self._los[i:j] = [lo]
        self._his[i:j] = [hi]

    def remove(self, lo: int, hi: int) -> None:
        if hi < lo:
            return
        i = bisect.bisect_left(self._his, lo)
        j = bisect.bisect_right(self._los, hi)
        if i >= j:
            return
        new_los: list[int] = []
        new_his: list[int] = []
        if self._los[i] < lo:
            new_los.append(self._los[i])
            new_his.append(lo - 1)
        if self._his[j - 1] > hi:
            new_los.append(hi + 1)
            new_his.append(self._his[j - 1])
        self._los[i:j] = new_los
        self._his[i:j] = new_his

    # -- persistence -------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps([[a, b] for a, b in self])

    @classmethod
    def from_json(cls, text: str) -> IntervalSet:
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError("interval set must be a JSON list")
        return cls((int(a), int(b)) for a, b in data)
