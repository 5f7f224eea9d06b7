"""Disk full: the real store and its writer under a high ingest rate, on a disk that runs out.

The store sits on a small tmpfs mounted for the test, so SQLite gets a real ENOSPC
("database or disk is full"). The documented policy (README "Bounded", DESIGN "The store"): the
oldest readings are evicted, counted per uplink, logged and shown; the process stays up; nothing
is dropped without being counted; once space returns, commits succeed again. An uplink that never
takes anything ("witness") holds every captured reading, so at any time what was produced is
exactly what is stored, plus what was evicted, plus what is still buffered.

Mounting needs CAP_SYS_ADMIN. Where the kernel refuses it (EPERM, EACCES: an unprivileged CI),
the ENOSPC test runs the same policy through its other trigger instead, a quota far below the
data; that scenario also runs on its own everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.config import StoreConfig
from gateway.models import Reading
from gateway.store import Store

MiB = 1 << 20
SERIES = [f"plant.s{i}" for i in range(8)]
WITNESS = "witness"
#: The small disk, and what it grows to when "space returns". Small, yet several times the 4 MiB
#: a WAL reaches before its checkpoint (plus any reserve the store keeps for a full disk), so
#: running full is the database's doing, not the WAL's alone.
SMALL, LARGE = 32 * MiB, 128 * MiB

# ----------------------------------------------------------------------------------------------
# A tmpfs of our own, through the mount(2) and umount2(2) calls (errno, not a CLI's message,
# tells "not allowed here" from a real failure).

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MS_REMOUNT = 32
MS_RDONLY = 1
MNT_DETACH = 2
NOT_ALLOWED = {errno.EPERM, errno.EACCES}


def _mount(target: Path, size: int, flags: int = 0) -> None:
    opts = f"size={size},mode=0700".encode()
    if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", flags, opts) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target}: {os.strerror(err)}")


def resize(target: Path, size: int) -> None:
    _mount(target, size, MS_REMOUNT)


def make_readonly(target: Path, size: int) -> None:
    """Remount the tmpfs on ``target`` read-only (EROFS for every write from now on)."""
    _mount(target, size, MS_REMOUNT | MS_RDONLY)


def _unmount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), 0) != 0:
        err = ctypes.get_errno()
        # Something still holds a file open (a failed test's connection): detach it anyway, so
        # no mount outlives the test; the kernel frees it when the last file closes.
        if err != errno.EBUSY or _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


@contextlib.contextmanager
def small_tmpfs(target: Path, size: int) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` bytes on ``target``; yields False (nothing mounted) when this
    process may not mount. Unmounted on the way out, whatever happened."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        _mount(target, size)
    except OSError as exc:
        if exc.errno in NOT_ALLOWED:
            yield False
            return
        raise
    try:
        yield True
    finally:
        _unmount(target)


# ----------------------------------------------------------------------------------------------
# Harness: the store with its writer task, a producer as fast as the store lets it, all logs.


class WriterDied(AssertionError):
    """The store's writer task ended: the process would be down."""


class Producer:
    """Ingests batches of readings, ``pause`` seconds apart (0: as fast as back-pressure
    allows); counts what was handed over (a reading counts once ``ingest`` returned for it: it
    is then buffered or captured)."""

    def __init__(self, store: Store, batch: int = 1000, pause: float = 0.0) -> None:
        self.store, self.batch, self.pause = store, batch, pause
        self.produced = 0
        self._ts = int(time.time() * 1000) - 3_600_000
        self.task = asyncio.create_task(self._run(), name="producer")

    async def _run(self) -> None:
        while True:
            rs = [
                Reading(SERIES[i % len(SERIES)], self._ts + i, float(i % 997))
                for i in range(self.batch)
            ]
            self._ts += self.batch
            await self.store.ingest(rs)
            self.produced += len(rs)
            await asyncio.sleep(self.pause)  # at least a loop turn for the writer and the test

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@contextlib.contextmanager
def every_log_event() -> Iterator[list[MutableMapping[str, Any]]]:
    """Capture log events at every level, whatever level an earlier test set up."""
    before = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as events:
            yield events
    finally:
        structlog.configure(**before)


