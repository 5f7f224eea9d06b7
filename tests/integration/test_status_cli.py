"""``fieldgate status`` against a real daemon, and /status times as ISO text (issue 16).

The daemon (a real ``fieldgate run`` process) delivers to the Qatium emulator; a second uplink's
service never answers (backing off, with a last error). Its sources emit once at start and then
not for an hour, so once Qatium has everything the counters stand still and the command's output
can be compared with /status exactly. The health port comes from ``FIELDGATE_HEALTH__PORT`` (the
file says 0), for the daemon and the command alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.sandbox.qatium import QatiumEmulator
from gateway.timefields import is_time_key

from .daemon import Daemon
from .test_daemon import TOKEN, closed_port

CONFIG = """
[store]
path = "{tmp}/fg.db"
commit_interval_ms = 50

[health]
port = 0

[log]
format = "json"

[[sources]]
name = "tanks"
type = "synthetic"
interval_s = 3600
[[sources.series]]
name = "tank1.level"
min = 1
max = 5

[[sources]]
name = "pipes"
type = "synthetic"
interval_s = 3600
[[sources.series]]
name = "pipe1.flow"
min = 0
max = 50

[[uplinks]]
name = "qatium"
type = "qatium"
url = "{url}/ingest"
token = {{ file = "{tmp}/qatium.token" }}
rate_limit_requests = 0
backoff_initial_s = 0.05
backoff_max_s = 0.5
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
"""


@pytest.fixture
async def qatium() -> AsyncIterator[QatiumEmulator]:
    async with QatiumEmulator(token=TOKEN, rate_limit=100_000) as emu:
        yield emu


@pytest.fixture
def port() -> int:
    return closed_port()


@pytest.fixture
def env(port: int) -> dict[str, str]:
    return {**os.environ, "FIELDGATE_HEALTH__PORT": str(port)}


@pytest.fixture
def config(tmp_path: Path, qatium: QatiumEmulator) -> Path:
    token = tmp_path / "qatium.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    path = tmp_path / "fieldgate.toml"
    path.write_text(CONFIG.format(tmp=tmp_path, url=qatium.url, dead_port=closed_port()))
    return path


@pytest.fixture
async def settled(config: Path, port: int, daemons: list[Daemon]) -> dict[str, Any]:
    """A running daemon whose counters stand still: its /status."""
    d = Daemon(config, env={"FIELDGATE_HEALTH__PORT": str(port)})
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    assert await d.health_url() == f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return await d.status_until(
            client,
            lambda st: (
                st["uplinks"]["qatium"]["delivered"] == 2
                and st["uplinks"]["qatium"]["backlog"] == 0
                and st["uplinks"]["witness"]["last_error"] is not None
            ),
            what="qatium has both readings, witness has failed once",
        )


def status_cli(config: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "status", "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def fetch_status(port: int) -> dict[str, Any]:
    st: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/status").json()
    return st


def row(out: str, name: str) -> list[str]:
    """The table row of ``name`` (its first column), split on runs of two or more spaces."""
    for line in out.splitlines():
        cells = [c for c in line.strip().split("  ") if c]
        if cells and cells[0].strip() == name:
            return [c.strip() for c in cells]
    raise AssertionError(f"no row for {name!r} in:\n{out}")


async def test_table_shows_every_source_and_uplink(
    settled: dict[str, Any], config: Path, env: dict[str, str], port: int
) -> None:
    out = await asyncio.to_thread(status_cli, config, env)
    assert out.returncode == 0, out.stderr
    st = fetch_status(port)
    text = out.stdout
    assert f"http://127.0.0.1:{port}" in text and "ready" in text
    for name, s in st["sources"].items():
        cells = row(text, name)
        assert cells[1] == s["state"] and cells[2] == str(s["readings"]), cells
    for name, u in st["uplinks"].items():
        cells = row(text, name)
        assert cells[1].split()[0] == u["state"], cells
        assert cells[2] == str(u["delivered"]) and cells[3] == str(u["backlog"]), cells
        assert cells[6] == str(u["dead_letters"]), cells
    assert st["uplinks"]["qatium"]["delivered"] == 2
    assert row(text, "witness")[1].startswith("backing_off")
    assert "witness: last error" in text  # the dead port's refusal, with its age
    assert ("ago" in text or "just now" in text) and "Store" in text and "Clock" in text
    assert str(st["store"]["path"]) in text


def _shape(v: Any) -> Any:
    """The keys of ``v``, recursively (values that move between two looks left out)."""
    if isinstance(v, dict):
        return {k: _shape(x) for k, x in v.items()}
    return type(v).__name__ if v is not None else None


async def test_json_is_status(
    settled: dict[str, Any], config: Path, env: dict[str, str], port: int
) -> None:
    out = await asyncio.to_thread(status_cli, config, env, "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    st = fetch_status(port)
    assert got.keys() == st.keys()
    for part in ("version", "started_at", "started_at_epoch", "config", "sources"):
        assert got[part] == st[part], part
    for name, u in st["uplinks"].items():
        for key in ("state", "delivered", "backlog", "dead_letters", "last_delivery_at"):
            assert got["uplinks"][name][key] == u[key], (name, key)
    assert _shape(got["uplinks"]) == _shape(st["uplinks"])
    assert got["store"]["captured_total"] == st["store"]["captured_total"]


async def test_watch_redraws_until_ctrl_c(
    settled: dict[str, Any], config: Path, env: dict[str, str]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "status",
        "-c",
        str(config),
        "--watch",
        "0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    frames = 0
    try:
        async with asyncio.timeout(30):
            while frames < 3:
                line = (await proc.stdout.readline()).decode()
                assert line, "status --watch ended by itself"
                if line.startswith("● fieldgate "):
                    frames += 1
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert b"Traceback" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_unreachable_daemon_exits_1_naming_the_url(tmp_path: Path) -> None:
    port = closed_port()
    config = tmp_path / "fieldgate.toml"
    config.write_text(f'[store]\npath = "{tmp_path}/fg.db"\n[health]\nport = {port}\n')
    out = status_cli(config, {**os.environ})
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"http://127.0.0.1:{port}/status" in lines[0], out.stderr


def time_fields(v: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any], str]]:
    """(path, the dict holding it, key) of every time field in a /status answer."""
    if isinstance(v, dict):
        for k, x in v.items():
            if is_time_key(k) and not k.endswith("_epoch"):
                yield f"{path}.{k}", v, k
            else:
                yield from time_fields(x, f"{path}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from time_fields(x, f"{path}[{i}]")


async def test_status_times_are_iso_with_epoch_twins(settled: dict[str, Any], port: int) -> None:
    st = fetch_status(port)
    seen = {}
    for path, holder, key in time_fields(st):
        value, epoch = holder[key], holder.get(f"{key}_epoch", "missing")
        assert epoch != "missing", f"{path} has no {key}_epoch"
        seen[path] = value
        if value is None:
            assert epoch is None, path
            continue
        assert isinstance(value, str) and value.endswith("Z"), (path, value)
        assert isinstance(epoch, int | float) and not isinstance(epoch, bool), (path, epoch)
        parsed = datetime.fromisoformat(value)
        assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
        assert abs(parsed.timestamp() - epoch) < 0.001, path
    for want in (
        ".started_at",
        ".sources.tanks.last_ok",
        ".sources.tanks.last_error_at",
        ".uplinks.qatium.last_delivery_at",
        ".uplinks.witness.last_error_at",
        ".store.last_commit_at",
        ".clock.wall_time",
        ".clock.last_step_at",
        ".config.loaded_at",
        ".config.last_reload_at",
        ".health.bound_at",
        ".health.last_bind_error_at",
    ):
        assert want in seen, f"{want} not in /status: {sorted(seen)}"
    for path in (".started_at", ".sources.tanks.last_ok", ".uplinks.witness.last_error_at"):
        assert isinstance(seen[path], str), path
    # Durations and ages stay numbers.
    assert isinstance(st["uptime_s"], int | float)
    assert isinstance(st["uplinks"]["witness"]["retry_in_s"], int | float)
    assert isinstance(st["uplinks"]["witness"]["oldest_pending_s"], int | float)


async def test_console_token_is_sent_as_bearer(
    config: Path, port: int, daemons: list[Daemon]
) -> None:
    """With ``health.console_token`` /status wants the token: the command resolves that one
    secret (no other) and sends it."""
    text = config.read_text().replace(
        "[health]\nport = 0\n", '[health]\nport = 0\nconsole_token = { env = "FG_TEST_CONSOLE" }\n'
    )
    config.write_text(text)
    secret = "console-token-for-status-16"
    env = {"FIELDGATE_HEALTH__PORT": str(port), "FG_TEST_CONSOLE": secret}
    d = Daemon(config, env=env)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    await d.health_url()
    out = await asyncio.to_thread(status_cli, config, {**os.environ, **env})
    assert out.returncode == 0, out.stderr
    assert row(out.stdout, "qatium")[0] == "qatium"
    wrong = await asyncio.to_thread(
        status_cli, config, {**os.environ, **env, "FG_TEST_CONSOLE": "wrong-token-xxxxxxxxxx"}
    )
    assert wrong.returncode == 1 and "401" in wrong.stderr, wrong.stderr
