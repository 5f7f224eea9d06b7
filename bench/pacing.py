"""Quota pacing: how old a reading is when a rate-limited service receives it.

    .venv/bin/python bench/pacing.py [--seconds 180] [--warmup 20] [--pacing even|burst|both]
        [--out FILE.json]

For each pacing mode, one real ``fieldgate run`` process polls a synthetic source every second
(4 series) and another every 2 s (1 series), and sends the readings to two stand-ins over
loopback HTTP, each at its documented or default quota: Qatium Ingest (20 requests a minute,
enforced by the emulator with 429; the 4 series) and Datacooee (60 a minute, enforced the same
way; the 2 s series, as it takes one reading per request). The harness watches the emulators:
after every request they answer it stamps the readings that request brought with the time it
arrived, so a reading's **age at delivery** is that arrival time minus the reading's own
timestamp (the poll).
Readings stamped during ``--warmup`` are left out. It also reports the request count, the longest
gap between two accepted requests and the number of 429s.

``even`` (the default) spaces requests ``period / limit`` apart and leases only when a request
may go, so each carries what became pending meanwhile; ``burst`` is the previous behaviour (the
sliding window only: a minute's quota spent in its first seconds, then silence).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.sandbox.datacooee import DatacooeeEmulator  # noqa: E402
from gateway.sandbox.emulator import Emulator  # noqa: E402
from gateway.sandbox.qatium import QatiumEmulator  # noqa: E402

QATIUM_TOKEN = "bench-qatium-token"
DATACOOEE_KEY = "bench-datacooee-key"
SERIES = ["tank1.level", "pipe1.flow", "junction7.pressure", "pump2.speed"]


def config(qatium: str, datacooee: str, store: Path, pacing: str) -> str:
    series = "".join(
        f'  [[sources.series]]\n  name = "{s}"\n  waveform = "random_walk"\n'
        f"  min = 1.0\n  max = 9.0\n"
        for s in SERIES
    )
    q_routes = "".join(
        f'  [[uplinks.routes]]\n  series = "{s}"\n  asset = "A{i}"\n  metric = "level"\n'
        f'  unit = "m"\n'
        for i, s in enumerate(SERIES)
    )
    # Datacooee takes one reading per request: one series every 2 s against 60 a minute (one
    # every second would be the whole quota less the limiter's margin: a backlog that grows).
    d_routes = '  [[uplinks.routes]]\n  series = "river.temp"\n  input_pk = "senriver"\n'
    return f"""
[health]
enabled = false
[log]
level = "warning"
[clock]
trust = "always"
[store]
path = "{store}"

[[sources]]
name = "works"
type = "synthetic"
interval_s = 1.0
seed = 3
{series}
[[sources]]
name = "river"
type = "synthetic"
interval_s = 2.0
seed = 4
  [[sources.series]]
  name = "river.temp"
  waveform = "random_walk"
  min = 1.0
  max = 9.0

[[uplinks]]
name = "qatium"
type = "qatium"
url = "{qatium}/ingest"
token = {{ env = "BENCH_QATIUM_TOKEN" }}
pacing = "{pacing}"
{q_routes}
[[uplinks]]
name = "datacooee"
type = "datacooee"
url = "{datacooee}"
organization_id = "bench-org"
api_key = {{ env = "BENCH_DATACOOEE_KEY" }}
pacing = "{pacing}"
{d_routes}"""


def _ms(text: object) -> int:
    return int(datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp() * 1000)


async def run_one(pacing: str, seconds: float, warmup: float) -> dict[str, Any]:
    qatium = QatiumEmulator(token=QATIUM_TOKEN, rate_limit=20, rate_period_s=60)
    datacooee = DatacooeeEmulator("bench-org", DATACOOEE_KEY, rate_limit=60, rate_period_s=60)
    async with qatium, datacooee:
        tmp = Path(tempfile.mkdtemp(prefix="fg-pacing-"))
        cfg = tmp / "pacing.toml"
        cfg.write_text(config(qatium.url, datacooee.url, tmp / "q.db", pacing), encoding="utf-8")
        env = {
            **os.environ,
            "BENCH_QATIUM_TOKEN": QATIUM_TOKEN,
            "BENCH_DATACOOEE_KEY": DATACOOEE_KEY,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "run", "--config", str(cfg), env=env, cwd=ROOT
        )
        start = time.time()
        seen = {"qatium": 0, "datacooee": 0}
        ages: dict[str, list[tuple[int, float]]] = {"qatium": [], "datacooee": []}
        views: dict[str, tuple[Emulator, Callable[[], list[Any]]]] = {
            "qatium": (qatium, lambda: [r.get("time") for r in qatium.rows]),
            "datacooee": (datacooee, lambda: [d.timestamp for d in datacooee.accepted]),
        }

        async def watch(name: str) -> None:
            emu, texts = views[name]
            while True:
                # Re-checked after every request the stand-in answers.
                with contextlib.suppress(TimeoutError):
                    await emu.wait_for(lambda: len(texts()) > seen[name], timeout=5)
                now = time.time()
                got = texts()
                for text in got[seen[name] :]:
                    ts = _ms(text)
                    ages[name].append((ts, now - ts / 1000))
                seen[name] = len(got)

        watchers = [asyncio.create_task(watch(n)) for n in views]
        try:
            # The measurement window itself (not a synchronisation).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=seconds + warmup)
            if proc.returncode is not None:
                raise SystemExit(f"fieldgate exited early with {proc.returncode}")
        finally:
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        cutoff = (start + warmup) * 1000
        end = (start + warmup + seconds) * 1000 - 10_000  # late enough to have been sent
        out: dict[str, Any] = {"pacing": pacing, "seconds": seconds}
        for name, emu, limit in (("qatium", qatium, 20), ("datacooee", datacooee, 60)):
            a = sorted(age for ts, age in ages[name] if cutoff <= ts <= end)
            ok = [
                r.at
                for r in emu.requests
                if r.status is not None and r.status < 300 and r.method == "POST"
            ]
            gaps = [b - x for x, b in itertools.pairwise(ok)]
            out[name] = {
                "quota_per_min": limit,
                "pacing_interval_s": round(60 / limit, 2),
                "readings": len(a),
                "age_p50_s": round(statistics.median(a), 2) if a else None,
                "age_p95_s": round(a[int(0.95 * (len(a) - 1))], 2) if a else None,
                "age_max_s": round(a[-1], 2) if a else None,
                "requests_ok": len(ok),
                "requests_429": sum(1 for r in emu.requests if r.status == 429),
                "longest_gap_s": round(max(gaps), 2) if gaps else None,
            }
        return out


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    modes = ["even", "burst"] if args.pacing == "both" else [args.pacing]
    results = []
    for mode in modes:
        r = await run_one(mode, args.seconds, args.warmup)
        results.append(r)
        print(json.dumps(r, indent=2), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--pacing", choices=["even", "burst", "both"], default="both")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
