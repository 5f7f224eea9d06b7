"""NILU sensors API uplink (shared/seeds/002_432dbe5384434629.txt, "Data Transfer").

Wire format: one JSON object ("packet") per ``POST`` with ``Authorization: Bearer <token>``.
A packet holds the readings of one sensor at one instant: its keys are the sensor's parameters
(one route per series names ``sensor`` and ``parameter``) plus the attribute the sensor's
Timestamp mapping targets. Fixed sensors post to ``/api/sensors/{id}/inbound``; GPS-enabled
ones (``location: {}`` at NILU, ``gps = true`` here) to
``/api/sensors/{id}/{longitude}/{latitude}/{altitude}/inbound`` with the readings' position.

Answers: 2xx delivered. ``300 Multiple Choices`` with an ``endpoint`` header is followed at once
(same scheme, host and port only: the token travels with it) and remembered for that sensor for
the life of the process; ``SendResult.moved_to`` reports it. ``500`` bodies carry
``error-code``: 110 (not valid for the declared schema) and 131 (conversion failed) dead-letter
the packet with NILU's text; 300 and 305 (backend) are transient; 400 (sensor disabled) is
transient with ``retry_after = disabled_retry_s``, naming the sensor, so its readings wait;
500 (not authorized) is an auth failure. Other statuses go through :func:`http.classify`,
except that a refusal (400/413/422) dead-letters the packet rather than letting the dispatcher
bisect it: half a packet is never a better request.

Choices where the document is silent or loose, written down:

* **Timestamp mapping is required.** Without one NILU stamps packets with its arrival time,
  which is wrong for every reading sent after an outage. ``timestamp_format`` is the sensor's
  StringEpochTime ``input-format`` (subset: ``yyyy MM dd HH mm ss fff SSS``, quoted literals)
  and ``timestamp_timezone`` its ``timezone``; without a format the attribute is epoch seconds
  (the document: "number of seconds since ... 1970"). Readings whose local time is ambiguous
  (the hour repeated when clocks go back) are dead-lettered with the reason: NILU would have
  to guess the hour. Use UTC or epoch seconds to avoid that.
* **Packets are whole seconds.** ``group_key`` is ``(sensor, ts // 1000)``. Two readings of one
  series in one packet: the newest goes; an older one with the same value counts as delivered,
  one with another value is dead-lettered ("superseded").
* **Resolution** (seconds, per sensor) is the minimum spacing between a sensor's packets. The
  routes' ``min_interval_s`` defaults to it (shared downsampling then aligns all series of a
  sensor on the same window starts, so they share packets); a smaller value, or different
  values among one sensor's routes, is a config error.
* **Position**: a GPS sensor's reading without a position is dead-lettered by ``check``
  ("no GPS fix when measured"), never sent with an invented one; a fix without altitude is
  dead-lettered too unless ``altitude_if_unknown_m`` is configured. Coordinates are WGS84
  degrees, 7 decimals; altitude metres, 2 decimals.
* **Missing parameters** are left out of the packet (never invented); NILU decides whether the
  schema allows that. A packet missing a routed parameter is logged once per sensor.
* **Rate**: the document gives no limit; 120 packets a minute by default.
* **Order**: ``oldest_first`` by default. The shared downsampler keeps, per series, the newest
  window sent and dead-letters any older one as late, so ``live_first`` would dead-letter every
  backlog longer than one lease; with one request per packet a backlog is long. Packets of one
  sensor are also kept in time order, which NILU's resolution check sees most simply.
* Endpoints learned from a 300 are kept in memory only: after a restart the first packet is
  redirected again and the move logged again.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from pydantic import Field, field_validator, model_validator

from gateway.configbase import RouteBase, Secret, SecretRef, Strict, UplinkConfigBase
from gateway.models import Position, StoredReading, Value
from gateway.uplinks import http
from gateway.uplinks import nilu_packets as pk
from gateway.uplinks.base import Outcome, SendResult

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger(__name__)

#: Redirects followed for one packet before giving up (a loop of 300s must not spin).
MAX_HOPS = 3
DELIVERED = frozenset({200, 201, 202, 204})


class NiluSensor(Strict):
    """``[[uplinks.sensors]]``: one NILU sensor as configured at NILU (GET /api/sensors/{id})."""

    id: int = Field(ge=1)
    #: The sensor's ``resolution`` in seconds: no two packets closer than this.
    resolution_s: int = Field(ge=1, le=86_400)
    #: True for a sensor configured at NILU with ``location: {}`` (position in each request).
    gps: bool = False
    #: Altitude sent for a GPS fix that has none (e.g. a boat: 0). None: such readings are
    #: dead-lettered rather than sent with an invented altitude.
    altitude_if_unknown_m: float | None = None
    #: The attribute NILU's Timestamp mapping targets (its ``target-path`` without the ``/``).
    timestamp_field: str = Field(pattern=pk.AVRO_NAME)
    #: The StringEpochTime converter's ``input-format``; leave out for epoch seconds.
    timestamp_format: str | None = Field(default=None, min_length=1, max_length=64)
    #: The converter's ``timezone`` (IANA name); only with ``timestamp_format``.
    timestamp_timezone: str | None = None

    @field_validator("timestamp_format")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            pk.parse_pattern(v)
        return v

    @field_validator("timestamp_timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is not None:
            zone(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> NiluSensor:
        if self.timestamp_timezone is not None and self.timestamp_format is None:
            raise ValueError("timestamp_timezone needs timestamp_format (epoch seconds are UTC)")
        if self.altitude_if_unknown_m is not None and not self.gps:
            raise ValueError("altitude_if_unknown_m applies to GPS sensors only (gps = true)")
        return self


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError when unknown."""
    if not pk.valid_zone_name(name):
        raise ValueError(f"time zone {name!r} is not an IANA name like 'Europe/Oslo'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (is the tz database installed?)") from None


