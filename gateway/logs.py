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


def setup(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    stream = stream or sys.stdout
    # pymodbus logs every fault the Modbus source already reports as a structured event, with
    # raw frames appended: keep only its criticals.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
