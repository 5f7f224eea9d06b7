"""Power cut: the store survives a kill at any point of a transaction; a torn or corrupt file is
moved aside and the gateway runs.

The store runs WAL with ``synchronous = FULL`` (README "Durability"): a commit returns only after
its WAL frames are fsynced, and a transaction that was being written when the power went is a
WAL tail without a commit frame, which SQLite ignores on recovery. SIGKILL stops the process
anywhere, including in the middle of writing a large transaction's frames; what it cannot do is
lose data the kernel already has, so the file-level damage of a real power cut (a torn last
write, a garbled page) is made by hand on the killed store's files.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest

from ..integration.daemon import Daemon
from .soakconfig import clock_section

#: Readings per tick: one commit holds every tick buffered in ``commit_interval_ms``.
SERIES = 1000

CONFIG = """
[store]
path = "{db}"
commit_interval_ms = 1000
commit_max_rows = 1000000

[health]
port = 0

[log]
format = "json"
level = "info"
{clock}
[[sources]]
name = "bulk"
type = "synthetic"
interval_s = 0.02
replicas = {series}
  [[sources.series]]
  name = "bulk"
  waveform = "random_walk"
"""


def write_config(tmp_path: Path, db: Path) -> Path:
    path = tmp_path / "fieldgate.toml"
    path.write_text(CONFIG.format(db=db, clock=clock_section(), series=SERIES))
    return path


def wal_frames(wal: Path) -> tuple[int, int]:
    """(frames of committed transactions, frames after the last commit frame) in the WAL's
    current generation: a non-zero second number is a transaction cut off mid-write."""
    try:
        data = wal.read_bytes()
    except FileNotFoundError:
        return 0, 0
    if len(data) < 32:
        return 0, 0
    page_size = int.from_bytes(data[8:12], "big")
    salt = data[16:24]
    size = 24 + page_size
    committed = pending = 0
    off = 32
    while off + 24 <= len(data):
        header = data[off : off + 24]
        if header[8:16] != salt:
            break  # a frame of an earlier generation: the log ends here
        if off + size > len(data):
            pending += 1  # a frame whose page was not all written
            break
        if int.from_bytes(header[4:8], "big"):  # commit frame: database size after commit
            committed += pending + 1
            pending = 0
        else:
            pending += 1
        off += size
    return committed, pending


def tear_wal(wal: Path) -> None:
    """Cut the WAL in the middle of the first frame after the last commit (the write the power
    cut interrupted), or of the last committed frame when nothing follows it."""
    committed, pending = wal_frames(wal)
    assert committed or pending, "the killed store's WAL holds no frame to tear"
    data = wal.read_bytes()
    page_size = int.from_bytes(data[8:12], "big")
    cut = 32 + committed * (24 + page_size) + 24 + page_size // 2
    if cut >= len(data):
        cut = 32 + (committed - 1) * (24 + page_size) + 100
    wal.write_bytes(data[:cut])


def damage_main_file(db: Path, damage: str) -> None:
    """Checkpoint the WAL into the main file, then cut that short or overwrite a page in its
    middle with a pattern no SQLite page starts with."""
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the readings now live in the file
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()
    middle = db.stat().st_size // 2 // page_size * page_size
    with db.open("r+b") as f:
        if damage == "truncated":
            f.truncate(middle + page_size // 3)
        else:
            f.seek(middle)
            f.write(b"\xa5" * page_size)


def aside_exists(path: str) -> bool:
    return Path(path).exists()


def soundness(db: Path, *, salvaged: bool = False) -> tuple[str, int, int]:
    """(integrity_check, readings, ticks with a partial set of series) after recovery. Ids
    run from 1 without a gap, except in a store salvaged from a corrupt file (which keeps the
    ids of what it could read and none of what it could not)."""
    conn = sqlite3.connect(db)
    try:
        check = conn.execute("PRAGMA integrity_check").fetchone()[0]
        count, lo, hi = conn.execute("SELECT count(*), min(id), max(id) FROM readings").fetchone()
        if not salvaged:
            assert count == 0 or (lo, hi - lo + 1) == (1, count), "ids not contiguous from 1"
        torn = conn.execute(
            "SELECT count(*) FROM (SELECT ts FROM readings GROUP BY ts HAVING count(*) != ?)",
            (SERIES,),
        ).fetchone()[0]
    finally:
        conn.close()
    return str(check), int(count), int(torn)


@pytest.mark.slow
async def test_sigkill_mid_commit_loses_no_committed_reading(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Kill while a large group commit is being written, again and again: every time the store
    opens with integrity_check ok, every committed transaction is there whole (no tick with a
    partial set of series), no earlier reading is gone, and the next start runs without
    moving the file aside."""
    db = tmp_path / "fg.db"
    wal = Path(f"{db}-wal")
    config = write_config(tmp_path, db)
    rng = random.Random(7)
    # A first run interns the series and commits readings, so that later WAL writes are group
    # commits of readings (interning writes the WAL too, in many small transactions).
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    await _readings_committed(db, above=0)
    assert await d.kill() == -9
    before = soundness(db)[1]
    kills = 8
    mid_commit = 0
    for cycle in range(kills):
        d = Daemon(config)
        daemons.append(d)
        await d.start()
        await d.wait_event("gateway_ready")
        assert not any(e.get("event") == "store_moved_aside" for e in d.events), d.raw[-5:]
        # Let a random number of group commits go by, then kill as soon as the WAL is written
        # again: the kill lands while a transaction of ~50,000 rows is being written (its
        # frames go out over tens of milliseconds), or just after it.
        seen = before
        for _ in range(rng.randint(0, 2)):
            seen = await _readings_committed(db, above=seen)
        await _wal_written(wal, times=1)
        assert await d.kill() == -9
        _, pending = wal_frames(wal)
        mid_commit += pending > 0
        check, count, torn = soundness(db)
        assert check == "ok", f"cycle {cycle}: {check}"
        assert torn == 0, f"cycle {cycle}: {torn} ticks committed in part"
        assert count >= before, f"cycle {cycle}: {before - count} committed readings gone"
        before = count
    print(
        f"power cut: {kills} kills, {mid_commit} while a transaction was half-written "
        f"(WAL frames after the last commit frame), {before} readings kept whole"
    )
    # The point of the test: kills that cut a transaction off half-written.
    assert mid_commit >= 1


