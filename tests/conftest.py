"""Shared fixtures. The autouse guard fails any test that leaves tasks or threads behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from tests.integration.daemon import Daemon


@pytest.fixture(autouse=True)
def _trusted_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Gateways built from config in tests (in process or as child processes, which inherit the
    environment) trust the wall clock: whether the CI host's kernel reports NTP sync must not
    decide whether readings are held. Tests of the clock build their own :class:`Clock`."""
    monkeypatch.setenv("FIELDGATE_CLOCK__TRUST", "always")


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    # aiosqlite and executor threads finish right after close; give them a moment to join.
    leaked = []
    for t in set(threading.enumerate()) - before:
        if t.name.startswith("asyncio_"):
            continue  # the loop's default executor; shut down with the loop itself
        t.join(timeout=5)
        if t.is_alive():
            leaked.append(t.name)
    assert not leaked, f"test left threads running: {leaked}"


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    yield
    current = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    assert not pending, f"test left tasks running: {[t.get_name() for t in pending]}"


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    """``fieldgate run`` processes a test started; each is killed, if still running, at its end."""
    made: list[Daemon] = []
    yield made
    for d in made:
        await d.aclose()
