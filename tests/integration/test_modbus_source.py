"""The Modbus source against a real pymodbus server (gateway/sandbox/modbus_sim.py).

Transports for real: TCP on a free loopback port, RTU over a socat pty pair, RTU framing over
TCP. Faults are injected in the server (silent units, exception responses, corrupted CRCs,
out-of-step transaction ids, short answers, the server killed and restarted, the pty pair
unplugged). Synchronisation is by events: the emit callback signals every batch and the tests
wait for a condition on what arrived or on the source's status (re-checked every 20 ms too,
since status changes while nothing arrives). Time limits only stop a hung test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import tomllib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from structlog.testing import capture_logs

from gateway.models import Reading
from gateway.sandbox.modbus_sim import (
    FieldLayout,
    ModbusSimulator,
    field_dicts,
    profile_specs,
    synthetic_specs,
)
from gateway.sources.base import Source, now_ms
from gateway.sources.modbus.config import ModbusSourceConfig, ResolvedField
from gateway.sources.modbus.decode import ORDERS, DataType, FieldSpec, Span, plan_reads
from gateway.sources.modbus.link import ModbusLink
from gateway.sources.modbus.source import ModbusSource

REPO = Path(__file__).resolve().parents[2]
PROFILES = sorted((REPO / "hardware" / "profiles").glob("*.toml"))
FAST = {
    "timeout_s": 0.25,
    "connect_timeout_s": 1.0,
    "reconnect_min_s": 0.02,
    "reconnect_max_s": 0.1,
}


class Collector:
    """The emit callback of a test: keeps every reading, signals every batch."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.changed = asyncio.Event()

    async def emit(self, batch: Sequence[Reading]) -> None:
        self.readings.extend(batch)
        self.changed.set()

    def of(self, series: str) -> list[Reading]:
        return [r for r in self.readings if r.series == series]

    def count(self, prefix: str) -> int:
        return sum(1 for r in self.readings if r.series.startswith(prefix))


async def wait_until(cond: Callable[[], bool], col: Collector, limit: float = 15) -> None:
    """Wait until ``cond`` holds: re-checked on every batch, and every 20 ms for status changes
    that come without readings (a dead connection). ``limit`` only stops a hung test."""
    async with asyncio.timeout(limit):
        while not cond():
            col.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.02):
                    await col.changed.wait()


@contextlib.asynccontextmanager
async def running(source: Source, col: Collector) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(col.emit), name=f"poll:{source.name}")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await source.aclose()


def make_cfg(sim: ModbusSimulator, devices: list[dict[str, Any]], **kw: Any) -> ModbusSourceConfig:
    data: dict[str, Any] = {"name": "plc", "type": "modbus", "transport": sim.transport, **FAST}
    if sim.transport == "rtu":
        data["serial_port"] = sim.serial_port
    else:
        data.update(host=sim.host, port=sim.port)
    data.update(kw)
    data["devices"] = devices
    return ModbusSourceConfig.model_validate(data)


def device(name: str, unit: int, specs: Sequence[FieldLayout], **kw: Any) -> dict[str, Any]:
    return {"name": name, "unit": unit, "interval_s": 0.05, "fields": field_dicts(specs), **kw}


def dev_detail(src: ModbusSource, name: str) -> dict[str, Any]:
    detail: dict[str, Any] = src.stats.detail["devices"][name]
    return detail


def conn_detail(src: ModbusSource) -> dict[str, Any]:
    (detail,) = src.stats.detail["connections"].values()
    out: dict[str, Any] = detail
    return out


# ----------------------------------------------------------------------------------------------
# Decoding for real, coalescing


def every_type_map() -> tuple[list[FieldSpec], dict[str, Any]]:
    """A register map with every type in every byte order, and the value each should read."""
    specs: list[FieldSpec] = []
    want: dict[str, Any] = {}
    addr = 0
    values: dict[DataType, int | float] = {
        "int16": -1234,
        "uint16": 54321,
        "int32": -123456789,
        "uint32": 3_000_000_000,
        "int64": -(2**40) - 5,
        "uint64": 2**63 + 7,
        "float32": 230.1,
        "float64": -1234.5678901234,
    }
    for order in ORDERS:
        for dtype, value in values.items():
            s = FieldSpec(f"t.{dtype}_{order}", "holding", addr, dtype, order=order)
            specs.append(s)
            want[s.series] = value
            addr = s.end + 1  # one unused register between fields: coalesced across the gap
        s = FieldSpec(f"t.text_{order}", "holding", addr, "string", order=order, length=9)
        specs.append(s)
        want[s.series] = "SDM630-M2"
        addr = s.end
    extra = [
        (FieldSpec("t.bit0", "holding", addr, "bit", bit=0), True),
        (FieldSpec("t.bit15", "holding", addr, "bit", bit=15), True),
        (FieldSpec("t.bit7", "holding", addr, "bit", bit=7), False),
        (FieldSpec("t.nonzero", "holding", addr + 1, "bool"), True),
        (FieldSpec("t.celsius", "input", 10, "int16", scale=0.1, offset=-40.0), 175.0),
        (FieldSpec("t.kwh", "input", 11, "uint32", order="CDAB", scale=0.01), 123456.78),
        (FieldSpec("t.coil", "coil", 3, "bool"), True),
        (FieldSpec("t.input_bit", "discrete", 17, "bool"), True),
        (FieldSpec("t.input_bit_off", "discrete", 18, "bool"), False),
    ]
    for s, v in extra:
        specs.append(s)
        want[s.series] = v
    return specs, want


