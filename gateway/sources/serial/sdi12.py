"""SDI-12 through a transparent serial adapter: reply parsing (pure) and the source.

A measurement cycle per sensor: ``aM!`` (or ``aMn!``; ``aMC!`` with CRC) answered ``atttn``; the
sensor has the data after ``ttt`` seconds, or earlier when it sends a service request ``a<CR><LF>``;
then ``aD0!``, ``aD1!``, ... until the announced ``n`` values are read. Concurrent sensors
(``command = "C"``, ``aC!`` answered ``atttnn``) are all started first and read after their
``ttt``; they send no service request. One bus per source, so commands never overlap.

The parsing functions raise nothing but :class:`Sdi12Error` (a
:class:`~gateway.sources.serial.parsers.LineRejected`; ``kind`` is ``reply`` or ``crc``).
The gateway only reads replies (its CRC functions verify them); replies for tests come from the
sensor simulator's own encoder, written separately (``gateway/sandbox/serial_sim.py``).
A measurement whose replies are damaged, incomplete or missing yields no reading at all; it is
counted per sensor and retried on the next cycle. Transparent USB adapters often run 9600 8N1;
raw SDI-12 is 1200 7E1 with a break before each command (``break_ms``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from gateway.models import Reading
from gateway.sources.base import Emit, SourceStats, now_ms
from gateway.sources.serial.config import (
    SKIP,
    Sdi12Config,
    Sdi12SensorConfig,
)
from gateway.sources.serial.parsers import LineRejected, decode_line
from gateway.sources.serial.port import (
    FaultLog,
    LineChannel,
    LineFramer,
    PortLink,
    PortLost,
    SerialPort,
)

log = structlog.get_logger(__name__)

_ADDRESS = re.compile(r"[0-9A-Za-z]")
_VALUE = re.compile(r"[+-](?:\d+\.?\d*|\.\d+)")
_VALUES = re.compile(r"[+-][0-9.]*")

T = TypeVar("T")


class Sdi12Error(LineRejected):
    """A reply that cannot be used; ``kind`` is ``reply`` (malformed) or ``crc``."""


#: Characters of an SDI-12 CRC at the end of a data reply.
CRC_CHARS = 3


def crc16(data: bytes) -> int:
    """SDI-12 CRC: CRC-16/ARC (reflected poly 0xA001, initial 0) over address and values."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def crc_ascii(crc: int) -> str:
    """The three printable characters an SDI-12 sensor sends for ``crc``."""
    return "".join(chr(0x40 | ((crc >> shift) & 0x3F)) for shift in (12, 6, 0))


@dataclass(frozen=True, slots=True)
class Started:
    """A measurement's announcement: data ready after ``seconds``, ``count`` values."""

    address: str
    seconds: int
    count: int


def _own(line: str, address: str) -> str:
    if not line.startswith(address):
        raise Sdi12Error("reply", f"reply {line[:20]!r} is not from sensor {address!r}")
    return line[len(address) :]


def decode_reply(raw: bytes) -> str:
    """One framed reply line as text, as the source reads it. The CRC's three characters are
    ``0x40 | 6 bits`` (0x7F, DEL, included), so DEL is let through there; :func:`parse_data`
    checks the CRC, and rejects DEL in a reply without one."""
    return decode_line(raw, del_in_last=CRC_CHARS)


def parse_address_reply(line: str) -> str:
    """Reply to ``?!``: the one address on the bus."""
    if len(line) != 1 or not _ADDRESS.fullmatch(line):
        raise Sdi12Error("reply", f"bad address reply {line[:20]!r}")
    return line


def parse_started(line: str, address: str, *, concurrent: bool) -> Started:
    """``atttn`` (M) or ``atttnn`` (C) into wait seconds and value count."""
    rest = _own(line, address)
    digits = 5 if concurrent else 4
    if len(rest) != digits or not rest.isdigit() or not rest.isascii():
        raise Sdi12Error("reply", f"bad measurement reply {line[:20]!r}")
    return Started(address, int(rest[:3]), int(rest[3:]))


def is_service_request(line: str, address: str) -> bool:
    return line == address


