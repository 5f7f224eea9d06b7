"""The serial sources against simulated devices on real ptys (gateway/sandbox/serial_sim.py).

Synchronisation is by events: the emit callback and the position board signal every change and
the tests wait for a condition on what arrived. Devices "resend until heard" only while the
source may still be opening the port (pyserial flushes input on open).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.models import Position, Reading
from gateway.sandbox.serial_sim import (
    GpsSim,
    LineLoggerSim,
    Sdi12BusSim,
    SimSensor,
    nmea_gga,
    nmea_sentence,
)
from gateway.sources.base import Source, now_ms
from gateway.sources.position import PositionBoard, positioned_emit
from gateway.sources.serial.config import NmeaConfig, Sdi12Config, SerialLinesConfig
from gateway.sources.serial.lines import SerialLinesSource
from gateway.sources.serial.nmea import NmeaSource
from gateway.sources.serial.port import PortLost, SerialPort
from gateway.sources.serial.sdi12 import Sdi12Source

FAST = {"reconnect_min_s": 0.02, "reconnect_max_s": 0.1}


class Collector:
    """The emit callback of a test: keeps every reading, signals every batch."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self.changed = asyncio.Event()

    async def emit(self, batch: Sequence[Reading]) -> None:
        self.readings.extend(batch)
        self.changed.set()

    def values(self, series: str) -> list[Any]:
        return [r.value for r in self.readings if r.series == series]


class RecordingBoard(PositionBoard):
    """A position board that keeps every publish and signals it."""

    def __init__(self) -> None:
        super().__init__()
        self.history: list[Position | None] = []
        self.changed = asyncio.Event()

    def publish(self, source_name: str, position: Position | None, at_ms: int) -> None:
        super().publish(source_name, position, at_ms)
        self.history.append(position)
        self.changed.set()


async def wait_until(cond: Callable[[], bool], changed: asyncio.Event) -> None:
    """Wait (at most 10 s) until ``cond`` holds, re-checking whenever ``changed`` is set."""
    async with asyncio.timeout(10):
        while not cond():
            changed.clear()
            await changed.wait()


async def resend_until(
    send: Callable[[], Awaitable[Any]], cond: Callable[[], bool], changed: asyncio.Event
) -> None:
    """Send until ``cond`` holds: the source may still be opening the port (open flushes)."""
    async with asyncio.timeout(10):
        while not cond():
            await send()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.1):  # resend cadence: 10 per second
                    await wait_until(cond, changed)


@contextlib.asynccontextmanager
async def running(
    source: Source, emit: Callable[[Sequence[Reading]], Awaitable[None]]
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(emit), name=f"poll:{source.name}")
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # anything but cancellation (a crash) fails the test here
        await source.aclose()
        await source.aclose()  # idempotent


def near(a: Position | None, b: Position) -> bool:
    return a is not None and abs(a.lat - b.lat) < 1e-6 and abs(a.lon - b.lon) < 1e-6


# -- line loggers -------------------------------------------------------------------------------


def lines_cfg(path: Path, **kw: Any) -> SerialLinesConfig:
    return SerialLinesConfig.model_validate(
        {"type": "serial_lines", "name": "log1", "port": str(path), **FAST, **kw}
    )


async def test_lines_become_readings_with_logger_timestamps(tmp_path: Path) -> None:
    cfg = lines_cfg(
        tmp_path / "tty",
        parser={"kind": "delimited", "columns": ["time", "temp", "rh"]},
        timestamp={"field": "time", "format": "%Y-%m-%d %H:%M:%S", "timezone": "+01:00"},
        series={"rh": "site.rh"},
    )
    c = Collector()
    source = SerialLinesSource(cfg)
    assert isinstance(source, Source)
    async with LineLoggerSim(tmp_path / "tty") as sim, running(source, c.emit):
        await resend_until(
            lambda: sim.write_line("2024-03-01 00:00:00,0,0"), lambda: bool(c.readings), c.changed
        )
        await sim.write_line("2024-03-01 12:00:00,21.5,40")
        await sim.write_line("2024-03-01 12:00:10,-3.25,41")
        await wait_until(lambda: len(fresh(c)) >= 4, c.changed)
    t0 = 1709290800000  # 11:00 UTC
    assert fresh(c) == [
        Reading("log1.temp", t0, 21.5),
        Reading("site.rh", t0, 40.0),
        Reading("log1.temp", t0 + 10_000, -3.25),
        Reading("site.rh", t0 + 10_000, 41.0),
    ]
    assert source.stats.rejected == 0
    assert source.stats.state == "ok"