class NiluRoute(RouteBase):
    """``series`` -> one parameter of one configured sensor."""

    sensor: int = Field(ge=1)
    parameter: str = Field(pattern=pk.AVRO_NAME)
    #: The value ``fieldgate check-uplink`` sends in its push-test packet.
    sample: float | int | bool | str = 0


class NiluConfig(UplinkConfigBase):
    """``[[uplinks]] type = "nilu"``."""

    type: Literal["nilu"]
    url: str = Field(default="https://sensors.nilu.no", pattern=r"^https?://")
    token: SecretRef
    verify_tls: bool = True
    ca_file: Path | None = None
    #: A disabled sensor's readings are kept and offered again after this many seconds.
    disabled_retry_s: float = Field(default=900.0, gt=0, le=3600)
    sensors: list[NiluSensor] = Field(min_length=1)
    routes: list[NiluRoute] = Field(min_length=1)

    order: Literal["live_first", "oldest_first"] = "oldest_first"
    rate_limit_requests: int = Field(default=120, ge=0)
    rate_limit_period_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _interval_from_resolution(cls, data: Any) -> Any:
        """Routes without ``min_interval_s`` take their sensor's resolution."""
        if not isinstance(data, dict):
            return data
        sensors, routes = data.get("sensors"), data.get("routes")
        if not isinstance(sensors, list) or not isinstance(routes, list):
            return data
        res: dict[object, float] = {}
        for s in sensors:
            sid, r = (s.get("id"), s.get("resolution_s")) if isinstance(s, dict) else (
                getattr(s, "id", None), getattr(s, "resolution_s", None))
            if isinstance(r, int | float) and not isinstance(r, bool) and isinstance(sid, int):
                res[sid] = float(r)
        out: list[object] = []
        for route in routes:
            r = route
            sensor = r.get("sensor") if isinstance(r, dict) else None
            if isinstance(r, dict) and "min_interval_s" not in r and isinstance(sensor, int) \
                    and sensor in res:
                r = {**r, "min_interval_s": res[r["sensor"]]}
            elif (isinstance(r, NiluRoute) and "min_interval_s" not in r.model_fields_set
                  and r.sensor in res):
                r = r.model_copy(update={"min_interval_s": res[r.sensor]})
            out.append(r)
        return {**data, "routes": out}

    @model_validator(mode="after")
    def _cross_check(self) -> NiluConfig:
        ids = [s.id for s in self.sensors]
        dups = sorted({i for i in ids if ids.count(i) > 1})
        if dups:
            raise ValueError(f"sensor ids configured twice: {', '.join(map(str, dups))}")
        by_id = {s.id: s for s in self.sensors}
        params: dict[int, list[NiluRoute]] = {}
        for r in self.routes:
            s = by_id.get(r.sensor)
            if s is None:
                raise ValueError(f"route {r.series!r} names sensor {r.sensor}, which is not in "
                                 "[[uplinks.sensors]]")
            if r.parameter == s.timestamp_field:
                raise ValueError(f"route {r.series!r}: parameter {r.parameter!r} is sensor "
                                 f"{s.id}'s timestamp attribute")
            if r.min_interval_s < s.resolution_s:
                raise ValueError(f"route {r.series!r}: min_interval_s {r.min_interval_s:g} is "
                                 f"below sensor {s.id}'s resolution of {s.resolution_s} s")
            params.setdefault(s.id, []).append(r)
        for sid, rs in params.items():
            names = [r.parameter for r in rs]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(f"sensor {sid}: parameter routed from two series: "
                                 f"{', '.join(twice)}")
            if len({r.min_interval_s for r in rs}) > 1:
                raise ValueError(f"sensor {sid}: its routes need one min_interval_s (they share "
                                 "packets), got " + ", ".join(f"{r.min_interval_s:g}" for r in rs))
            if len(rs) > self.batch_max_items:
                raise ValueError(f"batch_max_items {self.batch_max_items} is below sensor "
                                 f"{sid}'s {len(rs)} parameters (a packet would be split)")
        unrouted = sorted(set(by_id) - set(params))
        if unrouted:
            raise ValueError(f"sensors without routes: {', '.join(map(str, unrouted))}")
        return self

    def sensor(self, sensor_id: int) -> NiluSensor:
        return next(s for s in self.sensors if s.id == sensor_id)


