"""The daemon as systemd runs it: a real process, real signals, a real store file on disk."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.sandbox.qatium import QatiumEmulator
from gateway.uplinks.qatium.uplink import iso_time

from .daemon import Daemon

TOKEN = "daemon-secret-token-4711"

CONFIG = """
[store]
path = "{tmp}/fg.db"
commit_interval_ms = 50

[health]
port = 0

[log]
format = "json"
level = "{level}"

[[sources]]
name = "fast"
type = "synthetic"
interval_s = 0.02
[[sources.series]]
name = "tank1.level"
waveform = "random_walk"
min = 1
max = 5
[[sources.series]]
name = "pipe1.flow"
waveform = "sawtooth"
min = 0
max = 50

[[uplinks]]
name = "qatium"
type = "qatium"
url = "{url}/ingest"
token = {{ file = "{tmp}/qatium.token" }}
rate_limit_requests = 0
batch_max_items = 200
backoff_initial_s = 0.05
backoff_max_s = 0.5
timeout_s = 5
[[uplinks.routes]]
series = "tank1.level"
asset = "Tank1"
metric = "level"
unit = "m"
[[uplinks.routes]]
series = "pipe1.flow"
asset = "Pipe1"
metric = "flow"
unit = "l/s"

# A second uplink whose service never answers: it holds every captured reading in the store,
# so the test can compare what was captured with what reached Qatium.
[[uplinks]]
name = "witness"
type = "qatium"
url = "http://127.0.0.1:{dead_port}/ingest"
token = {{ file = "{tmp}/qatium.token" }}
backoff_initial_s = 60
[[uplinks.routes]]
series = "tank1.level"
asset = "Tank1"
metric = "level"
unit = "m"
[[uplinks.routes]]
series = "pipe1.flow"
asset = "Pipe1"
metric = "flow"
unit = "l/s"
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def qatium() -> AsyncIterator[QatiumEmulator]:
    async with QatiumEmulator(token=TOKEN, rate_limit=100_000) as emu:
        yield emu


@pytest.fixture
def config(tmp_path: Path, qatium: QatiumEmulator) -> Path:
    token = tmp_path / "qatium.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    path = tmp_path / "fieldgate.toml"
    path.write_text(
        CONFIG.format(tmp=tmp_path, url=qatium.url, dead_port=closed_port(), level="info")
    )
    return path


def captured(db: Path) -> set[tuple[str, int]]:
    """Every reading in the store (the witness uplink keeps them all there)."""
    with sqlite3.connect(db) as raw:
        rows = raw.execute("SELECT s.name, r.ts FROM readings r JOIN series s ON s.id = r.series")
        return {(name, ts) for name, ts in rows}


ASSETS = {"Tank1": "tank1.level", "Pipe1": "pipe1.flow"}


def delivered(emu: QatiumEmulator) -> list[tuple[str, str]]:
    return [(ASSETS[str(r["asset"])], str(r["time"])) for r in emu.rows]


async def test_kill_9_while_sending_loses_nothing(
    config: Path, qatium: QatiumEmulator, daemons: list[Daemon]
) -> None:
    for n in range(1, 4):
        d = Daemon(config)
        daemons.append(d)
        await d.start()
        await d.wait_event("gateway_ready")
        await qatium.wait_for(lambda n=n: len(qatium.rows) >= 200 * n, timeout=30)
        # Hold the next request in flight, then kill the daemon while it waits for the answer.
        qatium.faults.delay_next(1, seconds=30)
        await qatium.wait_for(lambda n=n: qatium.faults.injected["delay"] >= n, timeout=20)
        assert await d.kill() == -9
    # Final run with the source switched off: drain what was captured, then stop.
    config.write_text(
        config.read_text().replace('type = "synthetic"', 'type = "synthetic"\nenabled = false')
    )
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    db = config.parent / "fg.db"
    async with httpx.AsyncClient(base_url=await d.health_url()) as client:
        async with asyncio.timeout(60):
            while True:
                st = (await client.get("/status")).json()
                if st["uplinks"]["qatium"]["backlog"] == 0:
                    break
                await qatium.wait_for(lambda: True, timeout=1)
    assert await d.terminate() == 0
    want = captured(db)
    got = delivered(qatium)
    got_set = set(got)
    missing = {(s, iso_time(ts)) for s, ts in want} - got_set
    assert len(want) > 100
    assert not missing, f"{len(missing)} captured readings never reached Qatium"
    # Duplicates only for what was in flight at each kill (one batch of at most 200 each).
    assert len(got) - len(got_set) <= 3 * 200


