"""The source contract and the bookkeeping every source shares.

A source runs as one long-lived task (``poll:<name>``) owned by the supervisor. It produces
:class:`~gateway.models.Reading` batches and hands them to ``emit`` (the store's ingest), which
returns once the batch is queued for the next group commit (it waits only when the store's
buffer is full, which is the back-pressure a source must accept). A source never writes to
SQLite itself and never sleeps in a busy loop.

A source that raises is restarted by the supervisor with backoff; a source should rather count
and log its own recoverable faults (timeouts, garbage on a line) in :class:`SourceStats` and go
on, logging the first failure of a burst loudly and repeats quietly until a success resets it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from gateway.models import Reading

Emit = Callable[[Sequence[Reading]], Awaitable[None]]


@dataclass(slots=True)
class SourceStats:
    """What /status shows under ``sources.<name>``. Mutated only by the owning source."""

    readings: int = 0
    errors: int = 0
    rejected: int = 0
    last_ok: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    state: str = "starting"
    #: Per-source extras (per-device counters, degraded devices, fix state, ...).
    detail: dict[str, Any] = field(default_factory=dict)

    def ok(self, n: int) -> None:
        self.readings += n
        self.last_ok = time.time()
        self.state = "ok"

    def error(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        self.last_error_at = time.time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "readings": self.readings,
            "errors": self.errors,
            "rejected": self.rejected,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            **self.detail,
        }


@runtime_checkable
class Source(Protocol):
    """A producer of readings. ``run`` returns only when cancelled (or raises)."""

    name: str
    stats: SourceStats

    async def run(self, emit: Emit) -> None: ...

    async def aclose(self) -> None: ...


def now_ms() -> int:
    """Wall-clock now in UTC milliseconds: the one place sources take a timestamp from."""
    return time.time_ns() // 1_000_000
