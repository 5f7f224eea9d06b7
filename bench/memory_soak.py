"""Memory: a 24-hour-equivalent accelerated run of the daemon with every uplink delivering, its RSS
sampled with psutil; prints first/last/max RSS and the slope.

    .venv/bin/python bench/memory_soak.py [--minutes 10] [--site-rate 10] [--hours 24]

A Pi site is taken to capture ``--site-rate`` readings per second (default 10: e.g. 100 series
every 10 s), i.e. 864,000 readings a day. The run pushes ``--hours`` of that through
``fieldgate run`` in ``--minutes`` of wall time: the synthetic source runs at the accelerated
rate (60 series; 1,440 readings/s for the defaults), next to the soak's other sources (a 5 Hz
source for Datacooee, a past-dated serial logger for Vanda), against all five emulators and a
real mosquitto (the stand of tests/soak/stand.py), with a fault every ``--fault-mean`` seconds
(0: none). No kills: one process, so its RSS is one curve. The emulators' records are counted
and dropped as the run goes, so the benchmark process itself stays small.

RSS is sampled every ``--every`` seconds from READY on; the slope is a least-squares fit over the
samples after ``--warmup`` seconds (start-up allocations, caches filling), given per hour of wall
time and per simulated day, and again over the second half of the run alone (growth that is
still going on at the end, rather than a working set that filled up and stayed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the venv (types-psutil)
import structlog

from tests.integration.daemon import Daemon
from tests.soak.soakconfig import TOKEN_ENV, UPLINKS, WAVEFORMS, SoakPlan, render
from tests.soak.stand import Stand

SERIES_REPLICAS = 12  # x 5 waveforms = 60 fast series


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    if n < 2:
        return math.nan
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else math.nan


async def trim(stand: Stand, delivered: Counter[str]) -> None:
    """Count what the emulators recorded and forget it, every second (the run's own memory)."""
    while True:
        await asyncio.sleep(1.0)
        q = stand.qatium
        delivered["qatium rows"] += len(q.rows)
        q.rows.clear()
        q.jobs.clear()  # synchronous jobs: final on ingest, never polled
        for _, payload in stand.broker.stored:
            value = json.loads(payload)["value"]
            delivered["energydata mqtt values"] += len(value) if isinstance(value, dict) else 1
        stand.broker.stored.clear()
        delivered["datacooee uploads"] += len(stand.datacooee.accepted)
        stand.datacooee.accepted.clear()
        delivered["nilu packets"] += len(stand.nilu.packets)
        stand.nilu.packets.clear()
        imp = stand.importer
        for job_id in [i for i, j in imp.imports.items() if j.status in ("done", "failed")]:
            delivered["energydata imported values"] += len(imp.imports.pop(job_id).rows)
        imp.values.clear()


async def status(client: httpx.AsyncClient) -> dict[str, Any]:
    return dict((await client.get("/status")).json())


async def main(args: argparse.Namespace) -> int:
    duration = args.minutes * 60
    total = args.site_rate * args.hours * 3600
    fast_hz = total / duration / (len(WAVEFORMS) * SERIES_REPLICAS)
    plan = SoakPlan(
        kills=0,
        fast_replicas=SERIES_REPLICAS,
        fast_hz=fast_hz,
        fault_mean_s=args.fault_mean,
        drain_every=0,
    )
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fg-mem-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"memory soak: {args.hours:g} h of a {args.site_rate:g} readings/s site "
        f"({total:,.0f} readings) in {args.minutes:g} min: {len(plan.fast_series)} series at "
        f"{fast_hz:.1f} Hz = {total / duration:,.0f} readings/s; workdir {workdir}",
        flush=True,
    )
    samples: list[tuple[float, float]] = []
    delivered: Counter[str] = Counter()
    async with Stand(workdir, plan) as stand:
        config = workdir / "fieldgate.toml"
        config.write_text(render(plan, stand.endpoints, workdir / "fg.db"))
        stand.start_chaos()
        trimmer = asyncio.create_task(trim(stand, delivered), name="bench:trim")
        d = Daemon(config, env=TOKEN_ENV)
        try:
            await d.start()
            await d.wait_event("gateway_ready", timeout=60)
            assert d.proc is not None
            proc = psutil.Process(d.proc.pid)
            t0 = time.monotonic()
            next_report = 0.0
            async with httpx.AsyncClient(base_url=await d.health_url(), timeout=10) as client:
                while (t := time.monotonic() - t0) < duration:
                    samples.append((t, proc.memory_info().rss / 2**20))
                    if t >= next_report:
                        st = await status(client)
                        backlog = {n: st["uplinks"][n]["backlog"] for n in UPLINKS}
                        print(
                            f"t={t:5.0f}s RSS {samples[-1][1]:6.1f} MiB  captured "
                            f"{st['store']['captured_total']:>9,}  stored "
                            f"{st['store']['readings_stored']:>7,}  backlog {backlog}",
                            flush=True,
                        )
                        next_report += args.report_every
                    await asyncio.sleep(args.every)
                st = await status(client)
            await stand.calm()
            rc = await d.terminate()
        finally:
            trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimmer
            await d.aclose()
    warm = [(t, m) for t, m in samples if t >= args.warmup]
    k = slope(warm)
    rss = [m for _, m in samples]
    captured = int(st["store"]["captured_total"])
    print()
    print(
        f"readings captured: {captured:,} in {duration:.0f} s "
        f"= {captured / args.site_rate / 3600:.1f} h of the site's rate"
    )
    print(
        "delivered (emulator side): "
        + ", ".join(f"{k2} {v:,}" for k2, v in sorted(delivered.items()))
    )
    print(
        "per uplink (daemon side): "
        + ", ".join(
            f"{n} delivered {st['uplinks'][n]['delivered']:,} backlog {st['uplinks'][n]['backlog']}"
            for n in UPLINKS
        )
    )
    print(f"faults injected: {sum(stand.chaos_counts.values())}; daemon exit code {rc}")
    print(
        f"daemon RSS ({len(rss)} samples every {args.every:g} s): first {rss[0]:.1f} MiB, "
        f"last {rss[-1]:.1f} MiB, max {max(rss):.1f} MiB, min after warm-up "
        f"{min(m for _, m in warm):.1f} MiB"
    )
    print(
        f"slope after {args.warmup:g} s warm-up: {k * 3600:+.2f} MiB per hour of wall time = "
        f"{k * duration:+.2f} MiB per simulated {args.hours:g} h"
    )
    half = slope([(t, m) for t, m in samples if t >= duration / 2])
    late = [m for t, m in samples if t >= duration / 2]
    print(
        f"second half only ({len(late)} samples, RSS {min(late):.1f}-{max(late):.1f} MiB): "
        f"{half * 3600:+.2f} MiB per hour of wall time = {half * duration / 2:+.2f} MiB over "
        f"its simulated {args.hours / 2:g} h"
    )
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/memory_soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="wall time (default 10)")
    p.add_argument("--site-rate", type=float, default=10.0, help="readings/s of the site")
    p.add_argument("--hours", type=float, default=24.0, help="hours of the site to simulate")
    p.add_argument(
        "--fault-mean",
        type=float,
        default=5.0,
        help="mean seconds between injected faults (0: none)",
    )
    p.add_argument("--every", type=float, default=2.0, help="RSS sample interval, seconds")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the slope")
    p.add_argument("--report-every", type=float, default=60.0, help="progress line interval")
    p.add_argument("--workdir", help="keep everything here (default: a new temporary directory)")
    return p.parse_args(argv)


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sys.exit(asyncio.run(main(parse())))