async def _readings_committed(db: Path, *, above: int) -> int:
    """Return the highest reading id once it is above ``above`` (a commit happened), polled
    through a read-only connection."""
    async with asyncio.timeout(60):
        while True:
            await asyncio.sleep(0.05)
            try:
                conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                try:
                    top = conn.execute("SELECT coalesce(max(id), 0) FROM readings").fetchone()[0]
                finally:
                    conn.close()
            except sqlite3.OperationalError:
                continue  # not created yet
            if top > above:
                return int(top)


async def _wal_written(wal: Path, *, times: int) -> None:
    """Return once the WAL's modification time has changed ``times`` times (polled: the file
    is the only witness of a write in progress in another process)."""

    def stamp() -> int:
        try:
            return wal.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    last = stamp()
    seen = 0
    async with asyncio.timeout(30):
        while seen < times:
            await asyncio.sleep(0.001)
            now = stamp()
            if now != last:
                seen += 1
                last = now


async def _killed_store(tmp_path: Path, daemons: list[Daemon]) -> tuple[Path, Path]:
    """A store with a few commits, its daemon killed mid-write: (config, db)."""
    db = tmp_path / "fg.db"
    config = write_config(tmp_path, db)
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    await _readings_committed(db, above=0)
    await _wal_written(Path(f"{db}-wal"), times=1)
    assert await d.kill() == -9
    return config, db


async def _runs(
    config: Path, daemons: list[Daemon], *, salvaged: bool = False
) -> list[dict[str, object]]:
    """Start the gateway on the damaged store, wait until it is ready and has committed new
    readings, stop it; returns its log events."""
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    db = Path(str(config.parent / "fg.db"))
    await _wal_written(Path(f"{db}-wal"), times=2)
    assert await d.terminate() == 0
    check, count, torn = soundness(db, salvaged=salvaged)
    assert check == "ok"
    # A page lost to the damage may have held part of a tick: only a salvaged store may show it.
    assert salvaged or torn == 0
    assert count > 0
    return d.events


async def test_torn_wal_tail_is_ignored(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The last WAL write torn in the middle of a frame (power lost during the write): the
    store opens without being moved aside and keeps every transaction before the torn one."""
    config, db = await _killed_store(tmp_path, daemons)
    tear_wal(Path(f"{db}-wal"))
    events = await _runs(config, daemons)
    assert not any(e.get("event") == "store_moved_aside" for e in events)


@pytest.mark.parametrize("damage", ["truncated", "garbled_page"])
async def test_corrupt_main_file_is_moved_aside_and_the_gateway_runs(
    tmp_path: Path, daemons: list[Daemon], damage: str
) -> None:
    """A main database file cut short, or with a page overwritten (a torn write that the WAL
    could not cover): the next start moves it aside, starts a fresh store and captures again."""
    config, db = await _killed_store(tmp_path, daemons)
    damage_main_file(db, damage)
    events = await _runs(config, daemons, salvaged=True)
    moved = [e for e in events if e.get("event") == "store_moved_aside"]
    assert moved, "the damaged file was used as it was"
    assert aside_exists(str(moved[0]["moved_to"]))
    # What still read was carried over (tests/test_store.py checks ids and values one by one):
    # a page in the middle garbled or the second half cut off leaves a good part readable.
    (got,) = [e for e in events if e.get("event") == "store_salvaged"]
    assert isinstance(got["readings"], int) and got["readings"] > 1000