@contextlib.asynccontextmanager
async def running_store(cfg: StoreConfig) -> AsyncIterator[tuple[Store, asyncio.Task[None]]]:
    store = await Store.open(cfg, {WITNESS: SERIES})
    writer = asyncio.create_task(store.run(), name="store:writer")
    try:
        yield store, writer
    finally:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.aclose()


async def until(
    store: Store,
    writer: asyncio.Task[None],
    predicate: Callable[[], bool],
    what: str,
    timeout: float = 90,
) -> None:
    """Wait (re-checking after every commit, at least every 50 ms) until ``predicate`` holds;
    the writer must stay up all along."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                if writer.done():
                    exc = None if writer.cancelled() else writer.exception()
                    raise WriterDied(f"store writer ended ({exc!r}) while waiting for {what}")
                await store.wait_for_data(0.05)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout} s: {store.stats()}") from None


def rows_on_disk(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM readings").fetchone()[0])


def evictions(store: Store, reason: str) -> list[dict[str, Any]]:
    return [
        e
        for e in store.stats()["events"]
        if e["kind"] == "evicted" and e["detail"].startswith(f"{reason}:")
    ]


async def settle(store: Store, producer: Producer) -> None:
    """Stop producing and commit what is buffered (the disk has room: eviction made it)."""
    await producer.stop()
    async with asyncio.timeout(60):
        await store.flush()


def assert_nothing_lost_uncounted(store: Store, producer: Producer, db: Path) -> None:
    st = store.stats()
    evicted = store.uplink_stats(WITNESS)["evicted"]
    # Everything handed to the store was captured or is still buffered ...
    assert producer.produced == st["captured_total"] + st["buffered"]
    # ... and everything captured is still there for the witness, or was evicted and counted.
    assert rows_on_disk(db) + evicted == st["captured_total"]
    assert st["evicted_total"] == evicted
    assert store.uplink_stats(WITNESS)["backlog"] == st["captured_total"] - evicted


# ----------------------------------------------------------------------------------------------


#: 1000 readings every 20 ms, 50,000 a second: a high rate the writer still keeps up with on a
#: loaded CI machine (one that outruns the commits: test_maintenance_runs_while_...).
KEEPS_UP_PAUSE = 0.02


async def quota_far_below_the_data(directory: Path) -> None:
    """The policy through the quota: 1 MiB (the smallest allowed) against tens of MiB."""
    cfg = StoreConfig(
        path=directory / "quota.db",
        quota_bytes=MiB,
        commit_interval_ms=20,
        commit_max_rows=5000,
        buffer_max_rows=20_000,
    )
    with every_log_event() as events:
        async with running_store(cfg) as (store, writer):
            producer = Producer(store, batch=1000, pause=KEEPS_UP_PAUSE)
            try:
                # Several rounds of maintenance (every 2 s) must each find the quota exceeded.
                await until(
                    store,
                    writer,
                    lambda: len(evictions(store, "quota")) >= 3,
                    "three quota evictions",
                )
                await until(
                    store,
                    writer,
                    lambda: store.captured_total > 300_000,
                    "ten times the quota captured",
                )
            finally:
                await settle(store, producer)
            await store.maintain()
            assert store.bytes_used <= cfg.quota_bytes
            assert store.last_commit_error is None and store.writable()
            assert_nothing_lost_uncounted(store, producer, cfg.path)
            stats = store.uplink_stats(WITNESS)
            assert stats["evicted"] > 0
    logged = [e for e in events if e["event"] == "store_evicted"]
    assert logged and all(e["reason"] == "quota" and e["per_uplink"][WITNESS] > 0 for e in logged)
    assert sum(e["readings"] for e in logged) == stats["evicted"]


async def test_a_quota_far_below_the_data_evicts_the_oldest_counted_and_shown(
    tmp_path: Path,
) -> None:
    await quota_far_below_the_data(tmp_path)


class MaintenanceStarved(AssertionError):
    """The writer never got to its maintenance (quota, retention, pruning, stats)."""


async def test_maintenance_runs_while_ingest_outpaces_commits(tmp_path: Path) -> None:
    cfg = StoreConfig(
        path=tmp_path / "busy.db",
        quota_bytes=MiB,
        commit_interval_ms=20,
        commit_max_rows=5000,
        buffer_max_rows=20_000,
    )
    async with running_store(cfg) as (store, writer):
        producer = Producer(store)  # never pauses: the buffer is refilled during each commit
        try:
            # Maintenance is due every 2 s; five rounds' time to see the quota enforced once.
            await until(store, writer, lambda: store.captured_total > 100_000, "ingest")
            try:
                await until(
                    store,
                    writer,
                    lambda: bool(evictions(store, "quota")),
                    "quota eviction",
                    timeout=10,
                )
            except WriterDied:
                raise
            except AssertionError as exc:
                raise MaintenanceStarved(str(exc)[:300]) from None
        finally:
            await settle(store, producer)
        assert_nothing_lost_uncounted(store, producer, cfg.path)


async def test_enospc_on_a_small_disk_evicts_keeps_running_and_recovers(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    disk = tmp_path / "disk"
    with small_tmpfs(disk, SMALL) as mounted:
        if not mounted:
            # No CAP_SYS_ADMIN here: the same policy through the quota (never a skip).
            await quota_far_below_the_data(tmp_path)
            return
        cfg = StoreConfig(
            path=disk / "fg.db", commit_interval_ms=20, commit_max_rows=5000, buffer_max_rows=20_000
        )
        with every_log_event() as events:
            async with running_store(cfg) as (store, writer):
                producer = Producer(store)
                try:
                    await enospc_then_recovery(store, writer, producer, disk)
                finally:
                    # Space returns before anything else: the store can close cleanly even
                    # when the test failed on a full disk.
                    resize(disk, LARGE)
                    await producer.stop()
        failed = [e for e in events if e["event"] == "store_commit_failed"]
        assert failed and "full" in failed[0]["error"]
        evicted = [e for e in events if e["event"] == "store_evicted"]
        assert evicted and all(e["reason"] == "disk_full" for e in evicted)
        # The failure was logged before the first eviction for space.
        assert events.index(failed[0]) < events.index(evicted[0])


async def enospc_then_recovery(
    store: Store, writer: asyncio.Task[None], producer: Producer, disk: Path
) -> None:
    def disk_full() -> bool:
        return "full" in (store.last_commit_error or "")

    # 1. The store fills the disk: a group commit fails with ENOSPC; readings stay buffered.
    await until(store, writer, disk_full, "commit failure for a full disk")
    assert not store.writable()  # /health says so, with the reason
    captured_when_full = store.captured_total
    # 2. The oldest readings are evicted for space, counted for the uplink, shown in stats().
    await until(
        store, writer, lambda: store.uplink_stats(WITNESS)["evicted"] > 0, "eviction for space"
    )
    assert evictions(store, "disk_full")
    assert store.stats()["evicted_total"] == store.uplink_stats(WITNESS)["evicted"]
    # 3. Ingest goes on, on the same small disk: commits succeed again, well past what filled
    #    it (several rounds of running full and evicting).
    await until(
        store,
        writer,
        lambda: (
            store.captured_total >= captured_when_full + 100_000 and store.last_commit_error is None
        ),
        "ingest after the eviction",
    )
    # 4. Nothing was dropped without being counted.
    await settle(store, producer)
    assert_nothing_lost_uncounted(store, producer, store.path)
    # 5. Space returns: commits succeed with room to spare and the store reports no error.
    resize(disk, LARGE)
    more = [Reading(SERIES[0], int(time.time() * 1000) + i, float(i)) for i in range(50_000)]
    async with asyncio.timeout(60):
        await store.ingest(more, durable=True)
    assert store.last_commit_error is None and store.writable()
    assert store.stats()["free_disk_bytes"] > SMALL
    producer.produced += len(more)
    assert_nothing_lost_uncounted(store, producer, store.path)
    assert not writer.done()
