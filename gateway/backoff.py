"""Capped, jittered exponential backoff: the one helper every retry and reconnect uses."""

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