def parse_data(line: str, address: str, *, crc: bool) -> list[float]:
    """``a<values>[CRC]`` into values (none: the sensor has no more data)."""
    rest = _own(line, address)
    if crc:
        if len(rest) < 3:
            raise Sdi12Error("crc", f"reply {line[:20]!r} has no CRC")
        body, sent = line[:-3], rest[-3:]
        if crc_ascii(crc16(body.encode("ascii", "replace"))) != sent:
            raise Sdi12Error("crc", f"CRC {sent!r} does not match {line[:40]!r}")
        rest = rest[:-3]
    parts = _VALUES.findall(rest)
    if "".join(parts) != rest:
        raise Sdi12Error("reply", f"bad data reply {line[:40]!r}")
    for p in parts:
        if not _VALUE.fullmatch(p) or sum(c.isdigit() for c in p) > 7:  # spec: <= 7 digits
            raise Sdi12Error("reply", f"bad value {p!r} in {line[:40]!r}")
    return [float(p) for p in parts]


def measurement_command(address: str, command: str, *, crc: bool) -> str:
    """``M``/``M1``/``C``.. with CRC flag to the command text: ``0MC1!``."""
    return f"{address}{command[0]}{'C' if crc else ''}{command[1:]}!"


# ----------------------------------------------------------------------------------------------
# Config and source


class _NoReply(Exception):
    """A command got no usable reply after every retry (kept inside this module)."""


