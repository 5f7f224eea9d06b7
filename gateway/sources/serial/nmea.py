"""NMEA 0183 GPS: sentence parsing (pure) and the GPS source (``type = "nmea"``).

The parser verifies the ``*hh`` checksum (XOR of the characters between ``$`` and ``*``) and
reads GGA and RMC from any talker (GP, GN, GL, GA, BD, ...). Other sentence types are accepted
as :class:`Sentence` and ignored by the source. Every fault raises :class:`NmeaError`, a
:class:`~gateway.sources.serial.parsers.LineRejected` whose ``kind`` is ``format``, ``checksum``
or ``field``; nothing else escapes the parsing functions, whatever the input. The gateway never
writes NMEA: sentences for tests come from the GPS simulator's own encoder, written separately
(``gateway/sandbox/serial_sim.py``).

The source publishes each accepted fix to the :class:`~gateway.sources.position.PositionBoard`
under its own name, and ``None`` when the receiver reports no fix (GGA quality outside
``fix_qualities``, RMC status ``V`` or mode ``N``/``E``) or the port is lost. It may also emit
readings for its own series (``emit = ["lat", "lon", "alt", "satellites", "hdop",
"fix_quality"]``), all taken from GGA; ``lat``/``lon``/``alt``/``hdop`` only while there is a fix.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dtime

import structlog

from gateway.models import Position, Reading
from gateway.sources.base import Emit, SourceStats, now_ms
from gateway.sources.position import PositionBoard
from gateway.sources.serial.config import (
    NmeaConfig,
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

_CHECKSUM = re.compile(r"\*([0-9A-Fa-f]{2})$")
_ADDRESS = re.compile(r"P[A-Z0-9]{3,9}|[A-Z]{5}")  # proprietary, or talker + type
_TIME = re.compile(r"(\d{2})(\d{2})(\d{2})(?:\.(\d{1,6}))?")
_DATE = re.compile(r"(\d{2})(\d{2})(\d{2})")
_LAT = re.compile(r"(\d{2})(\d{2}(?:\.\d{1,9})?)")
_LON = re.compile(r"(\d{3})(\d{2}(?:\.\d{1,9})?)")
_DECIMAL = re.compile(r"[+-]?\d{1,9}(?:\.\d{1,9})?")


class NmeaError(LineRejected):
    """A sentence that cannot be used; ``kind`` is format, checksum or field."""


@dataclass(frozen=True, slots=True)
class Sentence:
    talker: str
    kind: str
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GgaFix:
    time: dtime | None
    quality: int
    position: Position | None
    satellites: int | None
    hdop: float | None


@dataclass(frozen=True, slots=True)
class RmcFix:
    time: dtime | None
    valid: bool
    position: Position | None
    utc: datetime | None
    speed_knots: float | None
    course: float | None


def checksum(body: str) -> int:
    """XOR of the characters between ``$`` and ``*``."""
    c = 0
    for ch in body.encode("ascii", "replace"):
        c ^= ch
    return c


def parse_sentence(line: str, *, require_checksum: bool = True) -> Sentence:
    if not line.startswith("$"):
        raise NmeaError("format", "sentence does not start with $")
    m = _CHECKSUM.search(line)
    if m:
        body = line[1 : m.start()]
        if int(m.group(1), 16) != checksum(body):
            raise NmeaError("checksum", f"checksum {m.group(1)} != {checksum(body):02X}")
    elif require_checksum or "*" in line:
        raise NmeaError("checksum", "no *hh checksum")
    else:
        body = line[1:]
    if not body.isascii():
        raise NmeaError("format", "non-ASCII sentence")
    address, *fields = body.split(",")
    if not _ADDRESS.fullmatch(address):
        raise NmeaError("format", f"bad address field {address[:8]!r}")
    if address.startswith("P"):  # proprietary: P + maker id, no talker/type split
        return Sentence("P", address[1:], tuple(fields))
    return Sentence(address[:2], address[2:], tuple(fields))


def _time(text: str) -> dtime | None:
    if not text:
        return None
    m = _TIME.fullmatch(text)
    if not m:
        raise NmeaError("field", f"bad time {text!r}")
    hh, mm, ss = int(m.group(1)), int(m.group(2)), int(m.group(3))
    frac = m.group(4) or "0"
    if hh > 23 or mm > 59 or ss > 60:
        raise NmeaError("field", f"bad time {text!r}")
    return dtime(hh, mm, min(ss, 59), int(frac.ljust(6, "0")[:6]))


def _coordinate(value: str, hemi: str, *, lat: bool) -> float:
    m = (_LAT if lat else _LON).fullmatch(value)
    if not m:
        raise NmeaError("field", f"bad {'latitude' if lat else 'longitude'} {value!r}")
    deg, minutes = int(m.group(1)), float(m.group(2))
    limit = 90 if lat else 180
    out = deg + minutes / 60.0
    if minutes >= 60 or out > limit:
        raise NmeaError("field", f"{'latitude' if lat else 'longitude'} {value!r} out of range")
    if hemi not in (("N", "S") if lat else ("E", "W")):
        raise NmeaError("field", f"bad hemisphere {hemi!r}")
    return -out if hemi in ("S", "W") else out


def _number(text: str, name: str) -> float | None:
    if not text:
        return None
    if not _DECIMAL.fullmatch(text):
        raise NmeaError("field", f"bad {name} {text!r}")
    return float(text)


def _lat_lon(f: tuple[str, ...], i: int) -> tuple[float, float] | None:
    if not any(f[i : i + 4]):
        return None
    return _coordinate(f[i], f[i + 1], lat=True), _coordinate(f[i + 2], f[i + 3], lat=False)


def parse_gga(s: Sentence) -> GgaFix:
    f = s.fields
    if s.kind != "GGA" or len(f) < 12:
        raise NmeaError("format", f"not a GGA sentence ({len(f)} fields)")
    if not f[5].isdigit() or len(f[5]) != 1:
        raise NmeaError("field", f"bad fix quality {f[5]!r}")
    quality = int(f[5])
    sats = f[6]
    if sats and not (sats.isdigit() and len(sats) <= 2):
        raise NmeaError("field", f"bad satellite count {sats!r}")
    hdop = _number(f[7], "hdop")
    alt = _number(f[8], "altitude")
    ll = _lat_lon(f, 1)
    if quality != 0 and ll is None:
        raise NmeaError("field", f"fix quality {quality} without a position")
    position = None if ll is None or quality == 0 else Position(ll[0], ll[1], alt)
    return GgaFix(_time(f[0]), quality, position, int(sats) if sats else None, hdop)


def parse_rmc(s: Sentence) -> RmcFix:
    f = s.fields
    if s.kind != "RMC" or len(f) < 9:
        raise NmeaError("format", f"not an RMC sentence ({len(f)} fields)")
    status = f[1]
    if status not in ("A", "V"):
        raise NmeaError("field", f"bad status {status!r}")
    mode = f[11] if len(f) > 11 else ""
    t = _time(f[0])
    ll = _lat_lon(f, 2)
    valid = status == "A" and mode not in ("N", "E") and ll is not None
    if status == "A" and ll is None:
        raise NmeaError("field", "status A without a position")
    utc = None
    if f[8]:
        m = _DATE.fullmatch(f[8])
        if not m:
            raise NmeaError("field", f"bad date {f[8]!r}")
        try:
            yy = int(m.group(3))
            century = 1900 if yy >= 80 else 2000  # two-digit years: 1980-2079
            day = datetime(century + yy, int(m.group(2)), int(m.group(1)), tzinfo=UTC)
        except ValueError:
            raise NmeaError("field", f"bad date {f[8]!r}") from None
        if t is not None:
            utc = datetime.combine(day.date(), t, UTC)
    position = Position(ll[0], ll[1]) if valid and ll is not None else None
    return RmcFix(t, valid, position, utc, _number(f[6], "speed"), _number(f[7], "course"))


def parse(line: str, *, require_checksum: bool = True) -> GgaFix | RmcFix | Sentence:
    """One decoded line to a GGA or RMC fix, or the bare sentence of any other type."""
    s = parse_sentence(line, require_checksum=require_checksum)
    if s.kind == "GGA":
        return parse_gga(s)
    if s.kind == "RMC":
        return parse_rmc(s)
    return s


# ----------------------------------------------------------------------------------------------
# The GPS source


class NmeaSource:
    """A GPS receiver: publishes its fix to ``positions`` and optionally emits own readings."""

    def __init__(self, cfg: NmeaConfig, positions: PositionBoard) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.positions = positions
        self.stats = SourceStats()
        self._faults = FaultLog(cfg.name, self.stats)
        self._link = PortLink(cfg, self.stats, self._faults)
        self._last_emit = float("-inf")
        # (monotonic, accepted position or None) of the last GGA: RMC defers to its verdict.
        self._last_gga: tuple[float, Position | None] | None = None
        self.stats.detail.update(
            fix="unknown",
            fix_quality=None,
            satellites=None,
            sentences={"GGA": 0, "RMC": 0, "other": 0},
        )

    async def run(self, emit: Emit) -> None:
        """Read until cancelled (or until ``aclose``); the fix is withdrawn when it stops."""
        try:
            await self._link.run(lambda port: self._session(port, emit), self._lost)
        finally:
            self._lost()

    async def aclose(self) -> None:
        self._link.close()

    def _lost(self) -> None:
        self.positions.publish(self.name, None, now_ms())
        self.stats.detail["fix"] = "unknown"

    async def _session(self, port: SerialPort, emit: Emit) -> None:
        framer = LineFramer(b"\n", self.cfg.max_line_bytes, partial_timeout_s=2.0)
        channel = LineChannel(port, framer, self._faults)
        try:
            while True:
                try:
                    async with asyncio.timeout(self.cfg.silence_reopen_s):
                        lines = await channel.read_lines()
                except TimeoutError:
                    msg = f"silent for {self.cfg.silence_reopen_s} s"
                    raise PortLost(port.path, msg) from None
                at = now_ms()
                batch: list[Reading] = []
                good = 0
                for raw in lines:
                    try:
                        item = parse(decode_line(raw), require_checksum=self.cfg.require_checksum)
                    except LineRejected as exc:
                        self._faults.rejected(exc.kind, str(exc), line=repr(raw[:90]))
                        continue
                    self._faults.good()
                    good += 1
                    batch.extend(self._handle(item, at))
                if batch:
                    await emit(batch)
                if good:
                    self.stats.ok(len(batch))
        except PortLost:
            channel.lost()
            raise

    def _handle(self, item: GgaFix | RmcFix | Sentence, at: int) -> list[Reading]:
        counts = self.stats.detail["sentences"]
        if isinstance(item, GgaFix):
            counts["GGA"] += 1
            return self._gga(item, at)
        if isinstance(item, RmcFix):
            counts["RMC"] += 1
            pos = item.position
            if pos is not None and self._last_gga is not None:
                seen, gga = self._last_gga
                if time.monotonic() - seen <= self.cfg.max_fix_age_s:
                    # GGA carries quality, satellites, HDOP and altitude; RMC only lat/lon. A
                    # recent GGA that failed the quality filters vetoes the RMC fix too.
                    pos = None if gga is None else Position(pos.lat, pos.lon, gga.alt)
            self._publish(pos, None)
            return []
        counts["other"] += 1
        return []

    def _gga(self, fix: GgaFix, at: int) -> list[Reading]:
        cfg = self.cfg
        ok = (
            fix.position is not None
            and fix.quality in cfg.fix_qualities
            and (fix.satellites or 0) >= cfg.min_satellites
            and (cfg.max_hdop is None or (fix.hdop is not None and fix.hdop <= cfg.max_hdop))
        )
        pos = fix.position if ok else None
        self._last_gga = (time.monotonic(), pos)
        self._publish(pos, fix.quality)
        self.stats.detail["satellites"] = fix.satellites
        now = time.monotonic()
        if not cfg.emit or now - self._last_emit < cfg.min_interval_s:
            return []
        self._last_emit = now
        values: dict[str, float | int | None] = {
            "fix_quality": fix.quality,
            "satellites": fix.satellites,
        }
        if pos is not None:
            values.update(lat=pos.lat, lon=pos.lon, alt=pos.alt, hdop=fix.hdop)
        prefix = cfg.prefix()
        return [
            Reading(f"{prefix}{k}", at, v, position=pos)
            for k in cfg.emit
            if (v := values.get(k)) is not None
        ]

    def _publish(self, pos: Position | None, quality: int | None) -> None:
        detail = self.stats.detail
        state = "fix" if pos is not None else "no_fix"
        if detail["fix"] != state:
            log.info("gps_fix_changed", source=self.name, fix=state, quality=quality)
        detail["fix"] = state
        if quality is not None:
            detail["fix_quality"] = quality
        self.positions.publish(self.name, pos, now_ms())