def fresh(c: Collector) -> list[Reading]:
    """Readings after priming (the primer lines carry the value 0)."""
    return [r for r in c.readings if r.value != 0]


async def test_keyvalue_lines_take_arrival_time(tmp_path: Path) -> None:
    cfg = lines_cfg(
        tmp_path / "tty",
        parser={"kind": "keyvalue"},
        series_prefix="wx.",
        terminator="\r",
        ignore_pattern="^#",
    )
    c = Collector()
    async with (
        LineLoggerSim(tmp_path / "tty", terminator=b"\r") as sim,
        running(SerialLinesSource(cfg), c.emit),
    ):
        await resend_until(lambda: sim.write_line("T=0"), lambda: bool(c.readings), c.changed)
        before = now_ms()
        await sim.write_line("# logger banner")
        await sim.write_line("T=21.5 RH=40 BAT=12.6")
        await wait_until(lambda: len(fresh(c)) >= 3, c.changed)
        after = now_ms()
    assert {r.series: r.value for r in fresh(c)} == {"wx.T": 21.5, "wx.RH": 40.0, "wx.BAT": 12.6}
    assert all(before <= r.ts <= after for r in fresh(c))


async def test_damaged_lines_are_counted_and_never_read(tmp_path: Path) -> None:
    cfg = lines_cfg(
        tmp_path / "tty", parser={"kind": "delimited", "columns": ["n", "v"]}, max_line_bytes=64
    )
    c = Collector()
    source = SerialLinesSource(cfg)
    async with LineLoggerSim(tmp_path / "tty") as sim, running(source, c.emit):
        await resend_until(lambda: sim.write_line("0,0"), lambda: bool(c.readings), c.changed)
        await sim.write_garbage(40)  # wrong baud rate
        await sim.write_overlong(300)
        await sim.write_line("1,2,3")  # a column too many
        await sim.write_partial("7,7")  # cut off, then spliced with the next line
        await sim.write_line("8,8")
        await sim.write_line("9,1e999")  # not a finite number
        await sim.write_line("\x01\x02\x03")  # line noise
        await sim.write_line("100,42")
        await wait_until(lambda: 100.0 in c.values("log1.n"), c.changed)
    assert [(r.series, r.value) for r in fresh(c)] == [("log1.n", 100.0), ("log1.v", 42.0)]
    faults = source.stats.detail["faults"]
    assert faults == {"decode": 1, "overlong": 1, "parse": 2, "value": 1, "garbage": 1}
    assert source.stats.rejected == 6
    assert source.stats.errors == 0


async def test_partial_line_after_silence_is_dropped(tmp_path: Path) -> None:
    cfg = lines_cfg(
        tmp_path / "tty",
        parser={"kind": "delimited", "columns": ["n", "v"]},
        partial_line_timeout_s=0.05,
    )
    c = Collector()
    source = SerialLinesSource(cfg)
    async with LineLoggerSim(tmp_path / "tty") as sim, running(source, c.emit):
        await resend_until(lambda: sim.write_line("0,0"), lambda: bool(c.readings), c.changed)
        await sim.write_partial("5,")  # the logger resets mid-line ...
        await asyncio.sleep(0.5)  # ... and stays silent: the gap is the fault under test
        await sim.write_line("6,6")
        await wait_until(lambda: 6.0 in c.values("log1.n"), c.changed)
    assert [(r.series, r.value) for r in fresh(c)] == [("log1.n", 6.0), ("log1.v", 6.0)]
    assert source.stats.detail["faults"] == {"partial": 1}


async def test_source_waits_for_the_port_and_resumes_after_replug(tmp_path: Path) -> None:
    cfg = lines_cfg(tmp_path / "tty", parser={"kind": "delimited", "columns": ["n"]})
    c = Collector()
    source = SerialLinesSource(cfg)
    sim = LineLoggerSim(tmp_path / "tty")
    async with running(source, c.emit):
        await asyncio.sleep(0)  # one loop turn: the source's first open attempt
        assert source.stats.state == "port_unavailable"
        assert source.stats.detail["faults"]["open_failed"] >= 1
        async with sim:
            await resend_until(lambda: sim.write_line("1"), lambda: bool(c.readings), c.changed)
            assert source.stats.detail["port_open"]
            sim.unplug()  # the USB adapter is pulled ...
            sim.plug()  # ... and plugged back in
            await resend_until(
                lambda: sim.write_line("2"), lambda: 2.0 in c.values("log1.n"), c.changed
            )
    assert source.stats.detail["faults"]["port_lost"] >= 1
    assert source.stats.detail["opens"] >= 2
    assert set(c.values("log1.n")) == {1.0, 2.0}


