"""The README's first command: `fieldgate demo` delivers to the emulated services within seconds,
on whatever ports are free, prints only URLs it owns, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

#: The ports the demo used to take for granted: its default health port and Qatium's stand-in.
DEFAULT_HEALTH_PORT = 8080
OLD_QATIUM_PORT = 8701
BANNER = "fieldgate demo is running"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def occupied(*ports: int) -> Iterator[None]:
    """Each port busy while inside: held by a listening socket here, or already by another
    program (busy either way)."""
    held: list[socket.socket] = []
    try:
        for port in ports:
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                s.close()
                assert exc.errno == errno.EADDRINUSE, exc
                continue
            s.listen()
            held.append(s)
        yield
    finally:
        for s in held:
            s.close()


class Demo:
    """``python -m gateway demo`` as a child process; its stderr read line by line."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.args = args
        # Its temporary directory lands here, so the test sees what it leaves behind.
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir(parents=True)
        base = {k: v for k, v in os.environ.items() if k != "FIELDGATE_HEALTH__PORT"}
        self.env = {**base, "TMPDIR": str(self.tmpdir), **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.urls: dict[str, str] = {}
        self._new_line = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        #: Uplinks whose first delivery the daemon has logged (its JSON lines on stdout).
        self.first_deliveries: set[str] = set()
        self._logs: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "demo",
            *self.args,
            stdout=asyncio.subprocess.PIPE,  # its JSON log lines
            stderr=asyncio.subprocess.PIPE,  # what a person reads
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read(), name="demo-stderr")
        self._logs = asyncio.create_task(self._read_logs(), name="demo-stdout")

    async def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "uplink_first_delivery":
                    async with self._new_line:
                        self.first_deliveries.add(event["uplink"])
                        self._new_line.notify_all()

    async def delivered(self, uplinks: set[str], timeout: float = 60) -> None:
        """Return once each of ``uplinks`` has logged its first delivery."""
        async with asyncio.timeout(timeout), self._new_line:
            await self._new_line.wait_for(lambda: uplinks <= self.first_deliveries)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            async with self._new_line:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._new_line.notify_all()
        async with self._new_line:
            self._new_line.notify_all()

    async def banner(self, timeout: float = 60) -> list[str]:
        """The lines the demo prints once running (up to the blank line that ends them)."""
        async with asyncio.timeout(timeout), self._new_line:
            while True:
                starts = [i for i, line in enumerate(self.lines) if line.startswith(BANNER)]
                if starts and "" in self.lines[starts[0] :]:
                    end = self.lines.index("", starts[0])
                    return self.lines[starts[0] + 1 : end]
                assert self._reader is not None
                assert not self._reader.done(), f"demo ended before its banner: {self.lines}"
                await self._new_line.wait()

    async def stop(self, sig: int) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.wait()

    async def wait(self) -> int:
        assert self.proc is not None and self._reader is not None
        async with asyncio.timeout(30):
            rc = await self.proc.wait()
            await self._reader
        return rc

    def left_behind(self) -> list[str]:
        return sorted(str(p.relative_to(self.tmpdir)) for p in self.tmpdir.rglob("*"))


@contextlib.asynccontextmanager
async def running(demo: Demo) -> AsyncIterator[Demo]:
    await demo.start()
    try:
        yield demo
    finally:
        assert demo.proc is not None
        if demo.proc.returncode is None:
            demo.proc.kill()
            await demo.wait()


