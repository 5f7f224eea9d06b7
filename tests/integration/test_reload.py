"""``systemctl reload`` (SIGHUP) applies a changed config file to a running daemon (issue 15).

Real processes: a ``fieldgate run`` child with synthetic sources writing every 20-30 ms, Qatium
emulators receiving, SIGHUP while a request is in flight. Every reading is counted: a witness
uplink whose service never answers keeps every captured reading in the store, and what each
emulator received is compared with it, reading by reading.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.sandbox.qatium import QatiumEmulator
from gateway.uplinks.qatium.uplink import iso_time

from .daemon import DAEMON_HEAD, Daemon

TOKEN = "reload-secret-token-0815"

#: Qatium asset -> the series routed to it (the same in every config below).
ASSETS = {"Tank1": "a1.level", "Pipe1": "b1.flow", "Pump1": "c1.pressure"}

SOURCE = """
[[sources]]
name = "{name}"
type = "synthetic"
interval_s = {interval}
[[sources.series]]
name = "{series}"
waveform = "random_walk"
min = 1
max = 5
"""

QATIUM = """
[[uplinks]]
name = "{name}"
type = "qatium"
url = "{url}/ingest"
token = {{ file = "{token}" }}
rate_limit_requests = 0
batch_max_items = 200
backoff_initial_s = 0.05
backoff_max_s = 0.5
timeout_s = 5
auth_retry_s = 600
job_poll_s = 0.1
job_poll_max = 20
"""

ROUTE = """
[[uplinks.routes]]
series = "{series}"
asset = "{asset}"
metric = "{metric}"
unit = "{unit}"
"""

# Never answers (a closed port): every reading it is routed stays in the store.
WITNESS = """
[[uplinks]]
name = "witness"
type = "qatium"
url = "http://127.0.0.1:{port}/ingest"
token = {{ file = "{token}" }}
backoff_initial_s = 60
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def source(name: str, series: str, interval: float = 0.02) -> str:
    return SOURCE.format(name=name, series=series, interval=interval)


def route(series: str, unit: str | None = None) -> str:
    asset = next(a for a, s in ASSETS.items() if s == series)
    metric = {"a1.level": "level", "b1.flow": "flow", "c1.pressure": "pressure"}[series]
    default = {"level": "m", "flow": "l/s", "pressure": "m"}[metric]
    return ROUTE.format(series=series, asset=asset, metric=metric, unit=unit or default)


def qatium(name: str, emu: QatiumEmulator, token: Path, *routes: str) -> str:
    return QATIUM.format(name=name, url=emu.url, token=token) + "".join(routes)


def witness(port: int, token: Path) -> str:
    every = (route(s) for s in ASSETS.values())
    return WITNESS.format(port=port, token=token) + "".join(every)


def write(path: Path, *parts: str) -> str:
    text = DAEMON_HEAD.format(db=path.parent / "fg.db") + "".join(parts)
    path.write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def captured(db: Path) -> list[tuple[str, int]]:
    """Every reading in the store, in capture order."""
    with sqlite3.connect(db) as raw:
        rows = raw.execute(
            "SELECT s.name, r.ts FROM readings r JOIN series s ON s.id = r.series ORDER BY r.id"
        )
        return [(name, ts) for name, ts in rows]


def received(emu: QatiumEmulator) -> list[tuple[str, str, str]]:
    """(series, time, unit) of every row the emulator accepted, in arrival order."""
    return [(ASSETS[str(r["asset"])], str(r["time"]), str(r["unit"])) for r in emu.rows]


def events(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [e for e in d.events if e.get("event") == name]


async def wait_events(d: Daemon, name: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
    """The daemon's ``name`` events once there are ``n`` of them (re-checked on each log line)."""
    deadline = time.monotonic() + timeout
    while len(got := events(d, name)) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"{n} x {name} not logged within {timeout:g} s: {d.raw[-15:]}")
        if d.proc is not None and d.proc.returncode is not None:
            raise AssertionError(f"daemon exited before {n} x {name}: {d.raw[-15:]}")
        await d.next_line(1.0)
    return got


def hangup(d: Daemon) -> None:
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)