async def test_aclose_ends_run_and_run_restarts_after_a_crash(tmp_path: Path) -> None:
    cfg = lines_cfg(tmp_path / "tty", parser={"kind": "delimited", "columns": ["n"]})
    source = SerialLinesSource(cfg)
    c = Collector()
    crash = True  # the first batch makes emit raise

    async def emit(batch: Sequence[Reading]) -> None:
        nonlocal crash
        await c.emit(batch)
        if crash:
            crash = False
            raise RuntimeError("store exploded")  # the supervisor restarts run() on this

    async with LineLoggerSim(tmp_path / "tty") as sim:
        first = asyncio.create_task(source.run(emit), name="poll:log1")
        await resend_until(lambda: sim.write_line("4"), lambda: bool(c.readings), c.changed)
        with pytest.raises(RuntimeError):
            await first
        assert not source.stats.detail["port_open"]  # a crash leaves no port open
        again = asyncio.create_task(source.run(emit), name="poll:log1")
        try:
            await resend_until(
                lambda: sim.write_line("5"), lambda: 5.0 in c.values("log1.n"), c.changed
            )
            await source.aclose()
            async with asyncio.timeout(10):
                await again  # returns: no reopen after aclose
        finally:
            again.cancel()
    assert source.stats.state == "closed"
    assert source.stats.detail["opens"] == 2


async def test_port_notices_a_vanished_device(tmp_path: Path) -> None:
    cfg = lines_cfg(tmp_path / "tty", parser={"kind": "keyvalue"})
    async with LineLoggerSim(tmp_path / "tty") as sim:
        port = SerialPort(cfg)
        port.open()
        try:
            assert port.still_present()
            await sim.write_line("a=1")
            assert (await port.read()).startswith(b"a=1")
            sim.unplug()
            assert not port.still_present()
            with pytest.raises(PortLost):
                await port.read()
            with pytest.raises(PortLost):
                await port.write(b"x")
        finally:
            port.close()
            port.close()


# -- GPS ----------------------------------------------------------------------------------------


def gps_cfg(path: Path, **kw: Any) -> NmeaConfig:
    return NmeaConfig.model_validate(
        {"type": "nmea", "name": "gps", "port": str(path), **FAST, **kw}
    )


HOME = Position(55.676111, 12.568333, 14.2)
AWAY = Position(48.1173, 11.516667, 545.4)
ELSEWHERE = Position(-33.865, 151.209444, 3.0)


async def test_gps_publishes_fixes_and_honours_fix_quality(tmp_path: Path) -> None:
    cfg = gps_cfg(
        tmp_path / "gps", emit=["lat", "lon", "alt", "satellites", "fix_quality"], max_hdop=5.0
    )
    board, c = RecordingBoard(), Collector()
    source = NmeaSource(cfg, board)
    assert isinstance(source, Source)
    async with GpsSim(tmp_path / "gps", talker="GN") as gps, running(source, c.emit):
        gps.set_fix(HOME, satellites=9)
        await resend_until(
            gps.send_epoch, lambda: near(board.latest("gps", 10), HOME), board.changed
        )
        latest = board.latest("gps", 10)
        assert near(latest, HOME) and latest is not None and latest.alt == 14.2
        await wait_until(lambda: bool(c.values("gps.lat")), c.changed)
        assert c.values("gps.lat")[-1] == pytest.approx(HOME.lat)
        assert c.values("gps.satellites")[-1] == 9
        assert c.values("gps.fix_quality")[-1] == 1
        assert source.stats.detail["fix"] == "fix"

        # GGA quality 0: no fix, whatever the receiver still prints. (Each step starts from a
        # fix, so a tail of None can only come from the sentences sent in that step.)
        gps.set_fix(None, satellites=2)
        await gps.send_epoch()
        await wait_until(lambda: board.history[-2:] == [None, None], board.changed)
        assert board.latest("gps", 10) is None
        assert source.stats.detail["fix"] == "no_fix"
        await wait_until(lambda: c.values("gps.fix_quality")[-1] == 0, c.changed)

        # Dead reckoning (quality 6) is not among the accepted qualities by default.
        gps.set_fix(HOME)
        await gps.send_epoch()
        await wait_until(lambda: near(board.history[-1], HOME), board.changed)
        await gps.send_sentence(nmea_gga(datetime.now(UTC).time(), AWAY, quality=6))
        await wait_until(lambda: board.history[-1] is None, board.changed)

        # RMC status V voids the fix.
        await gps.send_epoch()
        await wait_until(lambda: near(board.history[-1], HOME), board.changed)
        await gps.send_sentence(nmea_sentence("GNRMC,120000.00,V,,,,,,,010124,,,N"))
        await wait_until(lambda: board.history[-1] is None, board.changed)

        # Too imprecise for the configured max_hdop: GGA says no, and RMC defers to GGA.
        await gps.send_epoch()
        await wait_until(lambda: near(board.history[-1], HOME), board.changed)
        gps.set_fix(HOME, hdop=9.9)
        await gps.send_epoch()
        await wait_until(lambda: board.history[-2:] == [None, None], board.changed)

        # A bad checksum never becomes a position; the next good sentence does.
        await gps.send_bad_checksum(AWAY)
        await gps.send_other()
        gps.set_fix(ELSEWHERE)
        await gps.send_epoch()
        await wait_until(lambda: near(board.history[-1], ELSEWHERE), board.changed)
    assert not any(near(p, AWAY) for p in board.history)
    assert source.stats.detail["faults"] == {"checksum": 1}
    assert source.stats.detail["sentences"]["other"] == 1
    assert not any(r.value == pytest.approx(AWAY.lat) for r in c.readings)


