"""Request rate limiting shared by every uplink.

A sliding-window limiter: at most ``limit`` requests in any window of ``period`` seconds, which
is exactly what services mean by "20 requests per minute" (a token bucket with a full burst
would allow up to twice that across a window boundary). The send times are persisted through
the store before each request, so a gateway that crash-loops cannot exceed the quota either.
A service's Retry-After pauses the limiter until then, for every worker of the uplink: a request
whose slot was being recorded when the Retry-After arrived waits it out too (no await separates
the last check from the request leaving).

**Pacing.** With ``even`` pacing (the default) requests are also spaced at least ``period / limit``
apart, so a quota of 20 a minute is one request every ~3 s instead of 20 in the first seconds and
then a silence; the dispatcher waits for the next slot *before* it leases (:meth:`ready`), so each
request carries everything that became pending meanwhile. ``burst`` keeps only the window.

The window is kept slightly longer than the service's (5% plus 0.1 s, at most one second more):
we stamp a send before it travels, the service stamps it on arrival, and a request sent exactly
at the window's edge would otherwise be refused whenever the previous one took longer to arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

Persist = Callable[[list[float]], Awaitable[None]]


class RateLimiter:
    def __init__(
        self,
        limit: int,
        period: float,
        *,
        history: Iterable[float] = (),
        persist: Persist | None = None,
        clock: Callable[[], float] = time.time,
        even: bool = False,
    ) -> None:
        """``history``: wall-clock send times from a previous run; ``persist`` saves them.
        ``even``: space requests ``period / limit`` apart (pacing) as well."""
        self.limit = limit
        self.period = period + min(1.0, 0.1 + 0.05 * period)
        #: Least time between two sends (0: only the window applies).
        self.spacing = self.period / limit if even and limit else 0.0
        self._clock = clock
        self._persist = persist
        now = clock()
        # A wall clock that stepped backwards would make old entries look like the future:
        # clamp them to now, which errs on the side of waiting.
        self._sent: deque[float] = deque(
            sorted(min(t, now) for t in history if now - t < self.period)
        )
        self._paused_until = 0.0
        self._lock = asyncio.Lock()

    def pause_until(self, wall_time: float) -> None:
        self._paused_until = max(self._paused_until, wall_time)

    def resume(self) -> None:
        """Forget a Retry-After pause (the window itself still applies)."""
        self._paused_until = 0.0

    def delay(self) -> float:
        """Seconds until the next request may go (0 when it may go now)."""
        now = self._clock()
        while self._sent and now - self._sent[0] >= self.period:
            self._sent.popleft()
        wait = max(0.0, self._paused_until - now)
        if self.limit and len(self._sent) >= self.limit:
            wait = max(wait, self._sent[0] + self.period - now)
        if self.spacing and self._sent:
            wait = max(wait, self._sent[-1] + self.spacing - now)
        return wait

    async def ready(self) -> None:
        """Wait until a request could go now, without taking the slot (the dispatcher leases
        after this, so a paced request carries what became pending while it waited)."""
        while (wait := self.delay()) > 0:
            await asyncio.sleep(wait)

    async def acquire(self) -> None:
        """Wait for a slot, then record (and persist) the send. Returns only when no Retry-After
        pause is in force: the caller's request starts with no await in between."""
        async with self._lock:
            while True:
                while (wait := self.delay()) > 0:
                    await asyncio.sleep(wait)
                if self.limit:
                    self._sent.append(self._clock())
                    if self._persist is not None:
                        await self._persist(list(self._sent))
                if self._paused_until <= self._clock():
                    return
                # Another worker was told to wait while this send was being recorded: give the
                # slot back and start over once the pause is over (the send time recorded must
                # be when the request really leaves, or the window would end too early).
                if self.limit:
                    self._sent.pop()

    @property
    def history(self) -> list[float]:
        return list(self._sent)