async def test_tcp_reads_every_type_and_byte_order_exactly() -> None:
    specs, want = every_type_map()
    async with ModbusSimulator({7: specs}, transport="tcp") as sim:
        for series, value in want.items():
            sim.set_value(7, series, value)
        cfg = make_cfg(sim, [device("t", 7, specs, max_gap=4)])
        assert set(cfg.series_names()) == set(want)
        col = Collector()
        src = ModbusSource(cfg, REPO)
        before = now_ms()
        async with running(src, col):
            await wait_until(
                lambda: all(col.of(s) for s in want) and dev_detail(src, "t")["polls"] >= 3, col
            )
        after = now_ms()
        for series, value in want.items():
            got = [r.value for r in col.of(series)]
            if series in ("t.celsius", "t.kwh"):  # scaled: raw * scale + offset in floats
                assert got[0] == pytest.approx(value, rel=1e-12), series
            else:  # exact, float32 230.1 included
                assert got[0] == value and type(got[0]) is type(value), series
            assert len(set(got)) == 1, f"{series} changed while pinned: {got}"
        assert all(before <= r.ts <= after for r in col.readings)
        # Coalesced: the server saw exactly the planned requests, far fewer than fields.
        d = dev_detail(src, "t")
        plan = plan_reads([Span(s.table, s.address, s.count) for s in specs], max_gap=4)
        assert d["requests_per_poll"] == len(plan) == 5
        # (the last request may have been cancelled before the server read it)
        assert d["requests"] - 1 <= sim.requests[7] <= d["requests"]
        assert d["polls"] * len(plan) <= d["requests"] <= (d["polls"] + 1) * len(plan)
        assert d["timeouts"] == d["malformed"] == d["rejected"] == 0 and d["exceptions"] == {}
        assert src.stats.errors == 0


async def test_plan_is_logged_and_one_request_per_field_without_coalescing() -> None:
    specs = synthetic_specs(40, "s")
    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        with capture_logs() as logs:
            coalesced = ModbusSource(make_cfg(sim, [device("s", 1, specs)]), REPO)
            single = ModbusSource(make_cfg(sim, [device("s", 1, specs, coalesce=False)]), REPO)
        plans = [e for e in logs if e["event"] == "modbus_plan"]
        assert [p["requests"] for p in plans] == [
            dev_detail(coalesced, "s")["requests_per_poll"],
            40,
        ]
        assert plans[0]["requests"] <= 6 and len(plans[0]["plan"]) == plans[0]["requests"]
        col = Collector()
        async with running(single, col):
            await wait_until(lambda: dev_detail(single, "s")["polls"] >= 2, col)
        d = dev_detail(single, "s")
        assert d["requests"] - 1 <= sim.requests[1] <= d["requests"] and d["requests"] >= 80
        await coalesced.aclose()


# ----------------------------------------------------------------------------------------------
# A shared RS-485 bus over a real pty pair


