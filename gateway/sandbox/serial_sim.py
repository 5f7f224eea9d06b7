"""Serial device simulators on a pty: a line logger, a GPS and an SDI-12 sensor bus.

Each simulator is an async context manager that creates a pseudo-terminal and a symlink at
``path`` pointing to its slave side, which a source opens like ``/dev/ttyUSB0``. The simulator
holds the master side in this process and event loop (no socat, no thread, no subprocess).

Callers may rely on:

- ``unplug()`` removes the symlink and closes the pty: an open source sees a hang-up, exactly as
  when a USB adapter is pulled; ``plug()`` creates a fresh pty behind the same path;
- writes while unplugged are dropped (the device talks to nobody), never raised;
- bytes written before the source opens the port may be flushed by its open (pyserial resets
  the input buffer), so tests resend until the first reading arrives;
- every task a simulator starts is cancelled and awaited on exit.

Fault injection: garbage bytes, partial and overlong lines, bad NMEA checksums, no-fix
sentences, silent SDI-12 sensors, corrupted SDI-12 CRCs, and unplug/replug.

What the devices send is transcribed here from the specifications (NMEA 0183 sentences and
checksum; SDI-12 v1.4 data replies and CRC), not imported from the client in
``gateway.sources``: a simulator that shares the client's encoder would agree with the client's
bugs. Only the shared models (:class:`~gateway.models.Position`) are imported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import tty
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as dt_time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from gateway.models import Position

log = structlog.get_logger(__name__)


# -- what the devices send, from the specifications ----------------------------------------------


def nmea_sentence(body: str) -> str:
    """NMEA 0183 framing: ``$``, the body, ``*`` and the checksum as two upper-case hex digits;
    the checksum is the exclusive OR of every byte between ``$`` and ``*``."""
    checksum = 0
    for byte in body.encode("ascii"):
        checksum ^= byte
    return f"${body}*{checksum:02X}"


def _nmea_angle(value: float, degree_digits: int, positive: str, negative: str) -> tuple[str, str]:
    """Degrees as NMEA ``(d)ddmm.mmmmmm`` and a hemisphere letter (integer micro-minutes)."""
    micro_minutes = round(abs(value) * 60_000_000)
    degrees, rest = divmod(micro_minutes, 60_000_000)
    minutes, fraction = divmod(rest, 1_000_000)
    text = f"{degrees:0{degree_digits}d}{minutes:02d}.{fraction:06d}"
    return text, positive if value >= 0 else negative


def _nmea_fields(position: Position | None) -> list[str]:
    """Latitude, N/S, longitude, E/W: four fields, all empty without a position."""
    if position is None:
        return ["", "", "", ""]
    return [*_nmea_angle(position.lat, 2, "N", "S"), *_nmea_angle(position.lon, 3, "E", "W")]


def _nmea_time(t: dt_time | datetime) -> str:
    return f"{t.hour:02d}{t.minute:02d}{t.second:02d}.{t.microsecond // 10_000:02d}"


def nmea_gga(
    t: dt_time,
    position: Position | None,
    *,
    quality: int = 1,
    satellites: int = 8,
    hdop: float = 0.9,
    talker: str = "GP",
) -> str:
    """GGA: time, lat, N/S, lon, E/W, quality, satellites, HDOP, altitude, M, geoid separation,
    M, age of differential data, reference station (the last two empty)."""
    alt = "" if position is None or position.alt is None else f"{position.alt:.1f}"
    fields = [
        f"{talker}GGA",
        _nmea_time(t),
        *_nmea_fields(position),
        str(quality),
        f"{satellites:02d}",
        f"{hdop:.1f}",
        alt,
        "M",
        "0.0",
        "M",
        "",
        "",
    ]
    return nmea_sentence(",".join(fields))


def nmea_rmc(utc: datetime, position: Position | None, *, talker: str = "GP") -> str:
    """RMC: time, status (A valid, V void), lat, N/S, lon, E/W, speed (knots), course, date
    ddmmyy, magnetic variation and its E/W (empty), mode (A autonomous, N not valid)."""
    fix = position is not None
    date = f"{utc.day:02d}{utc.month:02d}{utc.year % 100:02d}"
    fields = [
        f"{talker}RMC",
        _nmea_time(utc),
        "A" if fix else "V",
        *_nmea_fields(position),
        "0.0",
        "0.0",
        date,
        "",
        "",
        "A" if fix else "N",
    ]
    return nmea_sentence(",".join(fields))


def _crc16_arc_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        reg = index
        for _ in range(8):
            reg = (reg >> 1) ^ 0xA001 if reg & 1 else reg >> 1
        table.append(reg)
    return tuple(table)


_CRC16_ARC = _crc16_arc_table()


def sdi12_crc(data: bytes) -> int:
    """SDI-12 v1.4 section 4.4.12: CRC-16 with the reflected polynomial 0xA001 (x^16 + x^15 +
    x^2 + 1), initial value 0, over every character of the reply from the address up to the CRC
    (table-driven, byte at a time)."""
    crc = 0
    for byte in data:
        crc = (crc >> 8) ^ _CRC16_ARC[(crc ^ byte) & 0xFF]
    return crc


def sdi12_crc_chars(crc: int) -> str:
    """The CRC as three characters, 6 bits each OR 0x40 (0x40 '@' to 0x7F DEL), high bits first."""
    return chr(0x40 | (crc >> 12)) + chr(0x40 | ((crc >> 6) & 0x3F)) + chr(0x40 | (crc & 0x3F))


def sdi12_value(v: float) -> str:
    """A value as an SDI-12 sensor sends it: always signed, at most 7 digits, 3 decimals when
    they fit (fewer when they do not)."""
    for decimals in (3, 2, 1, 0):
        text = f"{v:+.{decimals}f}"
        if sum(ch.isdigit() for ch in text) <= 7:
            return text
    return f"{v:+.0f}"  # too large for SDI-12: sent anyway, the recorder has to reject it


def sdi12_values(values: Iterable[float]) -> str:
    """The ``<values>`` part of a data reply: each value signed, one after the other."""
    return "".join(sdi12_value(v) for v in values)


def sdi12_data_reply(address: str, values: Iterable[float], *, crc: bool) -> str:
    """``a<values>`` or ``a<values><CRC>`` (without the closing CR LF)."""
    body = address + sdi12_values(values)
    return body + sdi12_crc_chars(sdi12_crc(body.encode("ascii"))) if crc else body


class DeviceUnplugged(Exception):
    """The simulated device was unplugged while a read was waiting."""


class PtyDevice:
    """A simulated serial device reachable at ``path`` while plugged in."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._master = -1
        self._slave = -1
        self._waiters: set[asyncio.Future[None]] = set()
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.plugged_in = asyncio.Event()

    async def __aenter__(self) -> Self:
        self.plug()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop_tasks()
        self.unplug()

    # -- plugging ---------------------------------------------------------------------------------

    def plug(self) -> None:
        """Create a fresh pty behind ``path`` (a no-op while plugged)."""
        if self._master >= 0:
            return
        master, slave = os.openpty()
        tty.setraw(slave)  # raw before the source opens it: no echo, no CR/LF translation
        os.set_blocking(master, False)
        tmp = self.path.with_name(self.path.name + ".new")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(os.ttyname(slave), tmp)
        tmp.replace(self.path)
        self._master, self._slave = master, slave
        self.plugged_in.set()
        log.debug("sim_plugged", path=str(self.path), pty=os.ttyname(slave))

    def unplug(self) -> None:
        """Pull the device: the link vanishes and an open source sees a hang-up."""
        if self._master < 0:
            return
        self.plugged_in.clear()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._master)
        loop.remove_writer(self._master)
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(DeviceUnplugged(str(self.path)))
        os.close(self._master)
        os.close(self._slave)
        self._master = self._slave = -1
        log.debug("sim_unplugged", path=str(self.path))

    def replug(self) -> None:
        self.unplug()
        self.plug()

    # -- I/O ----------------------------------------------------------------------------------

    async def _wait(self, *, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fd = self._master
        fut: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, wake)
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if self._master == fd:
                (loop.remove_writer if writable else loop.remove_reader)(fd)

    async def write(self, data: bytes) -> int:
        """Send bytes to whoever has the port open; returns how many went out (0: unplugged).

        Concurrent writers are serialised, so lines from two tasks never interleave.
        """
        async with self._write_lock:
            return await self._write(data)

    async def _write(self, data: bytes) -> int:
        view = memoryview(data)
        sent = 0
        while view:
            if self._master < 0:
                return sent
            try:
                n = os.write(self._master, view)
            except BlockingIOError:
                n = 0
            except OSError:
                return sent
            sent += n
            view = view[n:]
            if view:
                try:
                    await self._wait(writable=True)
                except DeviceUnplugged:
                    return sent
        return sent

    def write_nowait(self, data: bytes) -> None:
        """Best-effort immediate write (timer callbacks); small replies always fit."""
        if self._master >= 0:
            with contextlib.suppress(OSError):
                os.write(self._master, data)

    async def read(self) -> bytes:
        """Bytes the source wrote; waits across unplug/replug."""
        while True:
            await self.plugged_in.wait()
            if self._master < 0:
                continue
            try:
                return os.read(self._master, 4096)
            except BlockingIOError:
                pass
            except OSError:  # EIO: nobody has the slave open right now
                pass
            with contextlib.suppress(DeviceUnplugged):
                await self._wait(writable=False)

    # -- tasks --------------------------------------------------------------------------------

    def start_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``coro`` until the simulator exits (cancelled and awaited in ``__aexit__``)."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop_tasks(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class LineLoggerSim(PtyDevice):
    """A logger writing one record per line, with fault injection."""

    def __init__(self, path: Path | str, terminator: bytes = b"\r\n") -> None:
        super().__init__(path)
        self.terminator = terminator
        self.lines_written = 0

    async def write_line(self, text: str) -> None:
        await self.write(text.encode("ascii") + self.terminator)
        self.lines_written += 1

    async def write_garbage(self, n: int = 40, *, seed: int = 0, terminated: bool = True) -> None:
        """Bytes no ASCII parser accepts (what a wrong baud rate looks like)."""
        rng = random.Random(seed)
        junk = bytes(rng.randrange(0x80, 0x100) for _ in range(n))
        await self.write(junk + (self.terminator if terminated else b""))

    async def write_partial(self, text: str) -> None:
        """The first part of a line, never terminated (the logger reset mid-line)."""
        await self.write(text.encode("ascii"))

    async def write_overlong(self, n: int) -> None:
        await self.write(b"9" * n + self.terminator)

    def start_periodic(self, interval_s: float, make_line: Callable[[int], str]) -> None:
        """Write ``make_line(i)`` every ``interval_s`` until the simulator exits."""

        async def loop() -> None:
            i = 0
            while True:
                await self.write_line(make_line(i))
                i += 1
                await asyncio.sleep(interval_s)

        self.start_task(loop(), f"sim:logger:{self.path.name}")


