"""Request rate limiting shared by every uplink.

A sliding-window limiter: at most ``limit`` requests in any window of ``period`` seconds, which
is exactly what services mean by "20 requests per minute" (a token bucket with a full burst
would allow up to twice that across a window boundary). The send times are persisted through
the store before each request, so a gateway that crash-loops cannot exceed the quota either.
A service's Retry-After pauses the limiter until then.

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
    ) -> None:
        """``history``: wall-clock send times from a previous run; ``persist`` saves them."""
        self.limit = limit
        self.period = period + min(1.0, 0.1 + 0.05 * period)
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
        return wait

    async def acquire(self) -> None:
        """Wait for a slot, then record (and persist) the send."""
        async with self._lock:
            while (wait := self.delay()) > 0:
                await asyncio.sleep(wait)
            if not self.limit:
                return
            self._sent.append(self._clock())
            if self._persist is not None:
                await self._persist(list(self._sent))

    @property
    def history(self) -> list[float]:
        return list(self._sent)