async def test_rtu_bus_dead_unit_degrades_without_stalling_the_others_then_recovers() -> None:
    meter = profile_specs(REPO / "hardware/profiles/sdm630.toml", "meter")
    well = profile_specs(REPO / "hardware/profiles/keller-series30.toml", "well")
    flow = profile_specs(REPO / "hardware/profiles/magflow-mfe600.toml", "flow")
    async with ModbusSimulator({1: meter, 2: well, 3: flow}, transport="rtu") as sim:
        sim.set_value(2, "well.pressure_p1", 0.5)
        cfg = make_cfg(
            sim,
            [
                {
                    "name": "meter",
                    "unit": 1,
                    "interval_s": 0.05,
                    "degraded_after": 2,
                    "degraded_interval_s": 0.4,
                    "profile": "hardware/profiles/sdm630.toml",
                },
                {
                    "name": "well",
                    "unit": 2,
                    "interval_s": 0.05,
                    "profile": "hardware/profiles/keller-series30.toml",
                },
                {
                    "name": "flow",
                    "unit": 3,
                    "interval_s": 0.05,
                    "profile": "hardware/profiles/magflow-mfe600.toml",
                },
            ],
            baudrate=19200,
        )
        col = Collector()
        src = ModbusSource(cfg, REPO)
        assert len(src.stats.detail["connections"]) == 1  # one bus, one connection
        async with running(src, col):
            await wait_until(
                lambda: all(dev_detail(src, d)["polls"] >= 2 for d in ("meter", "well", "flow")),
                col,
            )
            assert col.of("well.level_m")[-1].value == pytest.approx(0.5 * 10.1972)
            assert dev_detail(src, "meter")["requests_per_poll"] == 5  # 80-register limit, gaps

            sim.silence(1)
            await wait_until(lambda: dev_detail(src, "meter")["state"] == "degraded", col)
            dead = col.count("meter.")
            polls = {d: dev_detail(src, d)["polls"] for d in ("well", "flow")}
            await wait_until(
                lambda: all(dev_detail(src, d)["polls"] >= polls[d] + 5 for d in polls), col
            )
            assert src.stats.state == "degraded"
            assert col.count("meter.") == dead, "no reading from a unit that does not answer"
            m = dev_detail(src, "meter")
            # A dead unit costs one timeout per poll, not one per request of its plan.
            # (one more if the silence began between two requests of a poll)
            assert m["failed_polls"] <= m["timeouts"] <= m["failed_polls"] + 1
            assert m["failed_polls"] >= 2
            assert all(dev_detail(src, d)["timeouts"] == 0 for d in polls)

            sim.silence(1, False)
            await wait_until(
                lambda: dev_detail(src, "meter")["state"] == "ok" and col.count("meter.") > dead,
                col,
            )
            await wait_until(lambda: src.stats.state == "ok", col)


async def test_rtu_crc_errors_and_short_answers_are_counted_and_never_become_readings() -> None:
    one = [FieldSpec("one.v", "holding", 0, "uint16")]
    async with ModbusSimulator({5: one}, transport="rtu") as sim:
        cfg = make_cfg(sim, [device("one", 5, one, degraded_after=10)])
        col = Collector()
        src = ModbusSource(cfg, REPO)
        async with running(src, col):
            await wait_until(lambda: len(col.of("one.v")) >= 3, col)
            sim.corrupt_crc(2)
            await wait_until(lambda: dev_detail(src, "one")["crc_errors"] >= 2, col)
            sim.short_replies(1)
            await wait_until(lambda: dev_detail(src, "one")["malformed"] >= 1, col)
            n = len(col.of("one.v"))
            await wait_until(lambda: len(col.of("one.v")) >= n + 3, col)
        d = dev_detail(src, "one")
        assert d["crc_errors"] == 2 and d["malformed"] == 1
        # One field, one request per poll: every reading is one good answer of the server.
        good = sim.responses[5] - 3
        assert good - 1 <= len(col.of("one.v")) <= good


async def test_rtu_adapter_unplugged_then_replugged_resumes_by_itself() -> None:
    specs = synthetic_specs(6, "u")
    async with ModbusSimulator({1: specs}, transport="rtu") as sim:
        col = Collector()
        src = ModbusSource(make_cfg(sim, [device("u", 1, specs)]), REPO)
        async with running(src, col):
            await wait_until(lambda: col.count("u.") >= 12, col)
            await sim.stop(unplug=True)
            await wait_until(
                lambda: "does not exist" in (conn_detail(src)["last_error"] or ""), col
            )
            assert src.stats.state == "disconnected"
            n = col.count("u.")
            await sim.start()
            await wait_until(lambda: col.count("u.") >= n + 12, col)
        c = conn_detail(src)
        assert c["connects"] >= 2 and c["disconnects"] >= 1 and c["connect_failures"] >= 1


async def test_rtu_over_tcp_converter() -> None:
    specs = synthetic_specs(20, "c")
    async with ModbusSimulator({9: specs}, transport="rtu_over_tcp") as sim:
        sim.set_value(9, "c.f0", 12.5)
        col = Collector()
        src = ModbusSource(make_cfg(sim, [device("c", 9, specs)]), REPO)
        async with running(src, col):
            await wait_until(lambda: dev_detail(src, "c")["polls"] >= 3, col)
        assert {r.value for r in col.of("c.f0")} == {12.5}
        assert len({r.series for r in col.readings}) == 20
        assert dev_detail(src, "c")["timeouts"] == dev_detail(src, "c")["crc_errors"] == 0


# ----------------------------------------------------------------------------------------------
# Modbus TCP faults