async def test_gps_port_loss_withdraws_the_fix_and_positions_follow(tmp_path: Path) -> None:
    board = RecordingBoard()
    gps_c, log_c = Collector(), Collector()
    fixed = Position(1.0, 2.0)
    log_emit = positioned_emit(log_c.emit, board, position_from="gps", fixed=fixed, max_age_s=30)
    logger = SerialLinesSource(lines_cfg(tmp_path / "tty", parser={"kind": "keyvalue"}))
    async with (
        GpsSim(tmp_path / "gps") as gps,
        LineLoggerSim(tmp_path / "tty") as sim,
        running(NmeaSource(gps_cfg(tmp_path / "gps"), board), gps_c.emit),
        running(logger, log_emit),
    ):
        gps.set_fix(HOME)
        await resend_until(
            gps.send_epoch, lambda: near(board.latest("gps", 30), HOME), board.changed
        )
        await resend_until(
            lambda: sim.write_line("level=1"), lambda: bool(log_c.readings), log_c.changed
        )
        assert all(near(r.position, HOME) for r in log_c.readings)

        gps.unplug()
        await wait_until(lambda: board.history[-1] is None, board.changed)
        assert board.latest("gps", 30) is None
        await sim.write_line("level=2")
        await wait_until(lambda: 2.0 in log_c.values("log1.level"), log_c.changed)
        second = next(r for r in log_c.readings if r.value == 2.0)
        assert second.position == fixed  # no GPS fix: the configured position
    assert gps_c.readings == []  # no own series configured


# -- SDI-12 -------------------------------------------------------------------------------------


def sdi_cfg(path: Path, sensors: list[dict[str, Any]], **kw: Any) -> Sdi12Config:
    return Sdi12Config.model_validate(
        {
            "type": "sdi12",
            "name": "bus",
            "port": str(path),
            "interval_s": 3600,
            "sensors": sensors,
            **FAST,
            **kw,
        }
    )


async def test_sdi12_two_sensors_wait_or_service_request(tmp_path: Path) -> None:
    sensors = [
        # Announces 5 s but is done after 0.2 s and says so with a service request.
        SimSensor("0", [21.5, -3.25], wait_s=5, ready_after_s=0.2, service_request=True),
        # Announces 1 s, sends no service request: data is there only after the wait.
        SimSensor(
            "1",
            [1.0, 2.0, 3.0, 4.0],
            wait_s=1,
            ready_after_s=0.6,
            service_request=False,
            values_per_reply=3,
        ),
    ]
    cfg = sdi_cfg(
        tmp_path / "bus",
        [{"address": "0", "series": ["soil.moist", "soil.temp"]}, {"address": "1"}],
    )
    c = Collector()
    source = Sdi12Source(cfg)
    assert isinstance(source, Source)
    async with Sdi12BusSim(tmp_path / "bus", sensors) as bus, running(source, c.emit):
        await wait_until(lambda: len(c.readings) >= 6, c.changed)
    assert {r.series: r.value for r in c.readings} == {
        "soil.moist": 21.5,
        "soil.temp": -3.25,
        "bus.1.1": 1.0,
        "bus.1.2": 2.0,
        "bus.1.3": 3.0,
        "bus.1.4": 4.0,
    }
    assert bus.commands == ["0M!", "0D0!", "1M!", "1D0!", "1D1!"]
    assert [s.early_reads for s in sensors] == [0, 0]  # the announced wait was honoured
    assert source.stats.detail["service_requests"] == 1
    assert source.stats.errors == 0 and source.stats.rejected == 0


