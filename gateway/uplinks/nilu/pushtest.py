"""``fieldgate check-uplink`` for NILU: push-test every sensor and compare its schema.

For each configured sensor, two requests:

1. ``GET /api/sensors/{id}``: the sensor as NILU has it; compared with the config (enabled,
   resolution, declared parameters, Timestamp mapping and its StringEpochTime converter,
   fixed or GPS location, WGS84 for GPS sensors). NILU ignores undeclared keys, so a mistyped
   parameter would otherwise lose its values silently: this is the only place it shows.
2. ``POST <inbound>/?pushtest=true`` with one sample packet (each route's ``sample`` value, the
   current time floored to the resolution; GPS sensors at 0/0/0): proves token and mapping,
   stores nothing. A 300 is followed (same host only) and reported.

Every result is one line: ``OK``, ``WARN`` or ``FAIL`` first. Nothing raises: a network error,
an odd answer or a bug in here becomes a ``FAIL`` line. No line holds the token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.configbase import Secret
from gateway.models import Position
from gateway.uplinks import http
from gateway.uplinks.nilu import packets as pk
from gateway.uplinks.nilu.config import NiluConfig, NiluSensor
from gateway.uplinks.nilu.packets import DELIVERED, MAX_HOPS
from gateway.uplinks.nilu.sensor import SensorPlan

#: Where a GPS sensor's push-test packet says it is (nothing is stored).
PUSHTEST_POSITION = Position(lat=0.0, lon=0.0, alt=0.0)

#: What NILU's inbound error codes mean to the person reading the report.
HINTS: Mapping[int, str] = {
    110: "the packet does not fit the sensor's declared schema (parameters or their types)",
    131: "a value or the timestamp did not convert (check timestamp_format/_timezone)",
    300: "NILU's backend is unreachable; try again later",
    305: "NILU's backend failed to take the data; try again later",
    400: "the sensor is disabled at NILU",
    500: "the token is not authorized for this sensor",
}


async def run(cfg: NiluConfig, token: Secret) -> list[str]:
    """Report lines for every sensor of ``cfg`` (see the module docstring)."""
    lines: list[str] = []
    try:
        async with http.make_client(
            cfg.timeout_s, verify=cfg.verify_tls, ca_file=cfg.ca_file
        ) as client:
            for s in cfg.sensors:
                params = [r.parameter for r in cfg.routes if r.sensor == s.id]
                try:
                    lines.extend(await _schema(client, cfg, s, params, token))
                    lines.extend(await _push(client, cfg, s, token))
                except Exception as exc:  # a report, not a crash: say what broke and go on
                    lines.append(
                        f"FAIL sensor {s.id}: check failed: {type(exc).__name__}: {str(exc)[:200]}"
                    )
    except Exception as exc:  # the client itself (a CA file that cannot be read)
        lines.append(
            f"FAIL {cfg.name}: cannot set up HTTPS: {type(exc).__name__}: {str(exc)[:200]}"
        )
    return lines


def _headers(token: Secret) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token.reveal()}",
        "Accept": "application/json",
        "Content-Type": "application/json; charset=utf-8",
    }


async def _schema(
    client: httpx.AsyncClient, cfg: NiluConfig, s: NiluSensor, params: Sequence[str], token: Secret
) -> list[str]:
    url = f"{cfg.url.rstrip('/')}/api/sensors/{s.id}"
    try:
        resp = await client.get(url, headers=_headers(token))
    except httpx.HTTPError as exc:
        return [f"FAIL sensor {s.id}: cannot read its schema: {_transport(exc)}"]
    if resp.status_code == 404:
        return [f"FAIL sensor {s.id}: NILU knows no such sensor (GET {urlsplit(url).path} -> 404)"]
    if resp.status_code != 200:
        return [f"WARN sensor {s.id}: cannot read its schema: {http.reason_text(resp)}"]
    try:
        data = resp.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return [f"WARN sensor {s.id}: its schema is not a JSON object; not compared"]
    return compare(s, params, data)


def compare(s: NiluSensor, params: Sequence[str], data: Mapping[str, Any]) -> list[str]:
    """Differences between a configured sensor and NILU's ``GET /api/sensors/{id}`` answer."""
    tag = f"sensor {s.id}"
    out: list[str] = []
    if data.get("enabled") is False:
        out.append(
            f"FAIL {tag}: disabled at NILU: packets are refused until it is enabled (readings wait)"
        )
    res = data.get("resolution")
    if isinstance(res, int) and not isinstance(res, bool) and res != s.resolution_s:
        out.append(f"FAIL {tag}: resolution is {res} s at NILU, {s.resolution_s} s here")
    declared = _names(data.get("parameters"))
    if declared is not None:
        for p in params:
            if p not in declared:
                out.append(
                    f"FAIL {tag}: parameter {p!r} is not declared at NILU (NILU ignores "
                    "undeclared keys: its values would be lost)"
                )
        for d in sorted(declared - set(params) - {s.timestamp_field}):
            out.append(f"WARN {tag}: NILU declares parameter {d!r} and no series is routed to it")
    out.extend(_timestamp_lines(s, data))
    location = data.get("location")
    moving = location is None or location == {}
    if s.gps and not moving:
        out.append(f"FAIL {tag}: NILU has a fixed location for it: set gps = false")
    elif not s.gps and moving:
        out.append(f"FAIL {tag}: NILU expects a position with each packet: set gps = true")
    srs = data.get("srs")
    epsg = srs.get("epsg") if isinstance(srs, dict) else None
    if s.gps and isinstance(epsg, int) and epsg != 4326:
        out.append(
            f"FAIL {tag}: positions are sent as WGS84 (EPSG:4326) but the sensor's SRS "
            f"is EPSG:{epsg}"
        )
    if not out:
        out.append(
            f"OK   {tag}: schema at NILU matches (parameters {', '.join(params)}; "
            f"timestamp {s.timestamp_field!r})"
        )
    return out