class GpsSim(PtyDevice):
    """A GPS receiver writing GGA and RMC for its current fix (None: no fix)."""

    def __init__(self, path: Path | str, talker: str = "GP") -> None:
        super().__init__(path)
        self.talker = talker
        self.position: Position | None = None
        self.quality = 1
        self.satellites = 8
        self.hdop = 0.9

    def set_fix(
        self,
        position: Position | None,
        *,
        quality: int = 1,
        satellites: int = 8,
        hdop: float = 0.9,
    ) -> None:
        self.position, self.quality, self.satellites, self.hdop = (
            position,
            quality,
            satellites,
            hdop,
        )

    def sentences(self, now: datetime | None = None) -> list[str]:
        now = now or datetime.now(UTC)
        q = self.quality if self.position is not None else 0
        return [
            nmea_gga(
                now.time(),
                self.position,
                quality=q,
                satellites=self.satellites,
                hdop=self.hdop,
                talker=self.talker,
            ),
            nmea_rmc(now, self.position if q else None, talker=self.talker),
        ]

    async def send_sentence(self, sentence: str) -> None:
        await self.write(sentence.encode("ascii") + b"\r\n")

    async def send_epoch(self) -> None:
        """One GGA and one RMC for the current state."""
        for s in self.sentences():
            await self.send_sentence(s)

    async def send_bad_checksum(self, position: Position) -> None:
        """A GGA with a valid-looking fix and a wrong checksum."""
        good = nmea_gga(datetime.now(UTC).time(), position, talker=self.talker)
        wrong = (int(good[-2:], 16) ^ 0x5A) & 0xFF
        await self.send_sentence(f"{good[:-2]}{wrong:02X}")

    async def send_other(self) -> None:
        gsa = f"{self.talker}GSA,A,3,04,05,,,,,,,,,,,2.5,1.3,2.1"
        await self.send_sentence(nmea_sentence(gsa))

    def start_periodic(self, interval_s: float = 1.0) -> None:
        async def loop() -> None:
            while True:
                await self.send_epoch()
                await asyncio.sleep(interval_s)

        self.start_task(loop(), f"sim:gps:{self.path.name}")


