"""Fixtures shared by the tests that run real daemons."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from .daemon import Daemon


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    """Daemons a test started; each is killed (if still running) when the test ends."""
    made: list[Daemon] = []
    yield made
    for d in made:
        await d.aclose()