class Sdi12Source:
    """Polls every sensor on one bus each ``interval_s``; one batch of readings per cycle."""

    def __init__(self, cfg: Sdi12Config) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.stats = SourceStats()
        self._faults = FaultLog(cfg.name, self.stats)
        self._link = PortLink(cfg, self.stats, self._faults)
        self._addr: dict[str, str] = {s.address: s.address for s in cfg.sensors}
        self.stats.detail.update(
            cycles=0,
            service_requests=0,
            overruns=0,
            sensors={s.address: {"ok": 0, "failed": 0, "last_error": None} for s in cfg.sensors},
        )

    async def run(self, emit: Emit) -> None:
        """Read until cancelled (or until ``aclose``); port faults are handled inside."""
        await self._link.run(lambda port: self._session(port, emit))

    async def aclose(self) -> None:
        self._link.close()

    # -- scheduling ---------------------------------------------------------------------------

    async def _session(self, port: SerialPort, emit: Emit) -> None:
        channel = LineChannel(port, LineFramer(b"\n", 160, None), self._faults)
        loop = asyncio.get_running_loop()
        if "?" in self._addr:
            self._addr["?"] = await self._discover(channel)
            log.info("sdi12_address_found", source=self.name, address=self._addr["?"])
        next_at = loop.time()
        while True:
            # Listen between cycles: stray bytes are dropped, and an unplugged adapter ends the
            # session now rather than at the next command.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_at - loop.time())):
                    while True:
                        await channel.read_lines()
            batch = await self._cycle(channel)
            self.stats.detail["cycles"] += 1
            if batch:
                await emit(batch)
            next_at += self.cfg.interval_s
            if next_at < loop.time():  # overran the interval: skip the missed slots
                self.stats.detail["overruns"] += 1
                next_at = loop.time() + self.cfg.interval_s

    async def _discover(self, channel: LineChannel) -> str:
        try:
            return await self._exchange(channel, "?!", parse_address_reply)
        except _NoReply:
            raise PortLost(channel.port.path, "no sensor answered ?!") from None

    async def _cycle(self, channel: LineChannel) -> list[Reading]:
        """One measurement of every sensor: concurrent ones started first, read last."""
        loop = asyncio.get_running_loop()
        out: list[Reading] = []
        succeeded = 0
        waiting: list[tuple[Sdi12SensorConfig, Started, float]] = []
        for s in (s for s in self.cfg.sensors if s.concurrent):
            started = await self._start(channel, s)
            if started is not None:
                waiting.append((s, started, loop.time() + started.seconds))
        for s in (s for s in self.cfg.sensors if not s.concurrent):
            started = await self._start(channel, s)
            if started is not None:
                await self._await_service_request(channel, started)
                got = await self._collect(channel, s, started)
                if got is not None:
                    succeeded += 1
                    out.extend(got)
        for s, started, ready_at in waiting:
            await asyncio.sleep(max(0.0, ready_at - loop.time()))
            got = await self._collect(channel, s, started)
            if got is not None:
                succeeded += 1
                out.extend(got)
        if succeeded:
            self.stats.ok(len(out))
        failed = len(self.cfg.sensors) - succeeded
        if failed:
            self.stats.state = "degraded" if succeeded else "failing"
        self.stats.detail["failed_sensors"] = failed
        return out

    # -- one sensor ---------------------------------------------------------------------------

    async def _start(self, channel: LineChannel, s: Sdi12SensorConfig) -> Started | None:
        addr = self._addr[s.address]
        cmd = measurement_command(addr, s.command, crc=s.crc)
        try:
            return await self._exchange(
                channel, cmd, lambda line: parse_started(line, addr, concurrent=s.concurrent)
            )
        except _NoReply as exc:
            self._failed(s, f"{cmd}: {exc}")
            return None

    async def _await_service_request(self, channel: LineChannel, started: Started) -> None:
        if started.seconds == 0 or started.count == 0:
            return
        try:
            async with asyncio.timeout(started.seconds + self.cfg.wait_margin_s):
                while True:
                    line = self._text(await channel.read_line())
                    if line is not None and is_service_request(line, started.address):
                        self.stats.detail["service_requests"] += 1
                        return
        except TimeoutError:
            return  # no service request: the data is due now anyway

    async def _collect(
        self, channel: LineChannel, s: Sdi12SensorConfig, started: Started
    ) -> list[Reading] | None:
        """The announced values as readings; None (counted) when any reply failed."""
        addr = started.address
        values: list[float] = []
        ts = now_ms()
        try:
            for i in range(10):
                if len(values) >= started.count:
                    break
                got = await self._exchange(
                    channel, f"{addr}D{i}!", lambda line: parse_data(line, addr, crc=s.crc)
                )
                if not got:
                    break
                values.extend(got)
        except _NoReply as exc:
            self._failed(s, f"{addr}D: {exc}")
            return None
        if len(values) != started.count:
            self._failed(s, f"{len(values)} values, {started.count} announced")
            return None
        self.stats.detail["sensors"][s.address]["ok"] += 1
        self._faults.good()
        return [Reading(name, ts, v) for name, v in self._named(s, addr, values)]

    def _named(
        self, s: Sdi12SensorConfig, addr: str, values: list[float]
    ) -> Iterable[tuple[str, float]]:
        for i, v in enumerate(values):
            if s.series is None:
                yield f"{self.cfg.prefix()}{addr}.{i + 1}", v
            elif i < len(s.series) and s.series[i] not in SKIP:
                yield s.series[i], v

    def _failed(self, s: Sdi12SensorConfig, message: str) -> None:
        entry = self.stats.detail["sensors"][s.address]
        entry["failed"] += 1
        entry["last_error"] = message
        self._faults.error("sensor", message, event="sdi12_sensor_failed", address=s.address)

    # -- one command --------------------------------------------------------------------------

    def _text(self, raw: bytes) -> str | None:
        try:
            return decode_reply(raw)
        except LineRejected as exc:
            self._faults.rejected(exc.kind, str(exc), line=repr(raw[:60]))
            return None

    async def _exchange(self, channel: LineChannel, cmd: str, parse: Callable[[str], T]) -> T:
        """Send ``cmd`` and parse its reply; retried on silence or a damaged reply."""
        cfg = self.cfg
        # Bytes on the wire take time at slow rates; the reply timer starts after them.
        timeout = cfg.response_timeout_s + len(cmd) * 10 / cfg.baudrate
        problem = "no reply"
        for _ in range(cfg.retries + 1):
            channel.flush()
            if cfg.break_ms:
                await channel.port.send_break(cfg.break_ms / 1000)
            try:
                async with asyncio.timeout(timeout):
                    await channel.port.write(cmd.encode("ascii"))
            except TimeoutError:
                raise PortLost(channel.port.path, "write stuck (flow control?)") from None
            try:
                async with asyncio.timeout(timeout):
                    return await self._reply(channel, cmd, parse)
            except TimeoutError:
                problem = "no reply"
            except Sdi12Error as exc:
                problem = str(exc)
                self._faults.rejected(exc.kind, problem, event="sdi12_reply_rejected", command=cmd)
        raise _NoReply(problem)

    async def _reply(self, channel: LineChannel, cmd: str, parse: Callable[[str], T]) -> T:
        while True:
            line = self._text(await channel.read_line())
            if line is None:
                continue
            if line.startswith(cmd):  # half-duplex adapters echo the command
                line = line[len(cmd) :]
            if line:
                return parse(line)