async def test_sdi12_concurrent_measurement(tmp_path: Path) -> None:
    sensors = [
        SimSensor("2", [10.0], wait_s=1, ready_after_s=0.5),
        SimSensor("3", [1.5, 2.5, 3.5, 4.5, 5.5], wait_s=1, ready_after_s=0.5, values_per_reply=2),
    ]
    cfg = sdi_cfg(
        tmp_path / "bus", [{"address": "2", "command": "C"}, {"address": "3", "command": "C"}]
    )
    c = Collector()
    async with Sdi12BusSim(tmp_path / "bus", sensors) as bus, running(Sdi12Source(cfg), c.emit):
        await wait_until(lambda: len(c.readings) >= 6, c.changed)
    # Both measurements run at once: both started before either is read.
    assert bus.commands == ["2C!", "3C!", "2D0!", "3D0!", "3D1!", "3D2!"]
    assert [s.early_reads for s in sensors] == [0, 0]
    assert c.values("bus.2.1") == [10.0]
    assert [c.values(f"bus.3.{i}")[0] for i in range(1, 6)] == [1.5, 2.5, 3.5, 4.5, 5.5]


async def test_sdi12_crc_retry_and_a_silent_sensor(tmp_path: Path) -> None:
    sensors = [
        SimSensor("0", [7.25, 8.5], wait_s=0, ready_after_s=0, corrupt_crc=1),
        SimSensor("9", [1.0], absent=True),
    ]
    cfg = sdi_cfg(
        tmp_path / "bus",
        [{"address": "0", "crc": True}, {"address": "9"}],
        response_timeout_s=0.2,
        retries=1,
    )
    c = Collector()
    source = Sdi12Source(cfg)
    async with Sdi12BusSim(tmp_path / "bus", sensors) as bus, running(source, c.emit):
        await wait_until(lambda: source.stats.detail["cycles"] >= 1, c.changed)
    assert bus.commands == ["0MC!", "0D0!", "0D0!", "9M!", "9M!"]
    assert {r.series: r.value for r in c.readings} == {"bus.0.1": 7.25, "bus.0.2": 8.5}
    detail = source.stats.detail
    assert detail["faults"] == {"crc": 1, "sensor": 1}
    assert detail["sensors"]["9"]["failed"] == 1 and detail["sensors"]["0"]["ok"] == 1
    assert source.stats.state == "degraded" and detail["failed_sensors"] == 1


async def test_sdi12_bus_replugged_between_cycles(tmp_path: Path) -> None:
    sensors = [SimSensor("0", [4.0], wait_s=0, ready_after_s=0)]
    cfg = sdi_cfg(tmp_path / "bus", [{"address": "0"}])
    c = Collector()
    source = Sdi12Source(cfg)
    async with Sdi12BusSim(tmp_path / "bus", sensors) as bus, running(source, c.emit):
        await wait_until(lambda: len(c.readings) == 1, c.changed)
        bus.replug()  # an hour before the next cycle: noticed at once, measured again on reopen
        await wait_until(lambda: len(c.readings) == 2, c.changed)
    assert bus.commands == ["0M!", "0D0!", "0M!", "0D0!"]
    assert source.stats.detail["faults"] == {"port_lost": 1}
    assert source.stats.detail["opens"] == 2


async def test_sdi12_address_discovery(tmp_path: Path) -> None:
    sensors = [SimSensor("5", [0.5], wait_s=0, ready_after_s=0)]
    cfg = sdi_cfg(tmp_path / "bus", [{"address": "?"}])
    c = Collector()
    async with Sdi12BusSim(tmp_path / "bus", sensors) as bus, running(Sdi12Source(cfg), c.emit):
        await wait_until(lambda: bool(c.readings), c.changed)
    assert bus.commands[:3] == ["?!", "5M!", "5D0!"]
    assert c.readings[0].series == "bus.5.1" and c.readings[0].value == 0.5
