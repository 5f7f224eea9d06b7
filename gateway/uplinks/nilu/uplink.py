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
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import httpx
import structlog

from gateway.configbase import Secret
from gateway.models import Position, StoredReading, Value
from gateway.uplinks import http
from gateway.uplinks.base import Outcome, SendResult
from gateway.uplinks.nilu import packets as pk
from gateway.uplinks.nilu.config import (
    NiluConfig,
    NiluRoute,
)
from gateway.uplinks.nilu.packets import DELIVERED, MAX_HOPS
from gateway.uplinks.nilu.pushtest import run as run_pushtest
from gateway.uplinks.nilu.sensor import SensorPlan

log = structlog.get_logger(__name__)

#: Redirects followed for one packet before giving up (a loop of 300s must not spin).


class NiluUplink(http.HttpPlugin[NiluRoute]):
    """The NILU plugin: one packet per send (see the module docstring)."""

    def __init__(self, cfg: NiluConfig, token: Secret) -> None:
        super().__init__(cfg, cfg.routes)
        self.cfg = cfg
        self._token = token
        self.sensors: dict[int, SensorPlan] = {
            s.id: SensorPlan.of(
                s, cfg.url, frozenset(r.parameter for r in cfg.routes if r.sensor == s.id)
            )
            for s in cfg.sensors
        }
        self._warned_incomplete: set[int] = set()

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
                return (
                    f"no GPS fix when measured: NILU sensor {sid} takes its position from "
                    "each packet and none was attached"
                )
            if item.position.alt is None and plan.cfg.altitude_if_unknown_m is None:
                return (
                    f"GPS fix without altitude when measured (sensor {sid}); set "
                    "altitude_if_unknown_m to send such readings"
                )
        if plan.tokens is not None and pk.ambiguous_local_time(item.ts, plan.zone):
            local = pk.format_local(item.ts, plan.tokens, plan.zone)
            return (
                f"local time {local!r} occurs twice in {plan.zone.key} (clocks set back): "
                "NILU cannot tell which; map the timestamp as epoch seconds or in UTC"
            )
        return None

    def sends_whole_groups(self) -> bool:
        """One packet per sensor and instant: a group split over two requests would send two
        packets for one timestamp (:class:`~gateway.uplinks.base.SendsWholeGroups`)."""
        return True

    async def check_uplink(self) -> list[str]:
        """``fieldgate check-uplink``: one push-test packet per sensor (NILU stores nothing) and
        a comparison with the sensor's schema at NILU. Never raises; failure lines start
        ``FAIL``."""
        return await run_pushtest(self.cfg, self._token)

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
                superseded[it.id] = (
                    f"superseded: series {it.series!r} has a newer reading for "
                    f"the same second (value {newer.value!r} sent)"
                )
        values: dict[str, Value] = {p: it.value for p, it in sorted(chosen.items())}
        body = pk.build_packet(values, plan.cfg.timestamp_field, plan.timestamp(batch[0].ts))
        position = next((it.position for it in chosen.values() if it.position), None)
        return Packet(plan, body, position, [*kept, *same], superseded)

    async def send(self, batch: Sequence[StoredReading]) -> SendResult:
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
        return replace(
            SendResult.failed(
                Outcome.TRANSIENT, f"sensor {sid}: more than {MAX_HOPS} redirects (300) in a row"
            ),
            moved_to=moved,
        )

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self._token.reveal()}",
            "Content-Type": "application/json; charset=utf-8",
            "Accept": "application/json",
        }

    def _follow(self, plan: SensorPlan, resp: httpx.Response, url: str) -> str | SendResult:
        """The endpoint a 300 names (now remembered for the sensor), or why it is not followed."""
        header = resp.headers.get("endpoint")
        sid = plan.cfg.id
        if not header:
            return SendResult.failed(
                Outcome.TRANSIENT, f"sensor {sid}: HTTP 300 without an endpoint header", status=300
            )
        target = pk.resolve_endpoint(header, url)
        if not pk.same_origin(target, self.cfg.url):
            return SendResult.failed(
                Outcome.TRANSIENT,
                f"sensor {sid}: NILU names endpoint "
                f"{target[:200]} on another host; not sending the token "
                "there (change url to follow)",
                status=300,
            )
        if target != plan.endpoint:
            log.warning(
                "nilu_endpoint_moved",
                uplink=self.name,
                sensor=sid,
                old=plan.endpoint,
                endpoint=target,
            )
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
                    return SendResult.failed(
                        Outcome.TRANSIENT,
                        text,
                        status=500,
                        retry_after=http.retry_after(resp.headers),
                    )
                case 400:
                    return SendResult.failed(
                        Outcome.TRANSIENT,
                        f"NILU sensor {sid} is disabled: its readings are kept "
                        f"and offered again every {self.cfg.disabled_retry_s:g} s",
                        status=500,
                        retry_after=self.cfg.disabled_retry_s,
                    )
                case 500:
                    return SendResult.failed(
                        Outcome.AUTH, f"token not authorized for sensor {sid} ({text})", status=500
                    )
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