@dataclass(slots=True)
class SensorPlan:
    """What sending to one sensor needs, prepared once: pattern, zone and current endpoint."""

    cfg: NiluSensor
    tokens: tuple[pk.Token, ...] | None
    zone: ZoneInfo
    endpoint: str
    parameters: frozenset[str]

    @classmethod
    def of(cls, cfg: NiluSensor, base_url: str, parameters: frozenset[str]) -> SensorPlan:
        tokens = pk.parse_pattern(cfg.timestamp_format) if cfg.timestamp_format else None
        return cls(cfg, tokens, zone(cfg.timestamp_timezone or "UTC"),
                   pk.default_endpoint(base_url, cfg.id, cfg.gps), parameters)

    def timestamp(self, ts_ms: int) -> int | str:
        return pk.timestamp_value(ts_ms, self.tokens, self.zone)


class NiluUplink:
    """The NILU plugin: one packet per send (see the module docstring)."""

    def __init__(self, cfg: NiluConfig, token: Secret) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._token = token
        self._routes = {r.series: r for r in cfg.routes}
        self.sensors: dict[int, SensorPlan] = {
            s.id: SensorPlan.of(s, cfg.url, frozenset(r.parameter for r in cfg.routes
                                                      if r.sensor == s.id))
            for s in cfg.sensors
        }
        self._warned_incomplete: set[int] = set()
        self._client = http.LazyClient(
            cfg.timeout_s, verify=cfg.verify_tls, ca_file=cfg.ca_file
        )

    @property
    def routes(self) -> Mapping[str, NiluRoute]:
        return self._routes

    def _http(self) -> httpx.AsyncClient:
        return self._client.get()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- the plugin contract ---------------------------------------------------------------------

    def check(self, item: StoredReading) -> str | None:
        plan = self.sensors[self._routes[item.series].sensor]
        sid = plan.cfg.id
        v = item.value
        if isinstance(v, float) and not math.isfinite(v):
            return f"value {v!r} is not a finite number (JSON cannot carry it)"
        if item.ts < 0:
            return "timestamp before 1970 (NILU timestamps are seconds since 1970)"
        if pk.needs_position(plan.endpoint):
            if item.position is None:
                return (f"no GPS fix when measured: NILU sensor {sid} takes its position from "
                        "each packet and none was attached")
            if item.position.alt is None and plan.cfg.altitude_if_unknown_m is None:
                return (f"GPS fix without altitude when measured (sensor {sid}); set "
                        "altitude_if_unknown_m to send such readings")
        if plan.tokens is not None and pk.ambiguous_local_time(item.ts, plan.zone):
            local = pk.format_local(item.ts, plan.tokens, plan.zone)
            return (f"local time {local!r} occurs twice in {plan.zone.key} (clocks set back): "
                    "NILU cannot tell which; map the timestamp as epoch seconds or in UTC")
        return None

    def group_key(self, item: StoredReading) -> Hashable:
        return (self._routes[item.series].sensor, item.ts // 1000)

    def item_size(self, item: StoredReading) -> int:
        return 24 + len(self._routes[item.series].parameter) + len(str(item.value))

    def packet(self, batch: Sequence[StoredReading]) -> Packet:
        """The packet for one group (one sensor, one second) and what to do with duplicates."""
        plan = self.sensors[self._routes[batch[0].series].sensor]
        chosen: dict[str, StoredReading] = {}
        for it in sorted(batch, key=lambda i: i.id):
            chosen[self._routes[it.series].parameter] = it
        same: list[int] = []
        superseded: dict[int, str] = {}
        kept = {it.id for it in chosen.values()}
        for it in batch:
            if it.id in kept:
                continue
            newer = chosen[self._routes[it.series].parameter]
            if newer.value == it.value and type(newer.value) is type(it.value):
                same.append(it.id)
            else:
                superseded[it.id] = (f"superseded: series {it.series!r} has a newer reading for "
                                     f"the same second (value {newer.value!r} sent)")
        values: dict[str, Value] = {p: it.value for p, it in sorted(chosen.items())}
        body = pk.build_packet(values, plan.cfg.timestamp_field, plan.timestamp(batch[0].ts))
        position = next((it.position for it in chosen.values() if it.position), None)
        return Packet(plan, body, position, [*kept, *same], superseded)

    async def send(self, batch: Sequence[StoredReading]) -> SendResult:
        import httpx

        p = self.packet(batch)
        sid = p.plan.cfg.id
        missing = p.plan.parameters - set(p.body)
        if missing:
            level = log.debug if sid in self._warned_incomplete else log.warning
            level("nilu_packet_incomplete", uplink=self.name, sensor=sid, missing=sorted(missing))
            self._warned_incomplete.add(sid)
        body = pk.encode(p.body)
        endpoint, moved = p.plan.endpoint, None
        for _ in range(MAX_HOPS + 1):
            try:
                url = pk.fill_endpoint(endpoint, p.position, p.plan.cfg.altitude_if_unknown_m)
            except ValueError as exc:
                # Only after a 300 pointed a sensor at a GPS endpoint: check() refuses the rest.
                return SendResult.failed(Outcome.TRANSIENT, f"sensor {sid}: {exc}")
            try:
                resp = await self._http().post(url, content=body, headers=self._headers())
            except httpx.HTTPError as exc:
                return replace(http.transport_failure(exc), moved_to=moved)
            if resp.status_code != 300:
                return replace(self._outcome(p, resp), moved_to=moved)
            target = self._follow(p.plan, resp, url)
            if isinstance(target, SendResult):
                return replace(target, moved_to=moved)
            endpoint = moved = target
        return replace(SendResult.failed(Outcome.TRANSIENT, f"sensor {sid}: more than "
                                         f"{MAX_HOPS} redirects (300) in a row"), moved_to=moved)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.reveal()}",
                "Content-Type": "application/json; charset=utf-8", "Accept": "application/json"}

    def _follow(self, plan: SensorPlan, resp: httpx.Response, url: str) -> str | SendResult:
        """The endpoint a 300 names (now remembered for the sensor), or why it is not followed."""
        header = resp.headers.get("endpoint")
        sid = plan.cfg.id
        if not header:
            return SendResult.failed(Outcome.TRANSIENT, f"sensor {sid}: HTTP 300 without an "
                                     "endpoint header", status=300)
        target = pk.resolve_endpoint(header, url)
        if not pk.same_origin(target, self.cfg.url):
            return SendResult.failed(Outcome.TRANSIENT, f"sensor {sid}: NILU names endpoint "
                                     f"{target[:200]} on another host; not sending the token "
                                     "there (change url to follow)", status=300)
        if target != plan.endpoint:
            log.warning("nilu_endpoint_moved", uplink=self.name, sensor=sid, old=plan.endpoint,
                        endpoint=target)
            plan.endpoint = target
        return target

    def _outcome(self, p: Packet, resp: httpx.Response) -> SendResult:
        sid = p.plan.cfg.id
        if resp.status_code in DELIVERED:
            return SendResult(delivered=p.ids, rejected=p.superseded)
        if resp.status_code == 500:
            err = pk.service_error(resp.content)
            text = f"NILU error-code {err.code}: {err.message}"[: http.MAX_REASON]
            match err.code:
                case 110 | 131:
                    return self._reject(p, text)
                case 300 | 305:
                    return SendResult.failed(Outcome.TRANSIENT, text, status=500,
                                             retry_after=http.retry_after(resp.headers))
                case 400:
                    return SendResult.failed(
                        Outcome.TRANSIENT, f"NILU sensor {sid} is disabled: its readings are kept "
                        f"and offered again every {self.cfg.disabled_retry_s:g} s", status=500,
                        retry_after=self.cfg.disabled_retry_s)
                case 500:
                    return SendResult.failed(Outcome.AUTH, f"token not authorized for sensor "
                                             f"{sid} ({text})", status=500)
        result = http.classify(resp)
        failure = result.failure
        if failure is not None and failure.outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
            return self._reject(p, f"sensor {sid}: {failure.message}"[: http.MAX_REASON])
        return result

    @staticmethod
    def _reject(p: Packet, reason: str) -> SendResult:
        return SendResult(rejected={**dict.fromkeys(p.ids, reason), **p.superseded})


@dataclass(frozen=True, slots=True)
class Packet:
    """One request's worth: the body, the position for the URL, and every id's fate."""

    plan: SensorPlan
    body: dict[str, Value]
    position: Position | None
    ids: list[int]
    superseded: dict[int, str]


async def pushtest(cfg: NiluConfig, token: Secret) -> list[str]:
    """``fieldgate check-uplink``: one push-test packet per sensor (NILU stores nothing) and a
    comparison with the sensor's schema at NILU. Never raises; failure lines start ``FAIL``."""
    from gateway.uplinks.nilu_pushtest import run

    return await run(cfg, token)
