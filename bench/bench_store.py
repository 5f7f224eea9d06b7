"""Store benchmark: durable ingest vs raw sqlite3, memory with a large backlog, bytes per reading.

    .venv/bin/python bench/bench_store.py [--rows 1000000] [--backlog 1000000] [--dir DIR]

1. Ingest: the same N readings (Reading objects, as a source hands them over) through
   ``Store.ingest`` in batches of 1,000 and group commits until captured (``flush``), against raw
   ``sqlite3`` executemany of the same rows as prebuilt tuples, 1,000 rows per transaction, WAL,
   same synchronous level, same table. Both in this process, one after the other, best of 3.
   Bytes written to disk per captured reading come from /proc/self/io (write_bytes).
2. Memory: a fresh child process opens an empty store, and another opens a store holding
   ``--backlog`` pending readings; each leases, completes, and refreshes stats in a loop (what the
   daemon does) and reports its peak RSS. The figure that matters is the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.configbase import StoreConfig
from gateway.models import Reading
from gateway.store import _SCHEMA, Store

SERIES = [f"site.dev{i // 10}.ch{i % 10}" for i in range(100)]


def make_readings(n: int) -> list[Reading]:
    t0 = int(time.time() * 1000) - n
    return [Reading(SERIES[i % 100], t0 + i, float(i % 1000) / 10) for i in range(n)]


def write_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def raw_sqlite(path: Path, readings: list[Reading], sync: str) -> float:
    rows = [
        (i + 1, (i % 100) + 1, r.ts, r.value, 0, None, None, None) for i, r in enumerate(readings)
    ]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    conn.executescript(_SCHEMA)
    t = time.perf_counter()
    for i in range(0, len(rows), 1000):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO readings (id, series, ts, value, flags, lat, lon, alt) "
            "VALUES (?,?,?,?,?,?,?,?)",
            rows[i : i + 1000],
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t
    conn.close()
    return elapsed


async def store_ingest(path: Path, readings: list[Reading], sync: str) -> tuple[float, int]:
    store = await Store.open(StoreConfig(path=path, synchronous=sync), {"bench": SERIES})  # type: ignore[arg-type]
    writer = asyncio.create_task(store.run())
    before = write_bytes()
    t = time.perf_counter()
    for i in range(0, len(readings), 1000):
        await store.ingest(readings[i : i + 1000])
    await store.flush()
    elapsed = time.perf_counter() - t
    written = write_bytes() - before
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await store.aclose()
    return elapsed, written


def bench_ingest(n: int, workdir: Path, sync: str) -> dict[str, float]:
    readings = make_readings(n)
    raw_best = store_best = float("inf")
    written = 0
    for _ in range(3):
        for p in workdir.glob("*.db*"):
            p.unlink()
        raw_best = min(raw_best, raw_sqlite(workdir / "raw.db", readings, sync))
        el, wr = asyncio.run(store_ingest(workdir / "store.db", readings, sync))
        if el < store_best:
            store_best, written = el, wr
    return {
        "rows": n,
        "raw_rows_per_s": n / raw_best,
        "store_rows_per_s": n / store_best,
        "ratio": raw_best / store_best,
        "bytes_written_per_reading": written / n,
    }


def child_rss(db: str, cycles: int) -> None:
    """Run in a child: open the store, do the daemon's periodic work, print peak RSS in KiB."""

    async def go() -> None:
        store = await Store.open(StoreConfig(path=Path(db)), {"bench": SERIES})
        for _ in range(cycles):
            lease = await store.lease("bench", 1000)
            if lease is not None:
                # Deliver nothing (as during an outage): the backlog stays a backlog.
                store.release(lease)
            await store.refresh_stats()
            store.uplink_stats("bench")
            store.stats()
        await store.aclose()

    asyncio.run(go())
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_kib": peak}))


def bench_memory(backlog: int, workdir: Path) -> dict[str, float]:
    empty = workdir / "empty.db"
    full = workdir / "full.db"
    for p in (empty, full):
        for q in workdir.glob(p.name + "*"):
            q.unlink()

    async def fill(path: Path, n: int) -> None:
        store = await Store.open(StoreConfig(path=path), {"bench": SERIES})
        writer = asyncio.create_task(store.run())
        t0 = int(time.time() * 1000) - n
        for i in range(0, n, 10_000):
            await store.ingest(
                [Reading(SERIES[j % 100], t0 + j, float(j)) for j in range(i, min(n, i + 10_000))]
            )
        await store.flush()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.aclose()

    asyncio.run(fill(empty, 0))
    asyncio.run(fill(full, backlog))

    def run(db: Path) -> int:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(db)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return int(json.loads(out.strip().splitlines()[-1])["peak_rss_kib"])

    e, f = run(empty), run(full)
    return {
        "backlog": backlog,
        "rss_empty_mib": e / 1024,
        "rss_backlog_mib": f / 1024,
        "difference_mib": (f - e) / 1024,
        "db_bytes": full.stat().st_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--backlog", type=int, default=1_000_000)
    ap.add_argument("--dir", help="work directory on the disk to measure (default: a temp dir)")
    ap.add_argument("--child")
    args = ap.parse_args()
    if args.child:
        child_rss(args.child, cycles=200)
        return
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="fieldgate-bench-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for sync in ("full", "normal"):
            ing = bench_ingest(args.rows, workdir, sync)
            print(f"ingest   synchronous={sync.upper()}, {args.rows:,} readings, best of 3")
            raw, ours = ing["raw_rows_per_s"], ing["store_rows_per_s"]
            print(f"  raw sqlite3 executemany, 1000 rows/txn, WAL: {raw:>10,.0f} rows/s")
            print(f"  fieldgate Store.ingest + group commit:       {ours:>10,.0f} readings/s")
            print(f"  ratio store/raw: {ing['ratio']:.2f} (target >= 0.25)")
            per = ing["bytes_written_per_reading"]
            print(f"  bytes written to disk per captured reading: {per:.1f}")
        mem = bench_memory(args.backlog, workdir)
        print(f"memory   peak RSS, empty store:             {mem['rss_empty_mib']:.1f} MiB")
        print(
            f"memory   peak RSS, {mem['backlog']:,} in backlog: {mem['rss_backlog_mib']:.1f} MiB "
            f"(db {mem['db_bytes'] / 1e6:.0f} MB)"
        )
        print(f"memory   difference: {mem['difference_mib']:.1f} MiB (target <= 20)")
    finally:
        if not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
