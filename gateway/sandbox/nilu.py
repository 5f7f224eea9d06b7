"""Emulator of the NILU sensors API's data transfer (seed document 002), over real HTTP.

Routes (paths as in the document, each also with a trailing ``/``):

- ``POST /api/sensors/{id}/inbound`` - a fixed sensor's packet (one JSON object);
- ``POST /api/sensors/{id}/{longitude}/{latitude}/{altitude}/inbound`` - a GPS sensor's;
- either with ``?pushtest=true``: validated like data, nothing stored (``emu.pushtests``);
- ``GET /api/sensors/{id}`` - the sensor schema in the document's shape (no auth, as there).

Success is ``200 {"atom": ".../pipeline", "message": "OK", "http-status-code": 200}``. Errors
use the document's body ``{"error-code", "error-message", "http-status-code"}``. Checks, in
order: bearer token (401 missing or unknown); a sensor in ``moved`` (300 with an ``endpoint``
header naming the new sensor's inbound URL); unknown sensor (404); a token in
``foreign_tokens`` (500, code 500 "not authorized"); a fixed sensor on the GPS route (300 with
``endpoint``, as documented); a GPS sensor on the fixed route (400); coordinates out of
WGS84 range (400); sensor disabled (500, code 400); body not JSON (400); then the packet:
a declared parameter missing (500, code 110), a converter failing (500, code 131), a
converted value not of the declared type (500, code 110).

Decisions where the document is silent:

- **Undeclared keys** are accepted and ignored ("stored as raw data", as the document says);
  they stay in :attr:`NiluPacket.raw`. A declared parameter may be missing only when its type
  is an Avro union with ``"null"`` (e.g. ``["null", "double"]``).
- **Types**: Avro primitives; ``double``/``float`` take any JSON number, ``int``/``long``
  integers, ``boolean`` true/false, ``string`` text; other (complex) types take anything.
  Converters act on text only (``BooleanInteger`` on booleans); a value already of the output
  type passes unconverted. A GPS sensor on the fixed route answers 400 (error-code 1000, the
  document's generic code), since the document lists no code for it; other generic errors
  (401, 404, bad JSON) use 1000 too.
- **StringEpochTime** reads ``yyyy MM dd HH mm ss fff SSS`` and quoted literals; other pattern
  letters are refused when the sensor is defined (NILU's 130 at configuration). A local time
  that occurs twice (clocks set back) is read as the earlier instant.
- **Resolution**: a packet whose timestamp is closer than the sensor's ``resolution_s`` to a
  stored packet of that sensor is refused with 500, code 110 (resolution is part of the sensor
  schema); an identical re-send of a stored packet is answered 200 and not stored twice
  (counted in ``duplicates``). Without a Timestamp mapping the arrival time is the timestamp.
- Coordinates are plain decimals (no exponent; anything else is no route: 404). Bodies over
  1 MiB: 413. Push-tests skip the resolution check (they store nothing).

Records for tests: ``packets`` (accepted :class:`NiluPacket`, in order), ``pushtests``,
``refused`` (each answer in the document's error format, 300 moves included, as
:class:`Refusal`; not 401/404/400-bad-JSON, which ``requests`` shows), ``duplicates``.
``await emu.set_enabled(id, False)`` disables a sensor; ``emu.moved[old_id] = new_id`` moves
one.

Standalone: ``python -m gateway.sandbox.nilu --port 8703 --token demo-token``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.sandbox.emulator import BearerAuth, Clock, Emulator, Reject, parse_json, read_body

ConverterType = Literal["StringDouble", "StringInteger", "StringEpochTime", "BooleanInteger"]
#: An Avro type: a primitive name, or a union as a list (``["null", "double"]``).
ParamType = str | list[str]
GENERIC = 1000
NUM = r"-?\d+(?:\.\d+)?"


class NiluError(Exception):
    """Answer with the document's error body: HTTP ``status``, application ``code``."""

    def __init__(
        self, status: int, code: int, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})