async def test_tcp_server_killed_mid_poll_and_restarted_resumes_by_itself() -> None:
    specs = synthetic_specs(10, "k")
    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        col = Collector()
        src = ModbusSource(make_cfg(sim, [device("k", 1, specs, interval_s=0.02)]), REPO)
        async with running(src, col):
            await wait_until(lambda: dev_detail(src, "k")["polls"] >= 5, col)
            await sim.stop()  # while the source polls every 20 ms
            await wait_until(lambda: dev_detail(src, "k")["connect_failures"] >= 1, col)
            assert src.stats.state == "disconnected"
            assert "refused" in (conn_detail(src)["last_error"] or "")
            n = len(col.readings)
            await sim.start()
            await wait_until(lambda: len(col.readings) >= n + 30 and src.stats.state == "ok", col)
        c = conn_detail(src)
        assert c["disconnects"] >= 1 and c["connects"] >= 2


async def test_tcp_transaction_ids_out_of_step_drop_and_reopen_the_connection() -> None:
    specs = synthetic_specs(8, "x")
    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        col = Collector()
        src = ModbusSource(make_cfg(sim, [device("x", 1, specs)]), REPO)
        async with running(src, col):
            await wait_until(lambda: dev_detail(src, "x")["polls"] >= 2, col)
            sim.desync_tids(1)
            await wait_until(lambda: conn_detail(src)["tid_resyncs"] >= 1, col)
            n = len(col.readings)
            await wait_until(lambda: len(col.readings) >= n + 16, col)
        c = conn_detail(src)
        assert c["tid_resyncs"] == 1 and c["connects"] == 2
        assert dev_detail(src, "x")["protocol_errors"] == 1  # the request that got the stray answer


async def test_exception_response_marks_only_that_field_failing_and_it_recovers() -> None:
    specs = [
        FieldSpec("e.a", "holding", 0, "uint16"),
        FieldSpec("e.b", "holding", 1, "float32"),
        FieldSpec("e.bad", "holding", 3, "uint16"),
        FieldSpec("e.c", "holding", 4, "int32"),
        FieldSpec("e.d", "holding", 8, "uint16"),
    ]
    good = ["e.a", "e.b", "e.c", "e.d"]
    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        sim.fail_range(1, "holding", 3, 4, code=2)
        col = Collector()
        src = ModbusSource(make_cfg(sim, [device("e", 1, specs, failing_retry_s=0.3)]), REPO)
        async with running(src, col):
            await wait_until(lambda: dev_detail(src, "e")["failing_fields"] == ["e.bad"], col)
            counts = {s: len(col.of(s)) for s in good}
            await wait_until(lambda: all(len(col.of(s)) >= counts[s] + 5 for s in good), col)
            d = dev_detail(src, "e")
            assert col.of("e.bad") == [], "a refused field never gets a reading"
            assert d["state"] == "ok" and d["exceptions"]["illegal_data_address"] >= 2
            assert d["requests_per_poll"] == 2  # the map around the failing field, split
            sim.clear_faults()
            await wait_until(lambda: len(col.of("e.bad")) >= 2, col)
            assert dev_detail(src, "e")["failing_fields"] == []
            assert dev_detail(src, "e")["requests_per_poll"] == 1


async def test_refused_gap_between_fields_splits_the_read_without_failing_a_field() -> None:
    specs = [FieldSpec("g.a", "input", 0, "uint16"), FieldSpec("g.b", "input", 6, "uint16")]
    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        sim.fail_range(1, "input", 2, 4)  # nothing is configured there
        col = Collector()
        src = ModbusSource(make_cfg(sim, [device("g", 1, specs)]), REPO)
        async with running(src, col):
            await wait_until(lambda: len(col.of("g.a")) >= 4 and len(col.of("g.b")) >= 4, col)
        d = dev_detail(src, "g")
        assert d["failing_fields"] == [] and d["requests_per_poll"] == 2


async def test_device_busy_fails_the_poll_without_blaming_a_field() -> None:
    specs = synthetic_specs(6, "b")
    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        col = Collector()
        src = ModbusSource(make_cfg(sim, [device("b", 1, specs)]), REPO)
        async with running(src, col):
            await wait_until(lambda: dev_detail(src, "b")["polls"] >= 2, col)
            sim.fail_range(1, "holding", 0, 100, code=6)
            await wait_until(
                lambda: dev_detail(src, "b")["exceptions"].get("server_device_busy", 0) >= 3, col
            )
            assert dev_detail(src, "b")["failing_fields"] == []
            assert "busy" in dev_detail(src, "b")["last_error"]


async def test_non_finite_values_are_counted_and_never_emitted() -> None:
    specs = [
        FieldSpec("n.nan", "input", 0, "float32"),
        FieldSpec("n.inf", "input", 2, "float64"),
        FieldSpec("n.ok", "input", 6, "float32"),
    ]
    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        sim.set_value(1, "n.nan", math.nan)
        sim.set_value(1, "n.inf", -math.inf)
        col = Collector()
        src = ModbusSource(make_cfg(sim, [device("n", 1, specs)]), REPO)
        async with running(src, col):
            await wait_until(lambda: src.stats.rejected >= 6 and len(col.of("n.ok")) >= 3, col)
        assert col.of("n.nan") == [] and col.of("n.inf") == []
        assert dev_detail(src, "n")["rejected"] == src.stats.rejected


