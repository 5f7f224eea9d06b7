"""Modbus source benchmark: requests per poll cycle and CPU per 1,000 fields polled.

    .venv/bin/python bench/bench_modbus.py [--fields 200] [--cycles 200] [--transport tcp]

The simulator (gateway/sandbox/modbus_sim.py) runs in a child process serving one unit with a
synthetic ``--fields`` map (mixed tables and types, small gaps, a large gap every 25 fields), so
this process's CPU time is the gateway's alone: pymodbus client, framing, decoding, report
bookkeeping and the event loop. The source polls the unit back to back (interval 10 ms, one
device, loopback) for ``--cycles`` polls, twice:

1. coalesced: the planner's plan (max 125 registers / 2000 bits per read, max_gap 10);
2. one request per field (``coalesce = false``), the naive way.

Printed per mode: requests per poll cycle (counted by the source and by the server), wall time
per cycle, process CPU per 1,000 fields polled. Then the pure decode cost (no I/O) of the map.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from gateway.models import Reading
from gateway.sandbox.modbus_encode import encode_raw
from gateway.sandbox.modbus_sim import field_dicts, synthetic_specs
from gateway.sources.modbus.config import ModbusSourceConfig
from gateway.sources.modbus.decode import (
    BIT_TABLES,
    FieldSpec,
    Span,
    plan_reads,
    words_to_bytes,
)
from gateway.sources.modbus.source import ModbusSource


def start_simulator(fields: int, transport: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.sandbox.modbus_sim",
            "--device",
            f"1=synthetic:{fields}",
            "--transport",
            transport,
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None
    where = json.loads(proc.stdout.readline())
    return proc, where


async def run_mode(
    where: dict[str, Any], fields: int, cycles: int, coalesce: bool
) -> dict[str, float]:
    specs = synthetic_specs(fields, prefix="unit1")
    data: dict[str, Any] = {
        "name": "bench",
        "type": "modbus",
        "transport": where["transport"],
        "timeout_s": 2.0,
    }
    if where["transport"] == "rtu":
        data["serial_port"] = where["serial_port"]
    else:
        data.update(host=where["host"], port=where["port"])
    data["devices"] = [
        {
            "name": "unit1",
            "unit": 1,
            "interval_s": 0.01,
            "coalesce": coalesce,
            "fields": field_dicts(specs),
        }
    ]
    src = ModbusSource(ModbusSourceConfig.model_validate(data), Path("."))
    detail = src.stats.detail["devices"]["unit1"]
    done = asyncio.Event()
    warm = 5
    marks: dict[str, float] = {}
    readings = 0

    async def emit(batch: Sequence[Reading]) -> None:
        nonlocal readings
        readings += len(batch)
        polls = detail["polls"]
        if polls == warm and "cpu0" not in marks:
            marks.update(
                cpu0=time.process_time(),
                wall0=time.perf_counter(),
                req0=detail["requests"],
                rd0=readings,
            )
        if polls >= warm + cycles:
            marks.update(
                cpu1=time.process_time(),
                wall1=time.perf_counter(),
                req1=detail["requests"],
                rd1=readings,
            )
            done.set()

    task = asyncio.create_task(src.run(emit), name="poll:bench")
    try:
        async with asyncio.timeout(600):
            await done.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await src.aclose()
    polled = marks["rd1"] - marks["rd0"]
    return {
        "requests_per_cycle": (marks["req1"] - marks["req0"]) / cycles,
        "planned_requests": float(detail["requests_per_poll"]),
        "wall_ms_per_cycle": (marks["wall1"] - marks["wall0"]) * 1000 / cycles,
        "cpu_ms_per_1000_fields": (marks["cpu1"] - marks["cpu0"]) * 1000 / polled * 1000,
        "fields_per_cycle": polled / cycles,
    }


def decode_cost(fields: int, rounds: int = 2000) -> float:
    """CPU microseconds per field to decode, scale and check a whole map from raw registers."""
    # The gateway's own specs of the simulator's map (what it decodes with).
    specs = [
        FieldSpec(
            s.series, s.table, s.address, s.dtype, s.order, s.bit, s.length, s.scale, s.offset
        )
        for s in synthetic_specs(fields)
    ]
    plan = plan_reads([Span(s.table, s.address, s.count) for s in specs])
    payloads = []
    for req in plan:
        words = [0] * req.count
        for i in req.fields:
            s = specs[i]
            if s.table in BIT_TABLES or s.dtype == "bit":
                continue
            off = s.address - req.address
            words[off : off + s.count] = encode_raw(s.dtype, 12, s.order)
        payloads.append((req, words))
    t0 = time.process_time()
    for _ in range(rounds):
        for req, words in payloads:
            data = words_to_bytes(words)
            for i in req.fields:
                s = specs[i]
                if s.table in BIT_TABLES:
                    continue
                off = s.address - req.address
                s.value(s.decode(data[2 * off : 2 * (off + s.count)]))
    return (time.process_time() - t0) / (rounds * fields) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fields", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--transport", choices=["tcp", "rtu_over_tcp", "rtu"], default="tcp")
    args = ap.parse_args()
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    proc, where = start_simulator(args.fields, args.transport)
    try:
        print(
            f"modbus bench: {args.fields}-field map, {args.cycles} polls per mode, "
            f"simulator in a child process ({where['transport']}, loopback/pty), Python "
            f"{sys.version.split()[0]}"
        )
        results = {}
        for name, coalesce in (("coalesced", True), ("one request per field", False)):
            r = await run_mode(where, args.fields, args.cycles, coalesce)
            results[name] = r
            print(
                f"  {name:22s} requests/cycle {r['requests_per_cycle']:6.1f} "
                f"(planned {r['planned_requests']:.0f})  "
                f"wall {r['wall_ms_per_cycle']:6.2f} ms/cycle  "
                f"CPU {r['cpu_ms_per_1000_fields']:6.2f} ms per 1,000 fields polled"
            )
        a, b = results["coalesced"], results["one request per field"]
        print(
            f"  coalescing: {b['requests_per_cycle'] / a['requests_per_cycle']:.0f}x fewer "
            "requests, "
            f"{b['cpu_ms_per_1000_fields'] / a['cpu_ms_per_1000_fields']:.1f}x less CPU, "
            f"{b['wall_ms_per_cycle'] / a['wall_ms_per_cycle']:.1f}x shorter cycles"
        )
        print(f"  decode only (no I/O): {decode_cost(args.fields):.2f} us per field")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    asyncio.run(main())