@dataclass
class SimSensor:
    """One SDI-12 sensor on the simulated bus."""

    address: str
    values: list[float] | Callable[[], list[float]]
    #: Seconds announced in ``atttn``; the data is really ready after ``ready_after_s``.
    wait_s: int = 1
    ready_after_s: float = 0.1
    service_request: bool = True
    values_per_reply: int = 9
    absent: bool = False
    #: Corrupt the CRC of this many next data replies.
    corrupt_crc: int = 0
    # -- state, read by tests
    early_reads: int = 0
    measurements: int = 0
    _data: list[float] | None = field(default=None, repr=False)
    _ready_at: float = 0.0
    _crc: bool = False
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def snapshot(self) -> list[float]:
        return list(self.values() if callable(self.values) else self.values)


# Address, then an upper-case command (or none): junk before a command (break bytes) is skipped.
_COMMAND = re.compile(r"([0-9A-Za-z?])([A-Z][A-Z0-9]*|)!$")


class Sdi12BusSim(PtyDevice):
    """Sensors answering SDI-12 commands as a transparent adapter passes them through."""

    def __init__(self, path: Path | str, sensors: list[SimSensor]) -> None:
        super().__init__(path)
        self.sensors = {s.address: s for s in sensors}
        #: Every command received, in order (for asserting the protocol sequence).
        self.commands: list[str] = []

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self.start_task(self._serve(), f"sim:sdi12:{self.path.name}")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s in self.sensors.values():
            if s._timer is not None:
                s._timer.cancel()
        await super().__aexit__(et, e, tb)

    async def _serve(self) -> None:
        buf = b""
        while True:
            buf += await self.read()
            while b"!" in buf:
                cmd, _, buf = buf.partition(b"!")
                text = cmd.decode("ascii", "replace")[-8:] + "!"
                m = _COMMAND.search(text)
                if m:
                    self.commands.append(m.group(0))
                    for reply in self._answer(m.group(1), m.group(2)):
                        await self.write(reply.encode("ascii") + b"\r\n")

    def _answer(self, addr: str, body: str) -> list[str]:  # one return per command
        if addr == "?" and body == "":
            return [a for a, s in self.sensors.items() if not s.absent]
        s = self.sensors.get(addr)
        if s is None or s.absent:
            return []
        if body == "":
            return [addr]
        if body == "I":
            return [f"{addr}14FIELDGTSIM001.0{addr}"]
        m = re.fullmatch(r"([MC])(C?)([1-9]?)", body)
        if m:
            return [self._start(s, concurrent=m.group(1) == "C", crc=bool(m.group(2)))]
        m = re.fullmatch(r"D([0-9])", body)
        if m:
            return [self._data(s, int(m.group(1)))]
        return []  # sensors ignore commands they do not know

    def _start(self, s: SimSensor, *, concurrent: bool, crc: bool) -> str:
        if s._timer is not None:
            s._timer.cancel()
        values = s.snapshot()
        s._data, s._crc, s.measurements = values, crc, s.measurements + 1
        s._ready_at = time.monotonic() + s.ready_after_s
        # SDI-12 4.4.6: a service request follows aM! only when ttt > 0 (with 000 the data is
        # ready at once and none is sent); concurrent measurements never send one.
        if s.service_request and not concurrent and s.wait_s > 0:
            reply = f"{s.address}\r\n".encode("ascii")
            loop = asyncio.get_running_loop()
            s._timer = loop.call_later(s.ready_after_s, self.write_nowait, reply)
        count = f"{len(values):02d}" if concurrent else f"{min(len(values), 9)}"
        return f"{s.address}{s.wait_s:03d}{count}"

    def _data(self, s: SimSensor, index: int) -> str:
        if s._data is None:
            return s.address
        if time.monotonic() < s._ready_at:
            # Reading before the data is ready aborts the measurement on a real sensor.
            s.early_reads += 1
            s._data = None
            return s.address
        per = max(1, s.values_per_reply)
        chunk = s._data[index * per : (index + 1) * per]
        reply = sdi12_data_reply(s.address, chunk, crc=s._crc)
        if s._crc and chunk and s.corrupt_crc > 0:
            s.corrupt_crc -= 1
            reply = reply[:-1] + ("A" if reply[-1] != "A" else "B")
        return reply