async def test_deadband_reports_changes_and_heartbeat_repeats_a_flat_value() -> None:
    specs = [
        FieldSpec("r.level", "holding", 0, "float32"),
        FieldSpec("r.flat", "holding", 2, "uint16"),
        FieldSpec("r.tick", "holding", 3, "uint16"),
    ]
    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        sim.set_value(1, "r.level", 10.0)
        sim.set_value(1, "r.flat", 7)
        fields = field_dicts(specs)
        fields[0].update(deadband=1.0, heartbeat_s=3600)
        fields[1].update(deadband=0, heartbeat_s=0.2)
        col = Collector()
        cfg = make_cfg(sim, [{"name": "r", "unit": 1, "interval_s": 0.02, "fields": fields}])
        src = ModbusSource(cfg, REPO)
        async with running(src, col):
            await wait_until(
                lambda: len(col.of("r.level")) == 1 and len(col.of("r.tick")) >= 3, col
            )
            sim.set_value(1, "r.level", 10.5)  # inside the deadband: not reported
            n = len(col.of("r.tick"))
            await wait_until(lambda: len(col.of("r.tick")) >= n + 10, col)
            assert [r.value for r in col.of("r.level")] == [10.0]
            sim.set_value(1, "r.level", 12.0)
            await wait_until(lambda: [r.value for r in col.of("r.level")] == [10.0, 12.0], col)
            # A flat value still comes with every heartbeat.
            await wait_until(lambda: len(col.of("r.flat")) >= 3, col)
        flat = col.of("r.flat")
        assert {r.value for r in flat} == {7}
        assert all(b.ts - a.ts >= 200 for a, b in itertools.pairwise(flat))


async def test_separate_connections_poll_in_parallel() -> None:
    a_specs = synthetic_specs(4, "a")
    b_specs = synthetic_specs(4, "b")
    async with (
        ModbusSimulator({1: a_specs}, transport="tcp") as sim_a,
        ModbusSimulator({1: b_specs}, transport="tcp") as sim_b,
    ):
        sim_a.silence(1)
        cfg = make_cfg(
            sim_b,
            [
                device("a", 1, a_specs, host=sim_a.host, port=sim_a.port, timeout_s=30),
                device("b", 1, b_specs),
            ],
        )
        col = Collector()
        src = ModbusSource(cfg, REPO)
        async with running(src, col):
            await wait_until(lambda: col.count("b.") >= 40, col)
            names = {t.get_name() for t in asyncio.all_tasks()}
            assert {f"modbus:plc:tcp {s.host}:{s.port}" for s in (sim_a, sim_b)} <= names
            # b kept polling while a's first request still waits for its 30 s timeout.
            assert dev_detail(src, "a")["polls"] == 0 and col.count("a.") == 0
        assert sim_a.requests[1] == 1


# ----------------------------------------------------------------------------------------------
# check-config --probe


async def test_probe_reports_answers_refusals_and_silence(tmp_path: Path) -> None:
    specs = synthetic_specs(5, "p")
    async with ModbusSimulator({1: specs, 2: specs, 3: specs}, transport="tcp") as sim:
        sim.silence(2)
        sim.fail_range(3, "holding", 2, 3)  # p.f1 (uint16 at holding 2) refused
        sim.set_value(1, "p.f1", 4242)
        cfg = make_cfg(
            sim,
            [
                device("good", 1, specs),
                device("dead", 2, [FieldSpec("q.v", "holding", 0, "uint16")]),
                device(
                    "partial",
                    3,
                    [
                        FieldSpec(
                            s.series.replace("p.", "r."),
                            s.table,
                            s.address,
                            s.dtype,
                            s.order,
                            s.bit,
                        )
                        for s in specs
                    ],
                ),
                device(
                    "elsewhere",
                    1,
                    [FieldSpec("z.v", "holding", 0, "uint16")],
                    host="127.0.0.1",
                    port=1,
                ),
            ],
        )
        src = ModbusSource(cfg, tmp_path)
        try:
            lines = list((await src.probe()).lines)
        finally:
            await src.aclose()
    text = "\n".join(lines)
    assert lines[0] == "modbus source plc: 4 device(s) on 2 connection(s)"
    assert f"good (unit 1 on tcp {sim.host}:{sim.port}): answered; 5 fields in" in text
    assert "    p.f1 = 4242" in text
    assert "dead (unit 2" in text and "no answer: no answer within 0.25 s" in text
    assert (
        "partial (unit 3" in text and "r.f1: refused (exception 2 (illegal data address))" in text
    )
    assert "r.f0 = " in text
    assert (
        "tcp 127.0.0.1:1: cannot connect: connect to 127.0.0.1:1 failed: Connection refused" in text
    )


