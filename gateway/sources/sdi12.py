"""SDI-12 through a transparent serial adapter: reply parsing (pure) and the source.

A measurement cycle per sensor: ``aM!`` (or ``aMn!``; ``aMC!`` with CRC) answered ``atttn``; the
sensor has the data after ``ttt`` seconds, or earlier when it sends a service request ``a<CR><LF>``;
then ``aD0!``, ``aD1!``, ... until the announced ``n`` values are read. Concurrent sensors
(``command = "C"``, ``aC!`` answered ``atttnn``) are all started first and read after their
``ttt``; they send no service request. One bus per source, so commands never overlap.

The parsing functions raise nothing but :class:`Sdi12Error` (a
:class:`~gateway.sources.line_parsers.LineRejected`; ``kind`` is ``reply`` or ``crc``).
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
from typing import Literal, TypeVar

import structlog
from pydantic import Field, field_validator

from gateway.configbase import Strict
from gateway.models import Reading
from gateway.sources.base import Emit, SourceStats, now_ms
from gateway.sources.line_parsers import SKIP, LineRejected, decode_line
from gateway.sources.serial import (
    FaultLog,
    LineChannel,
    LineFramer,
    PortLink,
    PortLost,
    SerialConfigBase,
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


def format_values(values: Iterable[float], decimals: int = 3) -> str:
    """``[1.5, -2]`` -> ``+1.500-2.000``: each value signed, at most 7 digits."""
    out = []
    for v in values:
        text = f"{v:+.{decimals}f}"
        digits = text[1:].replace(".", "")
        if len(digits) > 7:  # SDI-12 values carry at most 7 digits: drop decimals to fit
            text = f"{v:+.{max(0, decimals - (len(digits) - 7))}f}"
        out.append(text)
    return "".join(out)


def format_data_reply(address: str, values: Iterable[float], *, crc: bool = False) -> str:
    """A data reply ``a<values>[CRC]`` without the line end."""
    body = f"{address}{format_values(values)}"
    return body + crc_ascii(crc16(body.encode("ascii"))) if crc else body


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


class Sdi12SensorConfig(Strict):
    #: Sensor address; "?" discovers it with ``?!`` (only with a single sensor on the bus).
    address: str = Field(pattern=r"^[0-9A-Za-z?]$")
    #: "M", "M1".."M9" (sequential, service request) or "C", "C1".."C9" (concurrent).
    command: str = Field(default="M", pattern=r"^[MC][1-9]?$")
    crc: bool = False
    #: Full series names per value, in order ("" or "-" skip a value; values past the end of
    #: the list are not emitted). Default: ``<series_prefix><address>.<n>``, n counted from 1.
    series: list[str] | None = None

    @property
    def concurrent(self) -> bool:
        return self.command.startswith("C")


class Sdi12Config(SerialConfigBase):
    """``type = "sdi12"``: sensors on one SDI-12 bus behind a transparent serial adapter."""

    type: Literal["sdi12"]
    sensors: list[Sdi12SensorConfig] = Field(min_length=1)
    interval_s: float = Field(default=60.0, gt=0)
    #: How long a sensor may take to answer a command (adapters add latency).
    response_timeout_s: float = Field(default=1.0, gt=0, le=30)
    #: Extra tries of a command that got no or a damaged reply.
    retries: int = Field(default=2, ge=0, le=10)
    #: Break before each command, for raw adapters (0: the adapter wakes the bus itself).
    break_ms: int = Field(default=0, ge=0, le=1000)
    #: Margin over the announced wait before reading data without a service request.
    wait_margin_s: float = Field(default=0.1, ge=0)
    series_prefix: str | None = None

    @field_validator("sensors")
    @classmethod
    def _addresses(cls, v: list[Sdi12SensorConfig]) -> list[Sdi12SensorConfig]:
        addrs = [s.address for s in v]
        if "?" in addrs and len(v) > 1:
            raise ValueError('address "?" (discover) needs a single sensor on the bus')
        dups = sorted({a for a in addrs if addrs.count(a) > 1})
        if dups:
            raise ValueError(f"sensor addresses must be unique, repeated: {', '.join(dups)}")
        return v

    def prefix(self) -> str:
        return self.series_prefix if self.series_prefix is not None else f"{self.name}."

    def series_names(self) -> Iterable[str] | None:
        out: list[str] = []
        for s in self.sensors:
            if s.series is None:
                return None  # the value count is announced by the sensor at run time
            out.extend(n for n in s.series if n not in SKIP)
        return out


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
            cycles=0, service_requests=0, overruns=0,
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

    async def _exchange(
        self, channel: LineChannel, cmd: str, parse: Callable[[str], T]
    ) -> T:
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