def parse_banner(lines: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """(name, URL) pairs of the endpoint in printed order, and the stand-ins by name."""
    endpoint: list[tuple[str, str]] = []
    stand_ins: dict[str, str] = {}
    section = endpoint
    for line in lines:
        if line == "stand-ins:":
            section = []
            continue
        name, _, value = line.strip().partition(" ")
        if section is endpoint:
            endpoint.append((name, value.strip()))
        else:
            stand_ins[line[:17].strip()] = line[17:].strip()
    return endpoint, stand_ins


async def answers(url: str) -> bool:
    """Whether something speaks at the URL's host and port (HTTP: any HTTP answer)."""
    parts = urlsplit(url.split(maxsplit=1)[0])
    assert parts.hostname is not None and parts.port is not None
    if parts.scheme == "http":
        async with httpx.AsyncClient() as client:
            await client.get(url)
        return True
    _, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.close()
    await writer.wait_closed()
    return True


async def wait_delivered(demo: Demo, base: str) -> dict[str, Any]:
    """/status once Qatium, Vanda, Energydata and Datacooee have deliveries (NILU needs its
    sensors' minute): the daemon logs each uplink's first delivery."""
    names = ("qatium", "vanda", "energydata", "datacooee")
    await demo.delivered(set(names))
    async with httpx.AsyncClient(base_url=base) as client:
        status: dict[str, Any] = (await client.get("/status")).json()
        up = status["uplinks"]
        assert all(up[n]["delivered"] > 0 for n in names), up
        assert (await client.get("/health")).status_code == 200
    assert all(s["state"] == "ok" for s in status["sources"].values()), status["sources"]
    assert status["sources"]["substation"]["readings"] > 0  # the Modbus simulator
    assert status["sources"]["river"]["readings"] >= 60  # the logger's stored hour
    return status


async def test_demo_delivers_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    demo = Demo(tmp_path, "--health-port", str(port), "--state-dir", str(state))
    async with running(demo):
        endpoint, _ = parse_banner(await demo.banner())
        assert endpoint[0] == ("console", f"http://127.0.0.1:{port}/")
        assert endpoint[1] == ("status", f"http://127.0.0.1:{port}/status")
        await wait_delivered(demo, f"http://127.0.0.1:{port}")
        assert await demo.stop(signal.SIGINT) == 0
    assert (state / "fieldgate.db").exists()  # a store asked for is kept
    assert demo.left_behind() == []  # the rest (ptys, broker) is gone


async def test_demo_on_busy_ports_picks_free_ones(tmp_path: Path) -> None:
    demo = Demo(tmp_path)
    with occupied(DEFAULT_HEALTH_PORT, OLD_QATIUM_PORT):
        async with running(demo):
            endpoint, stand_ins = parse_banner(await demo.banner())
            # The console URL first, then the other endpoints, on a port of its own.
            names = [name for name, _ in endpoint]
            assert names == ["console", "status", "health", "metrics", "store", "config"]
            base = endpoint[0][1].removesuffix("/")
            status_url = endpoint[1][1]
            assert status_url == f"{base}/status"
            assert urlsplit(status_url).port not in (DEFAULT_HEALTH_PORT, None)
            store = endpoint[4][1].removesuffix(" (removed on exit)")
            assert Path(store).is_relative_to(demo.tmpdir) and Path(store).exists()
            urls = [u.split(maxsplit=1)[0] for u in stand_ins.values() if "://" in u]
            ports = {urlsplit(u).port for u in urls}
            assert len(ports) == 6 and not ports & {DEFAULT_HEALTH_PORT, OLD_QATIUM_PORT}
            # Every URL it printed is its own: each answers, and the endpoint says it is it.
            for url in [u for _, u in endpoint[:4]] + urls:
                assert await answers(url), url
            status = await wait_delivered(demo, base)
            assert status["health"]["url"] == base
            assert status["store"]["path"] == store
            assert await demo.stop(signal.SIGTERM) == 0
    assert not any("Traceback" in line for line in demo.lines), demo.lines
    assert demo.left_behind() == []  # the temporary store, broker dir and ptys are removed


async def test_demo_honours_fieldgate_health_port(tmp_path: Path) -> None:
    port = free_port()
    demo = Demo(tmp_path, env={"FIELDGATE_HEALTH__PORT": str(port)})
    async with running(demo):
        endpoint, _ = parse_banner(await demo.banner())
        assert endpoint[0] == ("console", f"http://127.0.0.1:{port}/")
        assert endpoint[1] == ("status", f"http://127.0.0.1:{port}/status")
        async with httpx.AsyncClient() as client:
            st = (await client.get(endpoint[1][1])).json()
        assert st["health"]["url"] == f"http://127.0.0.1:{port}"
        assert set(st["uplinks"]) == {"qatium", "nilu", "vanda", "energydata", "datacooee"}
        assert await demo.stop(signal.SIGINT) == 0
    assert demo.left_behind() == []


async def test_demo_refuses_a_busy_port_it_was_asked_for(tmp_path: Path) -> None:
    port = free_port()
    with occupied(port):
        for n, (args, env) in enumerate(
            [
                (("--health-port", str(port)), {}),
                ((), {"FIELDGATE_HEALTH__PORT": str(port)}),
            ]
        ):
            demo = Demo(tmp_path / str(n), *args, env=env)
            async with running(demo):
                assert await demo.wait() == 1
            # One line naming the port and what to do: no traceback, nothing left behind.
            assert len(demo.lines) == 1, demo.lines
            assert re.fullmatch(
                rf"fieldgate demo: health port 127\.0\.0\.1:{port} is in use: .*"
                r"--health-port.*FIELDGATE_HEALTH__PORT.*",
                demo.lines[0],
            ), demo.lines
            assert demo.left_behind() == []