# ----------------------------------------------------------------------------------------------
# Config validation and profiles


def base_source(**dev: Any) -> dict[str, Any]:
    return {
        "name": "plc",
        "type": "modbus",
        "host": "10.0.0.1",
        "devices": [{"name": "d", "unit": 1, **dev}],
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ([{"name": "x", "address": 0, "type": "float16"}], "Input should be 'bool', 'bit'"),
        (
            [{"name": "x", "address": 0, "type": "float32", "count": 1}],
            "type float32 spans 2 registers, but count = 1",
        ),
        ([{"name": "x", "address": 0, "type": "string"}], "type string needs length"),
        ([{"name": "x", "address": 0, "type": "bit"}], "type bit needs bit = 0..15"),
        ([{"name": "x", "address": 0, "type": "bit", "bit": 16}], "less than or equal to 15"),
        ([{"name": "x", "address": 0, "type": "uint16", "bit": 3}], "bit applies only to type bit"),
        (
            [{"name": "x", "address": 0, "table": "coil", "type": "int16"}],
            "table coil holds single bits, so type must be bool",
        ),
        (
            [{"name": "x", "address": 0, "type": "string", "length": 4, "scale": 2.0}],
            "scale and offset apply only to numbers",
        ),
        ([{"name": "x", "address": 0, "scale": 0.0}], "scale must be a finite, non-zero"),
        (
            [{"name": "x", "address": 0, "type": "bool", "deadband": 1.0}],
            "a deadband applies only to numbers",
        ),
        ([{"name": "x", "address": 0, "heartbeat_s": 60}], "heartbeat_s needs a deadband"),
        ([{"address": 0}], "give a name or a series"),
        ([{"name": "x", "address": 65535, "type": "uint32"}], "runs past the last address"),
        (
            [{"name": "x", "address": 0, "type": "float32"}, {"name": "y", "address": 1}],
            "fields[1] (d.y) overlaps fields[0] (d.x) at holding 1; set allow_overlap = true",
        ),
        (
            [{"name": "x", "address": 0}, {"name": "x", "address": 1}],
            "series 'd.x' is already produced by fields[0]",
        ),
        ([], "the device has no fields"),
    ],
)
def test_config_errors_name_the_field_and_the_problem(fields: list[Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        ModbusSourceConfig.model_validate(base_source(fields=fields))
    assert message in str(info.value)


def test_config_accepts_bits_sharing_a_register_and_explicit_overlaps() -> None:
    cfg = ModbusSourceConfig.model_validate(
        base_source(
            fields=[
                {"name": "run", "address": 4, "type": "bit", "bit": 0},
                {"name": "fault", "address": 4, "type": "bit", "bit": 1},
                {"name": "raw", "address": 4, "allow_overlap": True},
                {"name": "total", "address": 10, "type": "uint32"},
                {"name": "total_lo", "address": 11, "allow_overlap": True},
            ]
        )
    )
    assert list(cfg.series_names()) == ["d.run", "d.fault", "d.raw", "d.total", "d.total_lo"]
    with pytest.raises(ValidationError, match=r"fields\[1\] \(d.b\) overlaps fields\[0\] \(d.a\)"):
        ModbusSourceConfig.model_validate(
            base_source(
                fields=[
                    {"name": "a", "address": 4, "type": "bit", "bit": 2},
                    {"name": "b", "address": 4, "type": "bit", "bit": 2},
                ]
            )
        )


def test_source_level_cross_checks() -> None:
    def err(data: dict[str, Any]) -> str:
        with pytest.raises(ValidationError) as info:
            ModbusSourceConfig.model_validate(data)
        return str(info.value)

    one = [{"name": "v", "address": 0}]
    assert "needs host" in err(
        {"name": "s", "type": "modbus", "devices": [{"name": "d", "unit": 1, "fields": one}]}
    )
    assert "transport rtu needs serial_port" in err(
        {
            "name": "s",
            "type": "modbus",
            "transport": "rtu",
            "devices": [{"name": "d", "unit": 1, "fields": one}],
        }
    )
    assert "unit 0 is not an RTU address" in err(
        {
            "name": "s",
            "type": "modbus",
            "transport": "rtu",
            "serial_port": "/dev/ttyUSB0",
            "devices": [{"name": "d", "unit": 0, "fields": one}],
        }
    )
    dup = {
        "name": "s",
        "type": "modbus",
        "host": "h",
        "devices": [
            {"name": "d", "unit": 1, "fields": one},
            {"name": "d", "unit": 1, "fields": one},
        ],
    }
    text = err(dup)
    assert (
        "device names must be unique, repeated: d" in text and "share unit 1 on tcp h:502" in text
    )
    same_series = {
        "name": "s",
        "type": "modbus",
        "host": "h",
        "devices": [
            {"name": "a", "unit": 1, "fields": [{"series": "x.v", "address": 0}]},
            {"name": "b", "unit": 2, "fields": [{"series": "x.v", "address": 0}]},
        ],
    }
    assert "series 'x.v' is produced by devices a and b" in err(same_series)
    assert "Extra inputs are not permitted" in err(base_source(fields=one, frobnicate=1))


def test_a_whole_toml_section_validates_and_profiles_resolve_from_the_config_dir(
    tmp_path: Path,
) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "pump.toml").write_text(
        'table = "input"\n[[fields]]\nname = "speed"\naddress = 0\ntype = "float32"\n'
        '[[fields]]\nname = "hours"\naddress = 2\ntype = "uint32"\nword_order = "CDAB"\n'
    )
    text = """
    [[sources]]
    name = "pumps"
    type = "modbus"
    transport = "rtu"
    serial_port = "/dev/ttyRS485-ftdi-A10K1ABC"
    baudrate = 19200
    parity = "E"
      [[sources.devices]]
      name = "p1"
      unit = 3
      profile = "profiles/pump.toml"
        [[sources.devices.fields]]
        name = "fault"
        table = "discrete"
        address = 4
    """
    data = tomllib.loads(text)["sources"][0]
    with pytest.raises(ValidationError, match=r"profile 'profiles/pump\.toml' not found"):
        ModbusSourceConfig.model_validate(data)
    cfg = ModbusSourceConfig.model_validate(data, context={"base_dir": tmp_path})
    assert list(cfg.series_names()) == ["p1.speed", "p1.hours", "p1.fault"]
    specs = [f.spec for f in cfg.devices[0].resolved_fields()]
    assert specs[0].table == "input" and specs[1].order == "CDAB" and specs[2].dtype == "bool"
    # A broken profile is reported with its own path and field.
    (tmp_path / "profiles" / "pump.toml").write_text(
        '[[fields]]\nname = "x"\naddress = 0\ntype = "f"\n'
    )
    with pytest.raises(ValidationError, match=r"pump.toml: fields\[0\].type -> Input should be"):
        ModbusSourceConfig.model_validate(data, context={"base_dir": tmp_path})


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_hardware_profile_loads_validates_and_cites_its_source(path: Path) -> None:
    head = path.read_text().splitlines()[:12]
    assert any("Source:" in line for line in head), "cite the register table's document"
    cfg = ModbusSourceConfig.model_validate(
        {
            "name": "s",
            "type": "modbus",
            "host": "h",
            "devices": [{"name": path.stem.replace("-", "_"), "unit": 1, "profile": str(path)}],
        }
    )
    fields = cfg.devices[0].resolved_fields()
    assert len(fields) >= 5
    profile = cfg.devices[0].profile_model
    assert profile is not None and profile.source and profile.manufacturer
    limit = profile.max_registers or 125
    spans = [Span(f.spec.table, f.spec.address, f.spec.count) for f in fields]
    assert all(r.count <= limit for r in plan_reads(spans, max_registers=limit))


def test_profile_include_and_exclude() -> None:
    dev = {"profile": "hardware/profiles/sdm120.toml"}
    cfg = ModbusSourceConfig.model_validate(base_source(**dev, include=["voltage", "power"]))
    assert list(cfg.series_names()) == ["d.voltage", "d.power"]
    cfg = ModbusSourceConfig.model_validate(base_source(**dev, exclude=["frequency"]))
    assert "d.frequency" not in set(cfg.series_names()) and "d.voltage" in set(cfg.series_names())
    with pytest.raises(ValidationError, match="include: profile has no field named volts"):
        ModbusSourceConfig.model_validate(base_source(**dev, include=["volts"]))


def test_sample_config_loads() -> None:
    sample = REPO / "config/samples/modbus.toml"
    data = tomllib.loads(sample.read_text())
    cfgs = [
        ModbusSourceConfig.model_validate(s, context={"base_dir": REPO / "config/samples"})
        for s in data["sources"]
    ]
    assert [c.transport for c in cfgs] == ["rtu", "tcp", "rtu_over_tcp"]
    assert "meter.frequency_change" in set(cfgs[0].series_names())


async def test_aclose_is_idempotent_and_final() -> None:
    cfg = ModbusSourceConfig.model_validate(base_source(fields=[{"name": "v", "address": 0}]))
    src = ModbusSource(cfg, REPO)
    await src.aclose()
    await src.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await src.run(Collector().emit)


async def test_plain_uint16_requests_skip_decoding_and_read_the_same_values() -> None:
    # A request of plain uint16 fields takes the no-decode path (the register is the value);
    # byte-swapped orders, a scale or a deadband keep the decoder. All must read alike.
    def u16(name: str, addr: int, **kw: Any) -> FieldSpec:
        return FieldSpec(f"{name}", "holding", addr, "uint16", **kw)

    def want(s: FieldSpec) -> int | float:
        return 54321 if s.scale == 1.0 else 54321 * s.scale  # unscaled fields read as ints

    plain = [u16("p.a", 0), u16("p.b", 1, order="CDAB"), u16("p.c", 3)]
    swapped = [u16("s.a", 0), u16("s.b", 1, order="BADC")]
    scaled = [u16("k.a", 0), u16("k.b", 1, scale=0.5)]
    async with ModbusSimulator({1: plain, 2: swapped, 3: scaled}) as sim:
        for unit, specs in ((1, plain), (2, swapped), (3, scaled)):
            for s in specs:
                sim.set_value(unit, s.series, want(s))
        cfg = make_cfg(
            sim, [device("p", 1, plain), device("s", 2, swapped), device("k", 3, scaled)]
        )
        src = ModbusSource(cfg, REPO)
        col = Collector()
        async with running(src, col):
            await wait_until(lambda: all(col.of(s.series) for s in plain + swapped + scaled), col)
        devices = {d.name: d for c in src._conns for d in c.devices}
    for s in plain + swapped + scaled:
        values = {r.value for r in col.of(s.series)}
        assert values == {want(s)}, s.series
        assert all(type(v) is type(want(s)) for v in values), s.series
    assert [v is not None for v in devices["p"].plain.values()] == [True]
    assert all(v is None for v in devices["s"].plain.values())
    assert all(v is None for v in devices["k"].plain.values())


def test_devices_of_one_profile_share_its_resolved_fields_and_read_plan(tmp_path: Path) -> None:
    # Many devices of one profile (the benchmark: 200 x 125 registers): the profile's fields are
    # resolved once (templates with their decoders) and planned once; a device keeps its own
    # series names, and per-field state only for fields that need it.
    profile = tmp_path / "counter.toml"
    profile.write_text(
        'table = "holding"\n'
        + "".join(f'[[fields]]\nname = "r{i}"\naddress = {i}\n' for i in range(125))
    )
    devs: list[dict[str, Any]] = [
        {"name": f"u{u}", "unit": u, "profile": str(profile)} for u in (1, 2, 3)
    ]
    devs.append({"name": "x", "unit": 9, "profile": str(profile), "word_order": "DCBA"})
    devs.append({"name": "y", "unit": 8, "profile": str(profile), "series_prefix": "why"})
    cfg = ModbusSourceConfig.model_validate(
        {"name": "s", "type": "modbus", "host": "h", "devices": devs}
    )
    maps = [d.field_map() for d in cfg.devices]
    assert maps[0].fields is maps[1].fields is maps[2].fields is maps[4].fields
    assert maps[3].fields is not maps[0].fields  # other defaults: resolved apart
    assert maps[1].series[:2] == ("u2.r0", "u2.r1") and maps[4].series[-1] == "why.r124"
    assert cfg.devices[1].resolved_fields()[5] == ResolvedField(
        FieldSpec("u2.r5", "holding", 5, "uint16"), "r5", None, None, False,
        f"profile {profile} fields[5]",
    )  # fmt: skip
    assert list(cfg.series_names())[125:127] == ["u2.r0", "u2.r1"]
    src = ModbusSource(cfg, REPO)
    built = {d.name: d for c in src._conns for d in c.devices}
    assert built["u1"].plan is built["u2"].plan is built["y"].plan
    assert built["u2"].fields is maps[1].fields and built["u2"].series is maps[1].series
    assert not any(d.field_states for d in built.values())


async def test_a_cancel_arriving_with_an_answer_still_stops_the_source(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # pymodbus waits for an answer with asyncio.wait_for, which on Python 3.11 returns the answer
    # and drops a cancellation arriving with it; the source must stop all the same (or the
    # gateway's shutdown would wait for it forever).
    original = ModbusLink.read
    in_read = asyncio.Event()
    drop = True

    async def read_dropping_cancel(self: ModbusLink, *args: Any) -> Any:
        res = await original(self, *args)
        in_read.set()
        try:
            await asyncio.Event().wait()  # the cancellation arrives here, with the answer in hand
        except asyncio.CancelledError:
            if not drop:
                raise
        return res

    monkeypatch.setattr(ModbusLink, "read", read_dropping_cancel)
    specs = [FieldSpec("d.a", "holding", 0, "uint16")]
    async with ModbusSimulator({1: specs}) as sim:
        src = ModbusSource(make_cfg(sim, [device("d", 1, specs)]), REPO)
        task = asyncio.create_task(src.run(Collector().emit))
        async with asyncio.timeout(10):
            await in_read.wait()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        drop = False
        if not done:  # the bug: end the connection's task itself (the group will not again)
            for t in asyncio.all_tasks():
                if t.get_name().startswith("modbus:"):
                    t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await src.aclose()
    assert done and task.cancelled()