@pytest.fixture
async def emulators() -> AsyncIterator[tuple[QatiumEmulator, QatiumEmulator]]:
    """The first one processes each ingest as a job (as the real service may): it appends the
    rows once the uplink's status query finds the job done, after about 0.4 s, or after 1.5 s
    whether the uplink still asks or not. A request abandoned while its job runs is then
    appended all the same, and its readings, still pending, would be sent twice."""
    async with (
        QatiumEmulator(
            token=TOKEN, rate_limit=100_000, async_jobs=True, pending_polls=4, settle_after_s=1.5
        ) as one,
        QatiumEmulator(token=TOKEN, rate_limit=100_000) as two,
    ):
        yield one, two


@pytest.fixture
def token(tmp_path: Path) -> Path:
    path = tmp_path / "qatium.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


async def test_reload_while_capturing_and_delivering_loses_and_repeats_nothing(
    tmp_path: Path,
    emulators: tuple[QatiumEmulator, QatiumEmulator],
    token: Path,
    daemons: list[Daemon],
) -> None:
    """Source b removed, c added, a changed; uplink q1 re-routed (a unit changed, a series
    added) while its request is in flight; uplink q2 added; the witness untouched."""
    e1, e2 = emulators
    config = tmp_path / "fieldgate.toml"
    dead = closed_port()
    # q1 after the reload: a1.level in feet instead of metres, c1.pressure added.
    q1_v2 = (route("a1.level", unit="ft"), route("b1.flow"), route("c1.pressure"))
    write(
        config,
        source("a", "a1.level"),
        source("b", "b1.flow"),
        qatium("q1", e1, token, route("a1.level"), route("b1.flow")),
        witness(dead, token),
    )
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    await e1.wait_for(lambda: len(e1.rows) >= 200, timeout=30)

    # Reload while a request of q1 is in flight: taken by the service, its job still running.
    await e1.wait_for(lambda: any(not j.final for j in e1.jobs.values()), timeout=20)
    v2 = write(
        config,
        source("a", "a1.level", interval=0.03),
        source("c", "c1.pressure"),
        qatium("q1", e1, token, *q1_v2),
        witness(dead, token),
        qatium("q2", e2, token, route("a1.level")),
    )
    hangup(d)
    (reloaded,) = await wait_events(d, "config_reloaded", 1)
    assert (reloaded["sources_added"], reloaded["sources_removed"]) == (["c"], ["b"])
    assert reloaded["sources_changed"] == ["a"]
    assert (reloaded["uplinks_added"], reloaded["uplinks_changed"]) == (["q2"], ["q1"])
    assert reloaded["uplinks_removed"] == []
    assert reloaded["sha256"] == v2
    # The request in flight was answered and recorded before q1 was replaced.
    assert not events(d, "uplink_stop_abandoned")

    # The new config runs: c reaches q1, a reaches q2.
    await e1.wait_for(lambda: sum(1 for r in e1.rows if r["asset"] == "Pump1") >= 50, timeout=30)
    await e2.wait_for(lambda: len(e2.rows) >= 50, timeout=30)

    # Stop capturing (a third reload, no sources), let both uplinks drain, compare.
    write(
        config,
        qatium("q1", e1, token, *q1_v2),
        witness(dead, token),
        qatium("q2", e2, token, route("a1.level")),
    )
    hangup(d)
    await wait_events(d, "config_reloaded", 2)
    async with httpx.AsyncClient(base_url=await d.health_url()) as client:
        st = await d.status_until(
            client,
            lambda st: (
                st["config"]["reloads"] == 2
                and st["store"]["buffered"] == 0
                and st["uplinks"]["q1"]["backlog"] == 0
                and st["uplinks"]["q2"]["backlog"] == 0
            ),
            timeout=60,
            what="q1 and q2 drained",
        )
    assert sorted(st["uplinks"]) == ["q1", "q2", "witness"]
    assert st["sources"] == {}
    assert await d.terminate() == 0

    stored = captured(tmp_path / "fg.db")
    assert len(stored) == st["store"]["captured_total"] > 300
    want = {(s, iso_time(ts)) for s, ts in stored}
    assert len(want) == len(stored)  # each series' timestamps are unique

    got1 = received(e1)
    counts1 = Counter((s, t) for s, t, _ in got1)
    assert not [k for k, n in counts1.items() if n > 1], "q1 received readings twice"
    assert set(counts1) == want, (
        f"q1 missing {len(want - set(counts1))}, unexpected {len(set(counts1) - want)}"
    )
    # The changed route took effect at one instant: every "m" row before every "ft" row.
    level = sorted((t, unit) for s, t, unit in got1 if s == "a1.level")
    units = [unit for _, unit in level]
    assert units[0] == "m" and units[-1] == "ft"
    assert units == sorted(units, key=lambda u: u == "ft")

    # q2 started with what was captured from the reload on: an unbroken tail of a1.level.
    got2 = [(s, t) for s, t, _ in received(e2)]
    assert len(got2) == len(set(got2)), "q2 received readings twice"
    assert {s for s, _ in got2} == {"a1.level"}
    first = min(t for _, t in got2)
    tail = {(s, iso_time(ts)) for s, ts in stored if s == "a1.level" and iso_time(ts) >= first}
    assert set(got2) == tail


