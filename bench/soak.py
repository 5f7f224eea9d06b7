"""The long soak: many SIGKILLs of ``fieldgate run`` against all five uplinks while the services
fail at random; prints kills survived, readings lost (must be 0), duplicates per uplink and the
daemon's RSS over time.

    .venv/bin/python bench/soak.py [--kills 50] [--seed 1] [--drain-every 10] [--minutes 0]

Everything runs on this machine: the five service emulators, a real mosquitto behind the
Energydata front, a serial logger on a pty, the daemon as a child process. The harness is
tests/soak/harness.py (the CI test tests/soak/test_soak_short.py runs a short version of it);
its module docstrings say how captured readings are known and how each service is verified.
Exit status 1 when a reading was lost or delivered with another value.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from tests.soak.harness import Report, Soak
from tests.soak.soakconfig import SoakPlan


def rss_over_time(report: Report, bucket_s: float) -> list[str]:
    """The daemon's largest RSS per ``bucket_s`` of the run, one line each."""
    buckets: dict[int, tuple[float, int]] = {}
    for s in report.rss:
        k = int(s.at_s // bucket_s)
        mib = s.rss / 2**20
        if k not in buckets or mib > buckets[k][0]:
            buckets[k] = (mib, s.run)
    return [
        f"  t={k * bucket_s:>5.0f}-{(k + 1) * bucket_s:<5.0f}s  run {run:>3}  "
        f"max RSS {mib:6.1f} MiB"
        for k, (mib, run) in sorted(buckets.items())
    ]


async def main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fg-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    plan = SoakPlan(
        kills=args.kills,
        seed=args.seed,
        drain_every=args.drain_every,
        fault_mean_s=args.fault_mean,
        kill_wait_s=args.kill_wait,
        drain_timeout_s=180.0,
        rss_every_s=args.rss_every,
        max_kill_loop_s=args.minutes * 60,
    )
    print(f"soak: {plan.kills} kills, seed {plan.seed}, workdir {workdir}", flush=True)
    started = time.monotonic()
    report = await Soak(workdir, plan, say=lambda line: print(line, flush=True)).run()
    print()
    print(report.format())
    print(f"daemon RSS over time (max per {args.rss_bucket:g} s):")
    print("\n".join(rss_over_time(report, args.rss_bucket)))
    print(f"wall time {time.monotonic() - started:.0f} s")
    ok = report.lost == 0 and report.mismatched == 0 and not report.drain_left
    print("RESULT:", "ok" if ok else "FAILED")
    return 0 if ok else 1


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=50, help="SIGKILLs (default 50)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--drain-every",
        type=int,
        default=10,
        help="every Nth cycle drains the store empty before the kill (0: never)",
    )
    p.add_argument(
        "--fault-mean", type=float, default=1.0, help="mean seconds between injected faults"
    )
    p.add_argument(
        "--kill-wait",
        type=float,
        default=12.0,
        help="longest wait for a chosen kill moment, seconds",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="stop the kill loop after this long (0: run all kills)",
    )
    p.add_argument("--rss-every", type=float, default=1.0, help="RSS sample interval, seconds")
    p.add_argument("--rss-bucket", type=float, default=30.0, help="RSS report granularity")
    p.add_argument("--workdir", help="keep everything here (default: a new temporary directory)")
    return p.parse_args(argv)


if __name__ == "__main__":
    # The emulators log every request at debug level: keep the report readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    sys.exit(asyncio.run(main(parse())))
