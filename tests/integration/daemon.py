"""Run ``fieldgate run`` as a real child process and watch its JSON log lines."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

#: The head of a test daemon's config: its store, a health endpoint on a free port, JSON logs
#: (what :class:`Daemon` reads). Format with ``db``; sources and uplinks follow.
DAEMON_HEAD = """
[store]
path = "{db}"
commit_interval_ms = 50

[health]
port = 0

[log]
format = "json"
"""


class Daemon:
    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._cond = asyncio.Condition()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read(), name="daemon-reader")

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.raw.append(text)
            try:
                event = json.loads(text)
            except ValueError:
                event = {"event": "non_json", "text": text}
            async with self._cond:
                self.events.append(event)
                self._cond.notify_all()
        async with self._cond:
            self._cond.notify_all()

    async def wait_event(self, name: str, timeout: float = 20) -> dict[str, Any]:
        async with asyncio.timeout(timeout), self._cond:
            while True:
                for e in self.events:
                    if e.get("event") == name:
                        return e
                if (
                    self.proc is not None
                    and self.proc.returncode is not None
                    and self._reader
                    and self._reader.done()
                ):
                    raise AssertionError(f"daemon exited before {name}: {self.raw[-20:]}")
                await self._cond.wait()

    async def health_url(self) -> str:
        e = await self.wait_event("health_listening")
        return str(e["url"]).rsplit("/", 1)[0]

    async def kill(self) -> int:
        return await self._signal(signal.SIGKILL)

    async def terminate(self) -> int:
        return await self._signal(signal.SIGTERM)

    async def _signal(self, sig: int) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(30):
            rc = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return rc

    async def next_line(self, timeout: float) -> None:
        """Return when the daemon logs its next line, or after ``timeout`` seconds."""
        seen = len(self.raw)
        try:
            async with asyncio.timeout(timeout), self._cond:
                await self._cond.wait_for(lambda: len(self.raw) > seen)
        except TimeoutError:
            pass

    async def status_until(
        self,
        client: httpx.AsyncClient,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float = 30,
        what: str = "status",
    ) -> dict[str, Any]:
        """This daemon's /status once ``predicate`` holds for it; fail with the last answer's
        sources and uplinks. Re-checked after every line the daemon logs and at least every
        0.25 s (its counters also move without a log line)."""
        deadline = time.monotonic() + timeout
        while True:
            st: dict[str, Any] = (await client.get("/status")).json()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                shown = {k: st.get(k) for k in ("sources", "uplinks")}
                raise AssertionError(
                    f"{what} not reached within {timeout:g} s: {json.dumps(shown, indent=1)}"
                )
            await self.next_line(0.25)

    async def aclose(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()
        elif self._reader is not None:
            await self._reader