async def test_an_invalid_file_is_refused_and_the_running_config_goes_on(
    tmp_path: Path,
    emulators: tuple[QatiumEmulator, QatiumEmulator],
    token: Path,
    daemons: list[Daemon],
) -> None:
    e1, _ = emulators
    config = tmp_path / "fieldgate.toml"
    v1 = write(config, source("a", "a1.level"), qatium("q1", e1, token, route("a1.level")))
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    await e1.wait_for(lambda: len(e1.rows) >= 50, timeout=30)
    async with httpx.AsyncClient(base_url=await d.health_url()) as client:
        before = (await client.get("/status")).json()["config"]
        assert before["sha256"] == v1 and before["reloads"] == 0
        assert before["path"] == str(config) and before["loaded_at"].endswith("Z")

        bad = (
            config.read_text()
            .replace("interval_s = 0.02", "interval_s = -1")
            .replace("batch_max_items = 200", 'batch_max_items = "many"\ncolour = "red"')
        )
        config.write_text(bad)
        hangup(d)
        refused = await wait_events(d, "config_reload_refused", 3)
        logged = sorted(e["problem"] for e in refused)
        assert {e["config"] for e in refused} == {str(config)}

        # The same lines check-config prints for the file.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "check-config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ},
        )
        _, err = await proc.communicate()
        assert proc.returncode == 78
        printed = sorted(
            line.strip() for line in err.decode().splitlines() if line.startswith("  ")
        )
        assert logged == printed
        assert any(p.startswith("sources[0].interval_s (line ") for p in logged)
        assert any(p.startswith("uplinks[0].colour (line ") for p in logged)

        # Still running the old config: delivering, same hash, the refusal shown.
        n = len(e1.rows)
        await e1.wait_for(lambda: len(e1.rows) >= n + 50, timeout=30)
        st = (await client.get("/status")).json()
        assert st["config"]["sha256"] == v1 and st["config"]["reloads"] == 0
        assert st["config"]["loaded_at"] == before["loaded_at"]
        error = st["config"]["last_reload_error"]
        assert error.startswith(f"{config}: configuration is invalid: ")
        assert all(p in error for p in logged)
        assert st["uplinks"]["q1"]["state"] == "ok"
        assert d.proc is not None and d.proc.returncode is None

        # Fixed: the next reload applies and clears the error.
        v3 = write(
            config, source("a", "a1.level", 0.05), qatium("q1", e1, token, route("a1.level"))
        )
        hangup(d)
        await wait_events(d, "config_reloaded", 1)
        st = await d.status_until(
            client, lambda st: st["config"]["reloads"] == 1, what="the fixed file applied"
        )
        assert st["config"]["sha256"] == v3
        assert st["config"]["last_reload_error"] is None
        assert st["config"]["loaded_at_epoch"] > before["loaded_at_epoch"]
        assert st["config"]["loaded_at"] > before["loaded_at"]  # ISO text sorts as time
    assert await d.terminate() == 0


