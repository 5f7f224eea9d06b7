"""The health endpoint: the port it reports is the one it is bound to; a port that is busy at
start-up is retried until it binds, visible in the logs, the systemd status text and /status."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from gateway.config import HealthConfig
from gateway.health import LOG_EVERY_NTH_FAILURE, HealthServer
from gateway.systemd import Notifier

from .daemon import DAEMON_HEAD, Daemon


class Provider:
    def __init__(self) -> None:
        self.ok, self.reasons = True, list[str]()

    def status(self) -> dict[str, Any]:
        return {
            "store": {
                "captured_total": 7,
                "evicted_total": 0,
                "bytes": 4096,
                "quota_bytes": 1 << 20,
                "buffered": 0,
                "free_disk_bytes": None,
            },
            "clock": {"synchronized": True},
            "sources": {},
            "uplinks": {},
        }

    def health(self) -> tuple[bool, list[str]]:
        return self.ok, self.reasons


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_port_zero_reports_the_bound_port() -> None:
    provider = Provider()
    async with HealthServer(HealthConfig(host="127.0.0.1", port=0), provider) as server:
        assert server.port is not None and server.port != 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            r = await client.get("/health")
            assert (r.status_code, r.json()) == (200, {"ok": True, "reasons": []})
            provider.ok, provider.reasons = False, ["store not writable"]
            r = await client.get("/health")
            assert (r.status_code, r.json()["reasons"]) == (503, ["store not writable"])
            assert (await client.get("/status")).json()["store"]["captured_total"] == 7
            metrics = {
                f.name: f
                for f in text_string_to_metric_families((await client.get("/metrics")).text)
            }
            assert metrics["fieldgate_readings_captured"].samples[0].value == 7
    # Closed: the port is free again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", server.port))


async def test_fixed_port_is_reported_as_configured() -> None:
    port = free_port()
    server = HealthServer(HealthConfig(host="127.0.0.1", port=port), Provider())
    assert await server.start() == port
    try:
        assert server.port == port
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    finally:
        await server.aclose()


# -- a busy port at start-up ------------------------------------------------------------------

SOURCE = """
[[sources]]
name = "gen"
type = "synthetic"
interval_s = 0.1
[[sources.series]]
name = "tank1.level"
"""


def hold_port() -> socket.socket:
    """A listening socket on a free loopback port: the health server cannot bind it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def notify_until(sock: socket.socket, predicate: Callable[[str], bool]) -> str:
    """The first sd_notify datagram the daemon sends that satisfies ``predicate``."""
    loop = asyncio.get_running_loop()
    while True:
        message = (await loop.sock_recv(sock, 4096)).decode()
        if predicate(message):
            return message


async def test_daemon_retries_a_busy_health_port_until_it_binds(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    holder = hold_port()
    port = int(holder.getsockname()[1])
    # systemd's notify socket, played by this test (abstract: no path length limit).
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"fieldgate-test-{os.getpid()}-{port}"
    notify.bind("\0" + name)
    notify.setblocking(False)
    config = tmp_path / "fg.toml"
    config.write_text(DAEMON_HEAD.format(db=tmp_path / "fg.db") + SOURCE)
    daemon = Daemon(config, env={"FIELDGATE_HEALTH__PORT": str(port), "NOTIFY_SOCKET": "@" + name})
    daemons.append(daemon)
    try:
        await daemon.start()
        failed = await daemon.wait_event("health_bind_failed")
        assert failed["level"] == "error"
        assert (failed["port"], failed["attempt"]) == (port, 1)
        assert failed["retry_in_s"] > 0 and "retrying" in failed["action"]
        assert "in use" in failed["error"]
        await daemon.wait_event("gateway_ready")  # it runs meanwhile, without the endpoint
        async with asyncio.timeout(30):
            # The systemd status text says so, and counts the attempts: wait for a retry.
            status = await notify_until(notify, lambda m: "2 failed attempts" in m)
        assert status.startswith("STATUS=") and f"127.0.0.1:{port} not bound" in status
        # The retries are not logged one by one (only changes and every Nth).
        assert [e["attempt"] for e in daemon.events if e["event"] == "health_bind_failed"] == [1]

        holder.close()  # the other program goes away
        listening = await daemon.wait_event("health_listening", timeout=30)
        assert listening["url"] == f"http://127.0.0.1:{port}/status"
        assert listening["bind_failures"] >= 2
        async with asyncio.timeout(30):
            await notify_until(notify, lambda m: m.startswith("STATUS=health endpoint listening"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            st = (await client.get("/status")).json()
            assert (await client.get("/health")).status_code == 200
            metrics = {
                f.name: f
                for f in text_string_to_metric_families((await client.get("/metrics")).text)
            }
        health = st["health"]
        assert health["url"] == f"http://127.0.0.1:{port}"
        assert health["bind_failures"] == listening["bind_failures"]
        assert "in use" in health["last_bind_error"]
        assert health["bound_at_epoch"] >= health["last_bind_error_at_epoch"]
        assert health["bound_at"] >= health["last_bind_error_at"]  # ISO text sorts as time
        assert st["sources"]["gen"]["readings"] > 0
        samples = metrics["fieldgate_health_bind_failures"].samples
        assert samples[0].value == health["bind_failures"]
        assert await daemon.terminate() == 0
    finally:
        holder.close()
        notify.close()


class CountingNotifier(Notifier):
    """Records the status texts; sets ``reached`` at the ``until``-th one."""

    def __init__(self, until: int) -> None:
        super().__init__()
        self.texts: list[str] = []
        self.until = until
        self.reached = asyncio.Event()

    def status(self, text: str) -> bool:
        self.texts.append(text)
        if len(self.texts) >= self.until:
            self.reached.set()
        return True


async def test_bind_failures_are_logged_on_change_and_every_nth() -> None:
    holder = hold_port()
    port = int(holder.getsockname()[1])
    notifier = CountingNotifier(until=25)
    server = HealthServer(
        HealthConfig(host="127.0.0.1", port=port),
        Provider(),
        notifier=notifier,
        retry_initial_s=0.001,
        retry_max_s=0.002,
    )
    try:
        with capture_logs() as logs:
            assert await server.start_or_retry() is False
            async with asyncio.timeout(30):
                await notifier.reached.wait()
            holder.close()
            async with asyncio.timeout(30):
                await server.listening.wait()  # the next attempt binds
            assert server.url == f"http://127.0.0.1:{port}"
    finally:
        holder.close()
        await server.aclose()
    failed = [e for e in logs if e["event"] == "health_bind_failed"]
    # The same error again is logged every Nth time (the others at debug, when enabled).
    shown = [e["attempt"] for e in failed if e["log_level"] == "error"]
    n = server.bind_failures
    assert shown == [a for a in range(1, n + 1) if a == 1 or a % LOG_EVERY_NTH_FAILURE == 0]
    assert max(e["retry_in_s"] for e in failed) == 0.002  # capped
    listening = [e for e in logs if e["event"] == "health_listening"]
    assert listening[0]["bind_failures"] == n >= 25
    assert notifier.texts[-1].startswith("health endpoint listening")


async def test_aclose_stops_the_retries() -> None:
    holder = hold_port()
    port = int(holder.getsockname()[1])
    server = HealthServer(HealthConfig(host="127.0.0.1", port=port), Provider())
    try:
        assert await server.start_or_retry() is False
        await server.aclose()  # the conftest guard fails the test if the retry task lingers
        assert server.url is None and server.bind_failures == 1
    finally:
        holder.close()