async def test_sigterm_flushes_and_exits_zero(
    config: Path, qatium: QatiumEmulator, daemons: list[Daemon]
) -> None:
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    await qatium.wait_for(lambda: len(qatium.rows) > 20, timeout=20)
    assert await d.terminate() == 0
    names = [e.get("event") for e in d.events]
    assert names.index("shutdown_requested") < names.index("gateway_stopped")
    # Clean shutdown mark written; everything produced was committed (witness holds it).
    with sqlite3.connect(config.parent / "fg.db") as raw:
        assert raw.execute("SELECT value FROM meta WHERE key='clean'").fetchone()[0] == 1, d.raw[
            -8:
        ]
    produced = sum(1 for e in d.events if e.get("event") == "x")  # no per-reading log lines
    assert produced == 0


async def test_sd_notify_ready_watchdog_stopping(
    config: Path, tmp_path: Path, daemons: list[Daemon]
) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    d = Daemon(config, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    daemons.append(d)
    loop = asyncio.get_running_loop()
    got: list[str] = []
    try:
        await d.start()
        async with asyncio.timeout(20):
            while got.count("WATCHDOG=1") < 2:
                got.append((await loop.sock_recv(sock, 256)).decode())
        assert got[0] == "READY=1"
        assert await d.terminate() == 0
        async with asyncio.timeout(5):
            while "STOPPING=1" not in got:
                got.append((await loop.sock_recv(sock, 256)).decode())
    finally:
        sock.close()


async def test_corrupt_database_is_moved_aside_and_the_gateway_runs(
    config: Path, qatium: QatiumEmulator, daemons: list[Daemon]
) -> None:
    db = config.parent / "fg.db"
    db.write_bytes(b"\x00garbage, not SQLite\x00" * 500)
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    moved = await d.wait_event("store_moved_aside")
    assert Path(moved["moved_to"]).exists()
    await d.wait_event("gateway_ready")
    async with httpx.AsyncClient(base_url=await d.health_url()) as client:
        assert (await client.get("/health")).status_code == 200
        st = (await client.get("/status")).json()
        assert st["store"]["events"][0]["kind"] == "moved_aside"
    await qatium.wait_for(lambda: len(qatium.rows) > 0, timeout=20)
    assert await d.terminate() == 0


async def test_no_secret_in_logs_status_or_metrics(
    config: Path, qatium: QatiumEmulator, daemons: list[Daemon], tmp_path: Path
) -> None:
    config.write_text(config.read_text().replace('level = "info"', 'level = "debug"'))
    # A 401 puts the failure into logs and status: the token must not ride along.
    qatium.faults.fail_next(3, status=401)
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    await qatium.wait_for(lambda: qatium.status_counts[401] >= 1, timeout=20)
    async with httpx.AsyncClient(base_url=await d.health_url()) as client:
        texts = [(await client.get(p)).text for p in ("/status", "/metrics", "/health")]
    await d.terminate()
    everything = "\n".join([*d.raw, *texts])
    assert "auth_failed" in everything
    assert TOKEN not in everything


async def test_config_error_exits_78_without_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[store]\nquota_bytes = -1\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "run",
        "--config",
        str(bad),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ},
    )
    _, err = await proc.communicate()
    assert proc.returncode == 78
    assert b"store.quota_bytes (line 2)" in err