async def test_a_replaced_token_file_is_used_without_waiting_the_auth_retry(
    tmp_path: Path,
    emulators: tuple[QatiumEmulator, QatiumEmulator],
    token: Path,
    daemons: list[Daemon],
) -> None:
    e1, _ = emulators
    token.write_text("an-expired-token-4711\n")
    config = tmp_path / "fieldgate.toml"
    write(config, source("a", "a1.level"), qatium("q1", e1, token, route("a1.level")))
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    async with httpx.AsyncClient(base_url=await d.health_url()) as client:
        st = await d.status_until(
            client, lambda st: st["uplinks"]["q1"]["state"] == "auth_failed", what="auth_failed"
        )
        assert st["uplinks"]["q1"]["retry_in_s"] > 500  # auth_retry_s = 600
        assert not e1.rows
        with sqlite3.connect(tmp_path / "fg.db") as raw:
            (first,) = raw.execute("SELECT min(ts) FROM readings").fetchone()

        # The operator replaces the token file and reloads: the file is unchanged.
        token.write_text(TOKEN + "\n")
        hangup(d)
        (reloaded,) = await wait_events(d, "config_reloaded", 1)
        assert reloaded["uplinks_changed"] == ["q1"]
        # Delivery resumes at once, backlog first reading included (600 s not waited).
        await e1.wait_for(
            lambda: any(r["time"] == iso_time(first) for r in e1.rows),
            timeout=30,
        )
        st = await d.status_until(
            client, lambda st: st["uplinks"]["q1"]["state"] == "ok", what="q1 ok"
        )
        assert st["config"]["reloads"] == 1
    assert await d.terminate() == 0
    everything = "\n".join(d.raw)
    assert TOKEN not in everything and "an-expired-token-4711" not in everything


async def test_systemd_is_told_reloading_and_ready_again(
    tmp_path: Path,
    emulators: tuple[QatiumEmulator, QatiumEmulator],
    token: Path,
    daemons: list[Daemon],
) -> None:
    e1, _ = emulators
    config = tmp_path / "fieldgate.toml"
    write(config, source("a", "a1.level"), qatium("q1", e1, token, route("a1.level")))
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    d = Daemon(config, env={"NOTIFY_SOCKET": str(sock_path)})
    daemons.append(d)
    got: list[str] = []

    async def until(pred: Any) -> None:
        async with asyncio.timeout(30):
            while not pred():
                got.append((await loop.sock_recv(sock, 512)).decode())

    try:
        await d.start()
        await until(lambda: "READY=1" in got)
        write(config, source("a", "a1.level", 0.05), qatium("q1", e1, token, route("a1.level")))
        hangup(d)
        await until(lambda: any(m.startswith("RELOADING=1") for m in got))
        start = next(i for i, m in enumerate(got) if m.startswith("RELOADING=1"))
        await until(lambda: "READY=1" in got[start:])
        assert "\nMONOTONIC_USEC=" in got[start]
        (reloaded,) = await wait_events(d, "config_reloaded", 1)
        assert reloaded["sources_changed"] == ["a"]
        assert await d.terminate() == 0
    finally:
        sock.close()
