"""Capped, jittered exponential backoff: the one helper every retry and reconnect uses.

:class:`RetrySchedule` pairs two of them for a service: a short cap while it cannot be reached,
the long one once it answers and refuses (the uplinks' retries and reconnects).
"""

from __future__ import annotations

import random


class Backoff:
    """Delays ``initial * 2**n``, capped at ``maximum``, each with "equal jitter" (between half
    and all of the step) so a fleet of gateways does not retry in lock-step after an outage.

    ``next()`` returns the next delay and counts a failure; ``reset()`` after a success.
    """

    __slots__ = ("_rng", "attempts", "initial", "maximum")

    def __init__(
        self, initial: float = 1.0, maximum: float = 300.0, *, seed: int | None = None
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        self._rng = random.Random(seed)

    def next(self) -> float:
        step: float = min(self.maximum, self.initial * 2.0 ** min(self.attempts, 62))
        self.attempts += 1
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        self.attempts = 0


class RetrySchedule:
    """Two capped, jittered backoffs for one service: which one a failure takes depends on
    whether the service was reached.

    * ``unreachable`` (:meth:`next` with ``unreachable=True``): no connection, a connection
      that dropped, a timeout. The link or the service is down and may be back any second, so
      the delay doubles from ``initial`` up to the short cap ``unreachable_max`` (never above
      ``maximum``): a 4G link that drops for seconds is used again within seconds of its return.
    * ``refused``: the service answered and said no (5xx, 429, a CONNACK refusal, a certificate
      that does not verify). Retrying soon cannot help, so the delay doubles up to ``maximum``.

    Both keep equal jitter (between half and all of the step), so neither is ever a busy loop
    (the shortest delay is ``initial / 2``) nor a fleet retrying in lock-step. Each counts its
    own failures; ``reset()`` after a success resets both.
    """

    __slots__ = ("refused", "unreachable")

    def __init__(
        self,
        initial: float,
        maximum: float,
        unreachable_max: float,
        *,
        seed: int | None = None,
    ) -> None:
        self.refused = Backoff(initial, maximum, seed=seed)
        cap = min(unreachable_max, maximum)
        self.unreachable = Backoff(min(initial, cap), cap, seed=None if seed is None else seed + 1)

    def next(self, *, unreachable: bool) -> float:
        """The next delay of the schedule the failure belongs to (and count the failure)."""
        return (self.unreachable if unreachable else self.refused).next()

    def reset(self) -> None:
        self.refused.reset()
        self.unreachable.reset()