@dataclass(frozen=True, slots=True)
class Converter:
    output_type: ConverterType
    input_format: str | None = None
    timezone: str | None = None


@dataclass(slots=True)
class SensorSchema:
    """A sensor as configured at NILU. ``location`` None means GPS-enabled (``location: {}``);
    ``timestamp`` is the attribute the Timestamp mapping targets (None: no mapping)."""

    id: int
    parameters: Mapping[str, ParamType]
    timestamp: str | None = None
    converters: Mapping[str, Converter] = field(default_factory=dict)
    location: tuple[float, float, float] | None = (10.75, 59.91, 10.0)  # lon, lat, alt
    resolution_s: int = 60
    enabled: bool = True
    epsg: int = 4326
    name: str = "sensor"

    def __post_init__(self) -> None:
        for conv in self.converters.values():
            if conv.output_type == "StringEpochTime":
                epoch_parser(conv.input_format or "", conv.timezone)  # refuse bad patterns now


@dataclass(frozen=True, slots=True)
class NiluPacket:
    """An accepted packet: ``values`` are the declared parameters as received (timestamp
    attribute excluded), ``timestamp`` epoch seconds after conversion, ``position`` (lon, lat,
    alt) from the GPS route's URL, ``raw`` the whole JSON object."""

    sensor: int
    position: tuple[float, float, float] | None
    values: dict[str, Any]
    timestamp: int
    raw: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Refusal:
    sensor: int
    status: int
    code: int
    message: str


def epoch_parser(pattern: str, timezone: str | None) -> Callable[[str], int]:
    """StringEpochTime: local time text in ``pattern`` and ``timezone`` -> epoch seconds.

    Raises ValueError for an unsupported pattern; the parser raises ValueError for bad text.
    """
    widths = {"yyyy": 4, "MM": 2, "dd": 2, "HH": 2, "mm": 2, "ss": 2, "fff": 3, "SSS": 3}
    rx, order = [], []
    for m in re.finditer(r"'([^']*)'|\\(.)|([A-Za-z])\3*|(.)", pattern, re.S):
        quoted, escaped, _, other = m.groups()
        if quoted is not None or escaped is not None or other is not None:
            rx.append(re.escape(quoted or escaped or other or "'"))
        elif m.group(0) in widths:
            rx.append(rf"(\d{{{widths[m.group(0)]}}})")
            order.append(m.group(0))
        else:
            raise ValueError(f"invalid converter arguments: pattern letters {m.group(0)!r}")
    fractions = [o for o in order if o in ("fff", "SSS")]
    required = {"yyyy", "MM", "dd", "HH", "mm", "ss"}
    if len(set(order)) != len(order) or not required <= set(order) or len(fractions) > 1:
        raise ValueError(
            f"invalid converter arguments: pattern {pattern!r} must name year, "
            "month, day, hour, minute and second once each"
        )
    compiled = re.compile("".join(rx))
    zone = ZoneInfo(timezone or "UTC")

    def parse(text: str) -> int:
        m = compiled.fullmatch(text)
        if m is None:
            raise ValueError(f"{text!r} does not match {pattern!r}")
        f = dict(zip(order, map(int, m.groups()), strict=True))
        ms = f.get("fff", f.get("SSS", 0))
        dt = datetime(
            f["yyyy"], f["MM"], f["dd"], f["HH"], f["mm"], f["ss"], ms * 1000, tzinfo=zone
        )
        return math.floor(dt.timestamp())

    return parse


def _is_type(value: object, avro: ParamType) -> bool:
    if isinstance(avro, list):
        return any(_is_type(value, t) for t in avro)
    match avro:
        case "double" | "float":
            return isinstance(value, int | float) and not isinstance(value, bool)
        case "int" | "long":
            return (
                isinstance(value, int)
                and not isinstance(value, bool)
                and (avro == "long" or -(2**31) <= value < 2**31)
            )
        case "boolean":
            return isinstance(value, bool)
        case "string":
            return isinstance(value, str)
        case "null":
            return value is None
    return True  # complex types are not modelled