def _timestamp_lines(s: NiluSensor, data: Mapping[str, Any]) -> list[str]:
    tag, field = f"sensor {s.id}", s.timestamp_field
    mapped = [
        _path(m.get("target-path"))
        for m in _objects(data.get("mapping"))
        if m.get("name") == "Timestamp"
    ]
    if not mapped:
        return [
            f"FAIL {tag}: NILU has no Timestamp mapping: it would stamp packets with their "
            "arrival time"
        ]
    if mapped[0] != field:
        return [f"FAIL {tag}: NILU maps Timestamp to {mapped[0]!r}, this config sends {field!r}"]
    conv = next(
        (
            c
            for c in _objects(data.get("converters"))
            if _path(c.get("target-path")) == field and c.get("output-type") == "StringEpochTime"
        ),
        None,
    )
    if conv is None:
        if s.timestamp_format is not None:
            return [
                f"FAIL {tag}: NILU expects epoch seconds in {field!r} (no StringEpochTime "
                f"converter) but this config writes {s.timestamp_format!r}"
            ]
        return []
    args = conv.get("input-args")
    args = args if isinstance(args, dict) else {}
    fmt, tz = args.get("input-format"), args.get("timezone") or "UTC"
    if s.timestamp_format is None:
        return [f"FAIL {tag}: NILU reads {field!r} as text {fmt!r}; set timestamp_format"]
    mine = s.timestamp_timezone or "UTC"
    if fmt != s.timestamp_format or tz != mine:
        return [
            f"FAIL {tag}: NILU reads {field!r} as {fmt!r} in {tz}, this config writes "
            f"{s.timestamp_format!r} in {mine}"
        ]
    return []


def _objects(value: object) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _names(value: object) -> set[str] | None:
    if not isinstance(value, list):
        return None
    return {str(p["name"]) for p in _objects(value) if "name" in p}


def _path(value: object) -> str:
    return str(value or "").lstrip("/").lstrip("$.")


async def _push(
    client: httpx.AsyncClient, cfg: NiluConfig, s: NiluSensor, token: Secret
) -> list[str]:
    routes = [r for r in cfg.routes if r.sensor == s.id]
    plan = SensorPlan.of(s, cfg.url, frozenset(r.parameter for r in routes))
    now_ms = int(time.time()) // s.resolution_s * s.resolution_s * 1000
    body = pk.encode(
        pk.build_packet(
            {r.parameter: r.sample for r in routes}, s.timestamp_field, plan.timestamp(now_ms)
        )
    )
    endpoint, lines = plan.endpoint, list[str]()
    for _ in range(MAX_HOPS + 1):
        url = pk.pushtest_url(pk.fill_endpoint(endpoint, PUSHTEST_POSITION, 0.0))
        where = urlsplit(url).path + "?" + urlsplit(url).query
        try:
            resp = await client.post(url, content=body, headers=_headers(token))
        except httpx.HTTPError as exc:
            return [*lines, f"FAIL sensor {s.id}: push-test not sent: {_transport(exc)}"]
        if resp.status_code in DELIVERED:
            return [*lines, f"OK   sensor {s.id}: push-test accepted at {where} (nothing stored)"]
        if resp.status_code != 300:
            return [*lines, f"FAIL sensor {s.id}: push-test refused at {where}: {_refusal(resp)}"]
        header = resp.headers.get("endpoint")
        target = pk.resolve_endpoint(header, url) if header else ""
        if not target or not pk.same_origin(target, cfg.url):
            return [
                *lines,
                f"FAIL sensor {s.id}: HTTP 300 with endpoint {target[:200]!r}, "
                "which is not followed (missing or on another host)",
            ]
        hint = (
            " (the sensor has a fixed location at NILU: set gps = false)"
            if s.gps and not pk.needs_position(target)
            else ""
        )
        lines.append(f"WARN sensor {s.id}: NILU redirects to endpoint {target}{hint}")
        endpoint = target
    return [*lines, f"FAIL sensor {s.id}: more than {MAX_HOPS} redirects in a row"]


def _refusal(resp: httpx.Response) -> str:
    if resp.status_code in (401, 403):
        return f"token refused (HTTP {resp.status_code})"
    err = pk.service_error(resp.content)
    if err.code is None:
        return http.reason_text(resp)
    hint = HINTS.get(err.code) if resp.status_code == 500 else None
    text = f"HTTP {resp.status_code} error-code {err.code}: {err.message}"
    return f"{text} ({hint})" if hint else text


def _transport(exc: Exception) -> str:
    failure = http.transport_failure(exc).failure
    return failure.message if failure else type(exc).__name__
