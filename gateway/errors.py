"""One exception root for fieldgate, split by what the caller should do about it.

::

    FieldgateError
     ├── ConfigError            the configuration is wrong; fix the file (exit 78, no restart)
     ├── StoreError             the local database failed an operation
     │    ├── StoreUnusable     cannot be used as it is: permissions, read-only disk, held by
     │    │    │                another process (exit 73, no restart: a person must act)
     │    │    └── StoreLocked  another fieldgate holds the store's lock
     │    └── StoreCorrupt      the database is corrupt: moved aside, readable rows salvaged
     ├── TransientError         try again later (network, timeout, service busy)
     └── PermanentError         retrying the same thing cannot help
          └── AuthError         credentials refused; keep data, retry slowly

Third-party errors are translated at the boundary with ``raise ... from exc`` so callers only
ever catch these. Messages never contain secrets (see gateway/logs.py for the redaction net).
Delivery outcomes per reading are data (``uplinks.base.SendResult``), not exceptions.
"""

from __future__ import annotations


class FieldgateError(Exception):
    """Root of every error fieldgate raises on purpose."""


class ConfigError(FieldgateError):
    """The configuration is invalid. ``problems`` lists ``(toml_path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str = "") -> None:
        self.problems = problems
        self.source = source
        lines = [f"{path} -> {msg}" if path else msg for path, msg in problems]
        super().__init__("\n".join(lines))


class StoreError(FieldgateError):
    """The local store failed an operation."""


class StoreUnusable(StoreError):
    """The store cannot be opened as it is, and waiting will not change that: the message
    names the path and the cause. The database is left where it is (never moved aside)."""


class StoreLocked(StoreUnusable):
    """Another process holds the store's lock: one store, one writer. ``holder`` is its pid
    when known."""

    def __init__(self, path: str, holder: int | None) -> None:
        self.path = path
        self.holder = holder
        who = f"pid {holder}" if holder is not None else "another process"
        super().__init__(
            f"store {path} is in use by another fieldgate ({who}); one store has one writer: "
            "stop that one first, or give this one its own [store] path"
        )


class StoreCorrupt(StoreError):
    """The database file cannot be used (corrupt, not a database, unknown schema version)."""


class TransientError(FieldgateError):
    """A failure that may go away by itself; ``retry_after`` is the service's hint, if any."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(FieldgateError):
    """Retrying the same request cannot succeed."""


class AuthError(PermanentError):
    """The service refused our credentials (401/403, MQTT not authorised)."""