def _convert(value: object, conv: Converter) -> object:
    """The converted value; ValueError when conversion fails."""
    match conv.output_type:
        case "StringDouble" if isinstance(value, str):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"{value!r} is not a finite number")
            return number
        case "StringInteger" if isinstance(value, str):
            if not re.fullmatch(r"[+-]?\d+", value.strip()):
                raise ValueError(f"{value!r} is not an integer")
            return int(value)
        case "StringEpochTime" if isinstance(value, str):
            return epoch_parser(conv.input_format or "", conv.timezone)(value)
        case "BooleanInteger" if isinstance(value, bool):
            return int(value)
    return value


class NiluEmulator(Emulator):
    """The NILU sensors API data transfer on 127.0.0.1; see the module docstring."""

    name = "nilu"

    def __init__(
        self,
        sensors: Iterable[SensorSchema],
        token: str = "demo-token",
        *,
        foreign_tokens: Iterable[str] = (),
        moved: Mapping[int, int] | None = None,
        max_body_bytes: int = 1024 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        super().__init__(host=host, port=port, clock=clock)
        self.sensors: dict[int, SensorSchema] = {s.id: s for s in sensors}
        self.auth = BearerAuth({token: {"inbound"}})
        self.foreign_tokens = frozenset(foreign_tokens)
        for t in self.foreign_tokens:
            self.auth.grant(t, "inbound")
        #: Old sensor id -> new sensor id: posts to the old one get 300 + endpoint.
        self.moved: dict[int, int] = dict(moved or {})
        self.max_body_bytes = max_body_bytes
        self.packets: list[NiluPacket] = []
        self.pushtests: list[NiluPacket] = []
        self.refused: list[Refusal] = []
        self.duplicates = 0
        self._stamps: dict[int, list[int]] = {}
        self._stored: dict[tuple[int, int], NiluPacket] = {}

    def setup_routes(self, app: web.Application) -> None:
        gps = rf"/api/sensors/{{sid:\d+}}/{{lon:{NUM}}}/{{lat:{NUM}}}/{{alt:{NUM}}}/inbound"
        for path in ("/api/sensors/{sid:\\d+}/inbound", gps):
            app.router.add_post(path, self._inbound)
            app.router.add_post(path + "/", self._inbound)
        app.router.add_get("/api/sensors/{sid:\\d+}", self._sensor)

    def error_body(self, status: int, message: str) -> object:
        return {"error-code": GENERIC, "error-message": message, "http-status-code": status}

    async def set_enabled(self, sensor_id: int, enabled: bool = True) -> None:
        """Enable or disable a sensor (POST .../disable at NILU), waking ``wait_for``."""
        self.sensors[sensor_id].enabled = enabled
        await self.changed()

    def endpoint(self, s: SensorSchema) -> str:
        """The sensor's inbound URL as NILU publishes it (GPS: with placeholders)."""
        if s.location is None:
            return f"{self.url}/api/sensors/{s.id}/{{longitude}}/{{latitude}}/{{altitude}}/inbound"
        return f"{self.url}/api/sensors/{s.id}/inbound"

    # -- data transfer -----------------------------------------------------------------------

    async def _inbound(self, request: web.Request) -> web.Response:
        sid = int(request.match_info["sid"])
        try:
            return await self._transfer(request, sid)
        except NiluError as exc:
            self.refused.append(Refusal(sid, exc.status, exc.code, exc.message))
            body = {
                "error-code": exc.code,
                "error-message": exc.message,
                "http-status-code": exc.status,
            }
            return web.json_response(body, status=exc.status, headers=exc.headers)

    async def _transfer(self, request: web.Request, sid: int) -> web.Response:
        token = self.auth.require(request, "inbound")
        if sid in self.moved:
            new = self.sensors[self.moved[sid]]
            raise NiluError(
                300,
                GENERIC,
                f"sensor {sid} moved to sensor {new.id}",
                {"endpoint": self.endpoint(new)},
            )
        s = self.sensors.get(sid)
        if s is None:
            raise Reject(404, f"sensor {sid} not found")
        if token in self.foreign_tokens:
            raise NiluError(500, 500, "not authorized")
        position = self._position(request, s)
        if not s.enabled:
            raise NiluError(500, 400, f"sensor {sid} disabled")
        if request.content_type != "application/json":
            raise Reject(400, f"Content-Type {request.content_type} is not application/json")
        raw = parse_json(await read_body(request, self.max_body_bytes))
        if not isinstance(raw, dict):
            raise NiluError(
                500,
                110,
                "sensor data is not valid according to declared schema: "
                "the packet is not a JSON object",
            )
        converted = self._validate(s, raw)
        ts_attr = s.timestamp
        stamp = int(converted[ts_attr]) if ts_attr is not None else int(time.time())
        values = {k: raw[k] for k in s.parameters if k in raw and k != ts_attr}
        packet = NiluPacket(sid, position, values, stamp, raw)
        atom = f"{self.url}/api/sensors/{sid}/pipeline"
        if request.query.get("pushtest", "").lower() == "true":
            self.pushtests.append(packet)
            return self._ok(atom + "/test")
        if self._store(s, packet):
            self.packets.append(packet)
        return self._ok(atom)

    def _ok(self, atom: str) -> web.Response:
        return web.json_response({"atom": atom, "message": "OK", "http-status-code": 200})

    def _position(self, request: web.Request, s: SensorSchema) -> tuple[float, float, float] | None:
        info = request.match_info
        if "lon" not in info:
            if s.location is None:
                raise NiluError(
                    400,
                    GENERIC,
                    f"sensor {s.id} has no fixed location: post to {urlpath(self.endpoint(s))}",
                )
            return None
        if s.location is not None:
            raise NiluError(
                300,
                GENERIC,
                f"sensor {s.id} is configured with a fixed location",
                {"endpoint": self.endpoint(s)},
            )
        lon, lat, alt = float(info["lon"]), float(info["lat"]), float(info["alt"])
        if s.epsg == 4326 and not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise NiluError(400, GENERIC, f"position {lon}/{lat} is outside WGS84 range")
        return (lon, lat, alt)

    def _validate(self, s: SensorSchema, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The declared parameters after conversion; NiluError 110/131 as the document says."""
        declared = dict(s.parameters)
        if s.timestamp is not None:
            declared.setdefault(s.timestamp, "long")
        missing = [
            k
            for k, t in declared.items()
            if k not in raw and not (isinstance(t, list) and "null" in t)
        ]
        if missing:
            raise NiluError(
                500,
                110,
                "sensor data is not valid according to declared schema: "
                f"missing {', '.join(sorted(missing))}",
            )
        out: dict[str, Any] = {}
        for k, t in declared.items():
            if k not in raw:
                continue
            value = raw[k]
            if (conv := s.converters.get(k)) is not None:
                try:
                    value = _convert(value, conv)
                except (ValueError, OverflowError) as exc:
                    raise NiluError(
                        500, 131, f"an error occured during parameter conversion: {k}: {exc}"
                    ) from None
            if not _is_type(value, t):
                raise NiluError(
                    500,
                    110,
                    "sensor data is not valid according to declared "
                    f"schema: {k} = {raw[k]!r} is not {t}",
                )
            out[k] = value
        return out

    def _store(self, s: SensorSchema, packet: NiluPacket) -> bool:
        """Keep ``packet`` unless a stored one is within the resolution (False: duplicate)."""
        stamps = self._stamps.setdefault(s.id, [])
        i = bisect.bisect_left(stamps, packet.timestamp)
        near = [
            t for t in stamps[max(0, i - 1) : i + 1] if abs(t - packet.timestamp) < s.resolution_s
        ]
        if near:
            old = self._stored[(s.id, near[0])]
            if near == [packet.timestamp] and (old.raw, old.position) == (
                packet.raw,
                packet.position,
            ):
                self.duplicates += 1
                return False
            raise NiluError(
                500,
                110,
                "sensor data is not valid according to declared schema: "
                f"timestamp {packet.timestamp} is within the sensor resolution of "
                f"{s.resolution_s} s of stored data at {near[0]}",
            )
        stamps.insert(i, packet.timestamp)
        self._stored[(s.id, packet.timestamp)] = packet
        return True

    # -- schema ------------------------------------------------------------------------------

    async def _sensor(self, request: web.Request) -> web.Response:
        s = self.sensors.get(int(request.match_info["sid"]))
        if s is None:
            raise Reject(404, "sensor not found")
        return web.json_response(self.describe(s))

    def describe(self, s: SensorSchema) -> dict[str, Any]:
        """The document's ``GET /api/sensors/{id}`` object (the parts the emulator models)."""
        location: dict[str, float] = {}
        if s.location is not None:
            location = dict(zip(("longitude", "latitude", "altitude"), s.location, strict=True))
        doc = "https://sensors.nilu.no/api/doc"
        converters = [
            {
                "input-type": "boolean" if c.output_type == "BooleanInteger" else "string",
                "output-type": c.output_type,
                "target-path": f"/{path}",
                "input-args": (
                    {"input-format": c.input_format, "timezone": c.timezone}
                    if c.output_type == "StringEpochTime"
                    else None
                ),
                "atom": f"{doc}/converters#{c.output_type}",
            }
            for path, c in s.converters.items()
        ]
        mapping = (
            [
                {
                    "name": "Timestamp",
                    "target-path": f"/{s.timestamp}",
                    "atom": f"{doc}/fieldmapping#Timestamp",
                }
            ]
            if s.timestamp
            else None
        )
        return {
            "id": s.id,
            "name": s.name,
            "resolution": s.resolution_s,
            "srs": {"epsg": s.epsg},
            "enabled": s.enabled,
            "parameters": [{"name": k, "type": t} for k, t in s.parameters.items()],
            "location": location,
            "converters": converters,
            "mapping": mapping,
            "atom": f"{self.url}/api/sensors/{s.id}",
            "endpoint": self.endpoint(s),
        }


def urlpath(url: str) -> str:
    return "/" + url.split("://", 1)[-1].split("/", 1)[-1]


def demo_sensors() -> list[SensorSchema]:
    """A fixed air-quality sensor (local time text) and a GPS one (epoch seconds)."""
    return [
        SensorSchema(
            393,
            {"no2": "double", "pm10": "double", "date": "long"},
            timestamp="date",
            converters={"date": Converter("StringEpochTime", "yyyy/MM/dd HH:mm:ss", "Europe/Oslo")},
            resolution_s=60,
            name="Innosense",
        ),
        SensorSchema(
            394,
            {"temperature": "double", "pm10": ["null", "double"], "time": "long"},
            timestamp="time",
            location=None,
            resolution_s=60,
            name="HackAir",
        ),
    ]


async def _serve(emu: NiluEmulator) -> None:
    async with emu:
        print(
            f"nilu emulator listening on {emu.url} (POST {emu.url}/api/sensors/393/inbound)",
            flush=True,
        )
        await asyncio.Event().wait()  # until Ctrl-C cancels us


def main(argv: list[str] | None = None) -> None:
    """Run the emulator with :func:`demo_sensors` until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m gateway.sandbox.nilu")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8703)
    parser.add_argument("--token", default="demo-token")
    args = parser.parse_args(argv)
    emu = NiluEmulator(demo_sensors(), args.token, host=args.host, port=args.port)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(emu))


if __name__ == "__main__":
    main()
