"""One store, one writer; a healthy database is never moved aside; corruption found while running
is shown and recovered by a restart; SIGHUP never ends the daemon (issue 12). Real processes,
a real store file, a real read-only tmpfs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.__main__ import EX_STORE_UNUSABLE
from gateway.configbase import StoreConfig
from gateway.models import Reading
from gateway.sandbox.qatium import QatiumEmulator
from gateway.store import Store
from gateway.uplinks.qatium.uplink import iso_time

from .daemon import DAEMON_HEAD, Daemon
from .test_daemon import closed_port
from .test_disk_full import make_readonly, small_tmpfs

CONFIG = (
    DAEMON_HEAD
    + """
[[sources]]
name = "gen"
type = "synthetic"
interval_s = 0.05
[[sources.series]]
name = "tank1.level"

[[uplinks]]
name = "qatium"
type = "qatium"
url = "{url}/ingest"
token = {{ env = "FG_TEST_TOKEN" }}
backoff_initial_s = 60
[[uplinks.routes]]
series = "tank1.level"
asset = "Tank1"
metric = "level"
unit = "m"
"""
)
ENV = {"FG_TEST_TOKEN": "integrity-token-0815"}


def write_config(tmp: Path, db: Path, url: str | None = None) -> Path:
    """The config; its Qatium uplink points at ``url`` (an emulator) or at a closed port."""
    path = tmp / "fieldgate.toml"
    path.write_text(CONFIG.format(db=db, url=url or f"http://127.0.0.1:{closed_port()}"))
    return path


async def run_until_exit(d: Daemon, timeout: float = 60) -> int:
    await d.start()
    assert d.proc is not None
    async with asyncio.timeout(timeout):
        rc = await d.proc.wait()
    assert d._reader is not None
    await d._reader
    return rc


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
        check=False,
    )


def aside_files(db: Path) -> list[Path]:
    found = db.parent.glob(f"{db.name}.corrupt-*")
    return sorted(p for p in found if not p.name.endswith(("-wal", "-shm")))


def count_rows(db: Path) -> int:
    # immutable: a WAL database on a read-only disk cannot even be read the normal way.
    with contextlib.closing(sqlite3.connect(f"file:{db}?immutable=1", uri=True)) as raw:
        return int(raw.execute("SELECT count(*) FROM readings").fetchone()[0])


async def make_store(db: Path, n: int) -> None:
    """A store holding ``n`` readings, closed cleanly (no uplink: nothing is pruned)."""
    s = await Store.open(StoreConfig(path=db), {})
    t = asyncio.create_task(s.run(), name="store:writer")
    now = int(time.time() * 1000)
    await s.ingest([Reading("tank1.level", now - n + i, float(i)) for i in range(n)], durable=True)
    t.cancel()
    await asyncio.gather(t, return_exceptions=True)
    await s.aclose()


async def test_a_second_daemon_on_the_same_store_refuses_and_tools_read_beside(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    db = tmp_path / "fg.db"
    config = write_config(tmp_path, db)
    first = Daemon(config, env=ENV)
    daemons.append(first)
    await first.start()
    await first.wait_event("gateway_ready")
    assert first.proc is not None

    second = Daemon(config, env=ENV)
    daemons.append(second)
    assert await run_until_exit(second) == EX_STORE_UNUSABLE
    refused = next(e for e in second.events if e.get("event") == "store_unusable")
    assert str(db) in refused["error"]
    assert f"pid {first.proc.pid}" in refused["error"]
    assert not any(e.get("event") == "gateway_ready" for e in second.events)
    assert not any("Traceback" in line for line in second.raw)

    # The inspection commands read beside the running daemon.
    q = cli("queue", "--json", "-c", str(config))
    assert q.returncode == 0, q.stderr
    assert '"qatium"' in q.stdout
    dl = cli("dead-letters", "list", "qatium", "-c", str(config))
    assert dl.returncode == 0, dl.stderr
    # The first daemon is unharmed: healthy, and every reading it reports captured is there.
    assert first.proc.returncode is None
    async with httpx.AsyncClient(base_url=await first.health_url()) as client:
        assert (await client.get("/health")).status_code == 200
    assert await first.terminate() == 0
    stopped = next(e for e in first.events if e.get("event") == "gateway_stopped")
    assert stopped is not None
    assert count_rows(db) > 0
    # Once it is gone, a new one takes the store.
    third = Daemon(config, env=ENV)
    daemons.append(third)
    await third.start()
    await third.wait_event("gateway_ready")
    assert await third.terminate() == 0


async def test_a_locked_database_is_an_error_and_never_moved_aside(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    db = tmp_path / "fg.db"
    await make_store(db, 500)
    config = write_config(tmp_path, db)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the database (not our lock)
        d = Daemon(config, env=ENV)
        daemons.append(d)
        assert await run_until_exit(d) == EX_STORE_UNUSABLE
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    err = next(e for e in d.events if e.get("event") == "store_unusable")["error"]
    assert str(db) in err
    assert "another process holds the database" in err
    assert aside_files(db) == []
    assert count_rows(db) == 500


async def test_a_read_only_disk_is_a_clear_error_and_never_moved_aside(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """On a read-only tmpfs (where this process may mount); elsewhere on a directory and file
    it may not write: the same policy, EACCES instead of EROFS (never a skip)."""
    disk = tmp_path / "disk"
    with small_tmpfs(disk, 64 << 20) as mounted:
        db = disk / "fg.db"
        await make_store(db, 300)
        if mounted:
            make_readonly(disk, 64 << 20)
            cause = "read-only"
        else:
            for p in (db, disk):
                p.chmod(0o500 if p.is_dir() else 0o400)
            cause = "permission denied"
        d = Daemon(write_config(tmp_path, db), env=ENV)
        daemons.append(d)
        assert await run_until_exit(d) == EX_STORE_UNUSABLE
        err = next(e for e in d.events if e.get("event") == "store_unusable")["error"]
        assert cause in err
        assert not any("Traceback" in line for line in d.raw), d.raw[-20:]
        assert aside_files(db) == []
        assert count_rows(db) == 300
        if not mounted:
            disk.chmod(0o700)


async def test_corruption_found_while_running_is_shown_and_a_restart_salvages(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    db = tmp_path / "fg.db"
    await make_store(db, 20_000)
    # Zero pages in the middle of the readings: the header and schema still read (the file
    # was closed cleanly, so the start-up check passes), the first prune then hits them.
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(size // 2)
        f.write(b"\0" * 8192)
    config = write_config(tmp_path, db)
    d = Daemon(config, env=ENV)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    assert aside_files(db) == []
    found = await d.wait_event("store_corrupt")
    assert "malformed" in found["reason"]
    async with httpx.AsyncClient(base_url=await d.health_url()) as client:
        health = await client.get("/health")
        assert health.status_code == 503
        assert "store corrupt" in health.text
        st = (await client.get("/status")).json()
        assert "malformed" in st["store"]["corrupt"]
        assert any(e["kind"] == "corrupt" for e in st["store"]["events"])
        metrics = (await client.get("/metrics")).text
        assert "fieldgate_store_corrupt 1.0" in metrics
    # Logged once, not every maintenance pass.
    assert await d.terminate() == 0
    assert sum(1 for e in d.events if e.get("event") == "store_corrupt") == 1

    # The documented recovery: restart. The file is moved aside, what reads is salvaged.
    again = Daemon(config, env=ENV)
    daemons.append(again)
    await again.start()
    salvaged = await again.wait_event("store_salvaged")
    await again.wait_event("gateway_ready")
    assert len(aside_files(db)) == 1
    assert 0 < salvaged["readings"] < 20_000
    async with httpx.AsyncClient(base_url=await again.health_url()) as client:
        assert (await client.get("/health")).status_code == 200
        st = (await client.get("/status")).json()
        assert st["store"]["corrupt"] is None
        assert st["store"]["salvaged"]["readings"] == salvaged["readings"]
    assert await again.terminate() == 0


async def test_sighup_reloads_and_never_ends_the_daemon(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """SIGHUP is a reload (tests/integration/test_reload.py), never the default that ends the
    process unclean: an unchanged file is applied as it is."""
    d = Daemon(write_config(tmp_path, tmp_path / "fg.db"), env=ENV)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    reloaded = await d.wait_event("config_reloaded")
    assert reloaded["sources_changed"] == [] and reloaded["uplinks_changed"] == []
    assert d.proc.returncode is None
    async with httpx.AsyncClient(base_url=await d.health_url()) as client:
        assert (await client.get("/health")).status_code == 200
    assert await d.terminate() == 0


async def test_a_modbus_uint64_above_2_63_is_stored_exactly_and_the_writer_lives(
    tmp_path: Path,
) -> None:
    """A real pymodbus server serves an energy counter 0xFEDCBA9876543210; the source's
    readings go into a real store (before: OverflowError in the group commit, writer dead)."""
    from gateway.sandbox.modbus_sim import ModbusSimulator
    from gateway.sources.modbus.decode import FieldSpec
    from gateway.sources.modbus.source import ModbusSource

    from .test_modbus_source import REPO, device, make_cfg

    big = 0xFEDCBA9876543210
    specs = [
        FieldSpec("m.energy", "holding", 0, "uint64"),
        FieldSpec("m.serial", "holding", 4, "uint64", order="DCBA"),
        FieldSpec("m.temp", "holding", 8, "int16"),
    ]
    store = await Store.open(
        StoreConfig(path=tmp_path / "q.db", commit_interval_ms=10),
        {"a": ["m.energy", "m.serial", "m.temp"]},
    )
    writer = asyncio.create_task(store.run(), name="store:writer")
    committed = asyncio.Event()

    async def emit(batch: list[Reading]) -> None:
        await store.ingest(batch, durable=True)
        committed.set()

    try:
        async with ModbusSimulator({3: specs}, transport="tcp") as sim:
            sim.set_value(3, "m.energy", big)
            sim.set_value(3, "m.serial", 2**64 - 1)
            sim.set_value(3, "m.temp", -12)
            src = ModbusSource(make_cfg(sim, [device("m", 3, specs)]), REPO)
            poll = asyncio.create_task(src.run(emit), name="poll:plc")
            try:
                async with asyncio.timeout(15):
                    while store.captured_total < 9:
                        committed.clear()
                        await committed.wait()
            finally:
                poll.cancel()
                await asyncio.gather(poll, return_exceptions=True)
                await src.aclose()
        assert not writer.done()
        assert store.rejected_total == 0
        lease = await store.lease("a", 1000, live_first=False)
        assert lease is not None
        by_series: dict[str, set[object]] = {}
        for item in lease.items:
            by_series.setdefault(item.series, set()).add(item.value)
        assert by_series == {"m.energy": {big}, "m.serial": {2**64 - 1}, "m.temp": {-12}}
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.aclose()


async def test_dead_letters_replay_beside_the_running_daemon(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """``replay`` never takes the daemon's lock: it moves the dead letters to the retry queue
    in one transaction of its own, and the running daemon picks them up."""
    db = tmp_path / "fg.db"
    store = await Store.open(StoreConfig(path=db), {"qatium": ["tank1.level"]})
    writer = asyncio.create_task(store.run(), name="store:writer")
    t = int(time.time() * 1000) - 3_600_000  # an hour back: no live reading shares a time
    await store.ingest([Reading("tank1.level", t + i, float(i)) for i in range(5)], durable=True)
    lease = await store.lease("qatium", 100, live_first=False)
    assert lease is not None
    await store.complete(lease, [], {i.id: "invalid unit (test)" for i in lease.items})
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await store.aclose()

    async with QatiumEmulator(token=ENV["FG_TEST_TOKEN"], rate_limit=100_000) as qatium:
        config = write_config(tmp_path, db, qatium.url)
        d = Daemon(config, env=ENV)
        daemons.append(d)
        await d.start()
        await d.wait_event("gateway_ready")
        listed = cli("dead-letters", "list", "qatium", "-c", str(config))
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("invalid unit (test)") == 5
        replay = cli("dead-letters", "replay", "qatium", "-c", str(config))
        assert replay.returncode == 0, replay.stderr
        assert replay.stdout.startswith("5 dead letters")
        # The running daemon finds the five in its retry queue and delivers them (its route is
        # valid: the dead-letter reason was made up), once each, beside the live readings.
        replayed = {iso_time(t + i) for i in range(5)}

        def times() -> list[str]:
            return [str(r["time"]) for r in qatium.rows if str(r["time"]) in replayed]

        await qatium.wait_for(lambda: set(times()) == replayed, timeout=20)
        # One worker: its next request comes only after the lease that held them was completed.
        answered = qatium.total_requests
        await qatium.wait_for(lambda: qatium.total_requests > answered, timeout=20)
        assert await d.terminate() == 0
        assert sorted(times()) == sorted(replayed)
    with contextlib.closing(sqlite3.connect(db)) as raw:
        assert raw.execute("SELECT count(*) FROM retry").fetchone()[0] == 0
        assert raw.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 0
