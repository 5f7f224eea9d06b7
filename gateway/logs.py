"""structlog set-up: JSON lines to stdout for journald, key=value on a terminal; secrets masked.

Every event passes :func:`redact`, which replaces any known secret value (registered by the
config loader in ``gateway.config.KNOWN_SECRETS``) and any ``Authorization``-looking field with
``***``, wherever it appears: event fields, nested dicts, exception text.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from gateway.config import KNOWN_SECRETS

MASK = "***"
_SENSITIVE_KEYS = {
    "authorization",
    "token",
    "password",
    "secret",
    "client_secret",
    "api_key",
    "organization-api-key",
}


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        for s in KNOWN_SECRETS:
            if s in value:
                value = value.replace(s, MASK)
        return value
    if isinstance(value, dict):
        return {
            k: (MASK if str(k).lower() in _SENSITIVE_KEYS else _scrub(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets anywhere in the event (runs after exception rendering)."""
    for key in list(event_dict):
        if key.lower() in _SENSITIVE_KEYS:
            event_dict[key] = MASK
        else:
            event_dict[key] = _scrub(event_dict[key])
    return event_dict


#: Libraries that report at INFO/DEBUG what we already log as events (httpx: one line per
#: request; httpcore, aiosqlite, paho via aiomqtt's "mqtt" logger: wire-level chatter). They keep
#: WARNING and above unless the configured level is DEBUG.
_NOISY_LIBRARIES = (
    "aiohttp",
    "aiosqlite",
    "anyio",
    "httpcore",
    "httpx",
    "mqtt",
    "paho",
)


class _StreamHandler(logging.Handler):
    """Root handler for stdlib records, written through structlog's :class:`PrintLogger`.

    Same stream and same per-stream write lock as structlog's own events, so a record logged from
    a thread (an executor, aiosqlite) never splits a structlog line in two.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__()
        self._out = structlog.PrintLogger(stream)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog, and route the stdlib root logger through the same processor chain.

    A record from a library (aiohttp, aiomqtt, httpx, asyncio's "exception was never retrieved")
    comes out in the same format as a structlog event, with ``logger`` naming its origin, and
    passes :func:`redact`. Calling again replaces the handler installed before.
    """
    stream = stream or sys.stdout
    threshold = logging.getLevelNamesMapping()[level.upper()]
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # Exceptions are rendered to text before redaction so a secret in a traceback is masked too.
    tail: list[Any] = [structlog.processors.format_exc_info, redact, renderer]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            timestamper,
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )

    handler = _StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                timestamper,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StreamHandler)]:
        root.removeHandler(old)
        old.close()  # unregisters it from logging; the stream stays open (not ours)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(
            logging.NOTSET if threshold <= logging.DEBUG else max(threshold, logging.WARNING)
        )
    # pymodbus logs every fault the Modbus source already reports as a structured event, with
    # raw frames appended: keep only its criticals, at any level.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
