"""Times in ``/status``: ISO 8601 UTC text for people and browsers, the number for scripts.

Producers (sources' stats, the uplink runner, the store, the clock, the health server) keep
epoch seconds (``time.time()``) in their status dicts. :func:`with_iso_times` is the one place
they become text: every time field ``X`` holding epoch seconds (or None) becomes
``X = "2026-12-04T15:31:02.123Z"`` and its number moves to ``X_epoch``. A time field is a key
ending in ``_at``, or one of :data:`TIME_KEYS`. Durations and ages (``uptime_s``,
``oldest_pending_s``, ``retry_in_s``) are numbers and stay so; ``..._ms`` fields are left as they
are (their name says the unit).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

#: Time fields whose name does not end in ``_at``.
TIME_KEYS = frozenset({"at", "last_ok", "wall_time"})
#: The suffix of a time field's number.
EPOCH_SUFFIX = "_epoch"


def iso_utc(t: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds (``2025-01-31T12:00:00.000Z``)."""
    if t is None:
        return None
    try:
        dt = datetime.fromtimestamp(t, UTC)
    except (OverflowError, OSError, ValueError):
        return f"{t} s since 1970"
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def is_time_key(key: str) -> bool:
    return key in TIME_KEYS or key.endswith("_at")


def _is_epoch(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value)


def with_iso_times(status: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``status`` (nested dicts and lists walked) with every time field given as ISO
    text and its number under ``X_epoch``. Idempotent: a field that already has its ``_epoch``
    twin, or holds text, is left as it is."""
    out: dict[str, Any] = _walk(status)
    return out


def _walk(obj: Any) -> Any:
    if isinstance(obj, list | tuple):
        return [_walk(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if (
            isinstance(key, str)
            and is_time_key(key)
            and key + EPOCH_SUFFIX not in obj
            and _is_epoch(value)
        ):
            out[key] = iso_utc(value)
            out[key + EPOCH_SUFFIX] = value
        else:
            out[key] = _walk(value)
    return out
