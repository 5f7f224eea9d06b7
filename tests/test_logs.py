"""Logging set-up: stdlib records (aiohttp, httpx, asyncio, ...) come out like structlog events,
through the same redaction net, on the same stream."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from gateway import logs
from gateway.config import KNOWN_SECRETS, SecretRef

SECRET = "s3cr3t-uplink-token-9f2c"
LIBRARY_LOGGERS = [*logs._NOISY_LIBRARIES, "pymodbus", "asyncio"]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """setup() changes process-wide state: structlog's config, the root logger, library levels."""
    before = structlog.get_config()
    root = logging.getLogger()
    root_level = root.level
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    secrets = set(KNOWN_SECRETS)
    yield
    structlog.configure(**before)
    for h in [h for h in root.handlers if isinstance(h, logs._StreamHandler)]:
        root.removeHandler(h)
    root.setLevel(root_level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    KNOWN_SECRETS.clear()
    KNOWN_SECRETS.update(secrets)


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """A secret registered the way the config loader does it (resolving a reference)."""
    monkeypatch.setenv("FIELDGATE_TEST_LOGS_TOKEN", SECRET)
    assert SecretRef(env="FIELDGATE_TEST_LOGS_TOKEN").resolve().reveal() == SECRET
    assert SECRET in KNOWN_SECRETS
    return SECRET


def daemon_logging(level: str = "info", fmt: str = "auto") -> io.StringIO:
    """As ``fieldgate run`` under systemd: stdout is not a terminal, so "auto" means JSON."""
    out = io.StringIO()
    logs.setup(level, fmt, out)
    return out


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_library_record_is_rendered_like_a_structlog_event_and_masked(secret: str) -> None:
    out = daemon_logging()
    structlog.get_logger("gateway.test").warning("uplink_refused", token_seen=f"x{secret}x")
    logging.getLogger("aiohttp.access").warning(
        "127.0.0.1 GET /ingest?token=%s HTTP/1.1 401", secret
    )

    assert secret not in out.getvalue()
    ours, theirs = lines(out)
    assert ours["event"] == "uplink_refused" and ours["token_seen"] == "x***x"
    assert theirs["event"] == "127.0.0.1 GET /ingest?token=*** HTTP/1.1 401"
    assert theirs["level"] == "warning"
    assert theirs["logger"] == "aiohttp.access"
    # Same shape as our own events: the keys structlog adds, and nothing of logging's internals.
    assert set(ours) - {"token_seen"} <= set(theirs)
    assert set(theirs) == {"event", "level", "logger", "timestamp"}


def test_library_exception_text_is_masked(secret: str) -> None:
    out = daemon_logging()
    try:
        raise ConnectionError(f"broker refused password {secret}")
    except ConnectionError:
        logging.getLogger("mqtt").exception("Caught exception in on_socket_open")

    assert secret not in out.getvalue()
    (rec,) = lines(out)
    assert rec["event"] == "Caught exception in on_socket_open"
    assert rec["level"] == "error" and rec["logger"] == "mqtt"
    assert "Traceback" in rec["exception"]
    assert "ConnectionError: broker refused password ***" in rec["exception"]


def test_task_exception_never_retrieved_is_rendered_and_masked(secret: str) -> None:
    """asyncio reports a task whose exception nobody retrieved through its 'asyncio' logger (the
    loop's default exception handler), when the task is collected."""
    out = daemon_logging()

    async def doomed() -> None:
        raise PermissionError(f"401 for token {secret}")

    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(doomed())
        # Wait for the task itself (asyncio.wait does not retrieve its exception).
        loop.run_until_complete(asyncio.wait([task]))
        assert task.done()
        del task
        gc.collect()
    finally:
        loop.close()

    assert secret not in out.getvalue()
    (rec,) = lines(out)
    assert rec["logger"] == "asyncio" and rec["level"] == "error"
    assert rec["event"].startswith("Task exception was never retrieved")
    assert "401 for token ***" in rec["event"]
    assert "PermissionError: 401 for token ***" in rec["exception"]
    assert "timestamp" in rec


def test_console_format_masks_library_records(secret: str) -> None:
    out = daemon_logging(fmt="console")
    logging.getLogger("httpx").warning("retrying with token %s", secret)

    text = out.getvalue()
    assert secret not in text
    assert "retrying with token ***" in text
    assert "[httpx]" in text and "warning" in text


def test_noisy_libraries_keep_warnings_unless_debug() -> None:
    out = daemon_logging("info")
    logging.getLogger("httpx").info('HTTP Request: POST https://example.invalid "HTTP/1.1 200"')
    logging.getLogger("aiosqlite").debug("executing <function>")
    logging.getLogger("httpx").warning("kept")
    logging.getLogger("pymodbus.logging").error("raw frame 0x01 0x03")
    logging.getLogger("asyncio").info("other libraries follow the configured level")
    assert [r["event"] for r in lines(out)] == [
        "kept",
        "other libraries follow the configured level",
    ]

    out = daemon_logging("debug")
    logging.getLogger("httpx").info("HTTP Request: POST")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started")
    logging.getLogger("pymodbus.logging").error("raw frame 0x01 0x03")
    assert [r["event"] for r in lines(out)] == [
        "HTTP Request: POST",
        "send_request_headers.started",
    ]

    out = daemon_logging("error")
    logging.getLogger("httpx").warning("dropped")
    logging.getLogger("asyncio").warning("dropped too")
    logging.getLogger("aiohttp.server").error("Error handling request")
    assert [r["event"] for r in lines(out)] == ["Error handling request"]


def test_setup_again_replaces_the_handler() -> None:
    first = daemon_logging()
    second = daemon_logging()
    logging.getLogger("aiohttp.client").warning("once")
    assert first.getvalue() == ""
    assert [r["event"] for r in lines(second)] == ["once"]
    assert sum(isinstance(h, logs._StreamHandler) for h in logging.getLogger().handlers) == 1
