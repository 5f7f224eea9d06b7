"""The Datacooee uplink through the shared machinery, against the Datacooee emulator over HTTP.

Real store, real UplinkRunner, real plugin, real aiohttp server. Every wait is on a condition
(store commits or emulator answers); no sleeps.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from gateway.config import Secret
from gateway.models import Position, Reading
from gateway.sandbox.datacooee import DatacooeeEmulator, InputData
from gateway.sandbox.emulator import ManualClock
from gateway.uplinks.datacooee.config import DatacooeeConfig
from gateway.uplinks.datacooee.uplink import DatacooeeUplink
from gateway.uplinks.dispatch import UplinkState

from .uplink_harness import Harness, Harnesses

ORG = "ZnlvcWXXXXXXXXXXXXXXXXXXXX5ieXVieHgudng="
KEY = "f13d34b-test-key-0123456789a5da135d61"
ROUTES: list[dict[str, object]] = [
    {"series": "well3.level", "input_pk": "senlevel01"},
    {"series": "pump1.count", "input_pk": "sencount01"},
    {"series": "pump1.running", "input_pk": "senrun01"},
    {"series": "valve2.open", "input_pk": "senvalve02", "booleans": "text"},
    {"series": "gate.state", "input_pk": "senstate01"},
]
INPUTS = {
    "senlevel01": "number",
    "sencount01": "number",
    "senrun01": "number",
    "senvalve02": "any",
    "senstate01": "any",
}
Key = tuple[str, str, str, str | None, str | None]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    hs = Harnesses(tmp_path)

    async def make(
        key: str = KEY, emu_kw: dict[str, Any] | None = None, **cfg_kw: object
    ) -> Harness:
        emu = await hs.serve(DatacooeeEmulator(ORG, KEY, **{"inputs": INPUTS, **(emu_kw or {})}))
        data: dict[str, object] = {
            "name": "datacooee",
            "type": "datacooee",
            "url": emu.url,
            "organization_id": ORG,
            "api_key": {"env": "UNUSED"},
            "routes": ROUTES,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
            "timeout_s": 5,
            "rate_limit_requests": 0,
            **cfg_kw,
        }
        cfg = DatacooeeConfig.model_validate(data)
        return await hs.build(cfg, DatacooeeUplink(cfg, Secret(key, "test")), emu)

    yield make
    await hs.aclose()


def now_s() -> int:
    return int(time.time()) - 60


def utc(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))


def mixed(n: int, t0: int | None = None) -> list[Reading]:
    """Readings of every value type, every fourth with a position."""
    base = (t0 if t0 is not None else now_s()) * 1000
    out = []
    for i in range(n):
        ts = base + i * 1000 + 7
        pos = Position(-33.8688197 + i * 1e-4, 151.2092955, 20.0) if i % 4 == 0 else None
        out.append(Reading("well3.level", ts, round(2.0 + i * 0.25, 2), pos))
        out.append(Reading("pump1.count", ts, 1000 + i))
        out.append(Reading("pump1.running", ts, i % 2 == 0))
        out.append(Reading("valve2.open", ts, i % 3 == 0))
        out.append(Reading("gate.state", ts, ["OPEN", "CLOSED", "Ström"][i % 3]))
    return out


def expected(rs: list[Reading]) -> list[Key]:
    """What the service must hold, written out independently of the plugin's code."""
    pk = {str(r["series"]): str(r["input_pk"]) for r in ROUTES}
    out: list[Key] = []
    for r in rs:
        if r.series == "pump1.running":
            value = "1" if r.value else "0"
        elif r.series == "valve2.open":
            value = "true" if r.value else "false"
        else:
            value = str(r.value)  # 2.25, 1000, OPEN: str() is already the shortest form here
        stamp = f"{utc(r.ts // 1000)}.{r.ts % 1000:03d}Z"
        lat = f"{r.position.lat:.7f}".rstrip("0") if r.position else None
        lon = f"{r.position.lon:.7f}".rstrip("0") if r.position else None
        out.append((pk[r.series], value, stamp, lat, lon))
    return sorted(out)


def keys(accepted: list[InputData]) -> list[Key]:
    return sorted((a.input_pk, a.value, a.timestamp, a.latitude, a.longitude) for a in accepted)


# -- delivery ------------------------------------------------------------------------------------


async def test_every_reading_arrives_exactly_as_documented(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    t = now_s()
    first = Reading("well3.level", t * 1000 + 489, 12.5, Position(40.730610, -73.935242, 9.0))
    rs = [first, *mixed(12)]
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.stats()["backlog"] == 0 and len(h.emu.accepted) == len(rs))
    assert keys(h.emu.accepted) == expected(rs)
    [doc] = [a for a in h.emu.accepted if a.timestamp.endswith(".489Z")]
    assert (
        doc.raw
        == (
            '{"data":{"type":"SensorData","id":"null","attributes":{"value":"12.5",'
            f'"timestamp":"{utc(t)}.489Z","latitude":"40.73061","longitude":"-73.935242"}},'
            '"relationships":{"sensor":{"data":{"type":"Sensor","id":"senlevel01"}}}}}'
        ).encode()
    )
    assert h.emu.status_counts[201] == len(rs)
    assert h.stats()["dead_letters"] == 0
    assert h.runner.state is UplinkState.OK


async def test_service_down_then_up_drains_the_backlog(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    await h.emu.aclose()
    rs = mixed(6)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    assert "connect" in (h.runner.last_error or "")
    assert h.stats()["backlog"] == len(rs)
    await h.emu.start()  # back on the same port
    await h.until(lambda: h.stats()["backlog"] == 0)
    assert keys(h.emu.accepted) == expected(rs)
    assert h.runner.state is UplinkState.OK


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_are_retried(env: Callable[..., Any], status: int) -> None:
    h: Harness = await env(concurrency=1)
    h.emu.faults.fail_next(2, status=status)
    rs = mixed(2)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.stats()["backlog"] == 0)
    assert h.emu.status_counts[status] == 2
    assert h.runner.requests["transient"] == 2
    assert keys(h.emu.accepted) == expected(rs)


async def test_dropped_connection_and_foreign_404_keep_the_data(env: Callable[..., Any]) -> None:
    # A 404 that is not the service's JSON:API answer (a proxy page, a wrong base URL) says
    # nothing about the input id: it must not dead-letter anything.
    h: Harness = await env(concurrency=1)
    h.emu.faults.drop_next(1)
    h.emu.faults.fail_next(1, status=404, body="<html>Not Found</html>", content_type="text/html")
    rs = mixed(2)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.stats()["backlog"] == 0)
    assert h.emu.faults.injected == {"drop": 1, "fail": 1}
    assert h.stats()["dead_letters"] == 0
    assert keys(h.emu.accepted) == expected(rs)


async def test_429_retry_after_is_honoured(env: Callable[..., Any]) -> None:
    # One worker: with two, a request already on its way when the 429 lands is not "too early".
    h: Harness = await env(concurrency=1)
    h.emu.faults.fail_next(1, status=429, retry_after=1)
    rs = mixed(1)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    assert h.runner.status()["retry_in_s"] <= 1.0  # the service's hint, not the backoff's
    await h.until(lambda: h.stats()["backlog"] == 0)
    refused_at = [r.at for r in h.emu.requests if r.status == 429]
    ok_at = [r.at for r in h.emu.requests if r.status == 201]
    assert len(refused_at) == 1 and len(ok_at) == len(rs)
    assert ok_at[0] - refused_at[0] >= 0.99  # not a moment before the service said
    assert keys(h.emu.accepted) == expected(rs)


async def test_backlog_drains_within_the_service_rate_limit(env: Callable[..., Any]) -> None:
    # The gateway's window is half a second longer than the service's: a request that takes
    # longer to arrive than the one before it must not make the service see five in a second.
    h: Harness = await env(
        emu_kw={"rate_limit": 4, "rate_period_s": 1.0},
        rate_limit_requests=4,
        rate_limit_period_s=1.5,
    )
    rs = mixed(2)  # 10 requests: three windows
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.stats()["backlog"] == 0)
    assert h.emu.status_counts[429] == 0
    assert keys(h.emu.accepted) == expected(rs)


async def test_service_throttle_is_survived(env: Callable[..., Any]) -> None:
    # The gateway unaware of the limit: the service's 429s and Retry-After pace it instead.
    # The service's window moves only when the test says, so the 429 is certain.
    clock = ManualClock()
    h: Harness = await env(emu_kw={"rate_limit": 3, "rate_period_s": 1.0, "clock": clock})
    rs = mixed(1)  # 5 requests
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.emu.wait_for(lambda: h.emu.status_counts[429] >= 1 and len(h.emu.accepted) == 3)
    clock.advance(1.0)
    await h.until(lambda: h.stats()["backlog"] == 0)
    assert h.emu.faults.injected == {}
    assert keys(h.emu.accepted) == expected(rs)


# -- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "status"), [("wrong-api-key-42", 401), ("read-only-key-7", 403)])
async def test_refused_key_is_auth_failed_and_keeps_data(
    env: Callable[..., Any], key: str, status: int
) -> None:
    h: Harness = await env(
        key=key, emu_kw={"forbidden_keys": ["read-only-key-7"]}, auth_retry_s=3600
    )
    rs = mixed(2)
    await h.store.ingest(rs, durable=True)
    with structlog.testing.capture_logs() as logs:
        h.start()
        await h.until(lambda: h.runner.state is UplinkState.AUTH_FAILED)
    assert h.emu.status_counts[status] >= 1
    assert h.emu.accepted == []
    assert h.stats()["backlog"] == len(rs) and h.stats()["dead_letters"] == 0
    assert h.runner.status()["last_error"].startswith(f"HTTP {status}: ")
    assert key not in str(h.runner.status()) and key not in repr(logs)


async def test_unknown_input_is_dead_lettered_with_the_reason(env: Callable[..., Any]) -> None:
    h: Harness = await env(
        emu_kw={"inputs": {k: v for k, v in INPUTS.items() if k != "senstate01"}}
    )
    rs = mixed(3)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.stats()["backlog"] == 0)
    letters = await h.store.dead_letters("datacooee")
    assert sorted(d["ts"] for d in letters) == [r.ts for r in rs if r.series == "gate.state"]
    for d in letters:
        assert d["series"] == "gate.state"
        assert "does not know input 'senstate01'" in d["reason"] and "Not found." in d["reason"]
    good = [r for r in rs if r.series != "gate.state"]
    assert keys(h.emu.accepted) == expected(good)
    assert h.runner.state is UplinkState.OK


async def test_invalid_value_is_dead_lettered_with_the_service_detail(
    env: Callable[..., Any],
) -> None:
    # The input was set up as numeric in Datacooee, but the series sends text: only the service
    # knows, and says so per request.
    h: Harness = await env(emu_kw={"inputs": {**INPUTS, "senstate01": "number"}})
    rs = mixed(3)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.stats()["backlog"] == 0)
    letters = await h.store.dead_letters("datacooee")
    assert len(letters) == 3 and {d["series"] for d in letters} == {"gate.state"}
    assert all(
        d["reason"] == "refused by Datacooee for input 'senstate01': "
        "value: A valid number is required."
        for d in letters
    )
    assert keys(h.emu.accepted) == expected([r for r in rs if r.series != "gate.state"])
    assert h.emu.status_counts[400] == 3


async def test_empty_text_is_refused_locally(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    await h.store.ingest([Reading("gate.state", now_s() * 1000, "  ")], durable=True)
    h.start()
    await h.until(lambda: h.stats()["dead_letters"] == 1)
    assert h.emu.total_requests == 0
    [letter] = await h.store.dead_letters("datacooee")
    assert "empty" in letter["reason"]


async def test_too_large_single_reading_is_dead_lettered(env: Callable[..., Any]) -> None:
    h: Harness = await env(emu_kw={"max_body_bytes": 300})
    small = Reading("gate.state", now_s() * 1000, "OK")
    big = Reading("gate.state", now_s() * 1000 + 1, "x" * 200)
    await h.store.ingest([small, big], durable=True)
    h.start()
    await h.until(lambda: h.stats()["backlog"] == 0)
    [letter] = await h.store.dead_letters("datacooee")
    assert letter["ts"] == big.ts and letter["reason"].startswith("HTTP 413: ")
    assert keys(h.emu.accepted) == expected([small])


# -- concurrency ---------------------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_never_more_requests_in_flight_than_configured(
    env: Callable[..., Any], concurrency: int
) -> None:
    h: Harness = await env(concurrency=concurrency)
    h.emu.hold()  # uploads wait inside the emulator, counted as in flight
    rs = mixed(4)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.emu.wait_for(lambda: h.emu.in_flight == concurrency)
    # Every worker is now waiting on an answer; none can start another request.
    assert h.emu.max_in_flight == concurrency
    await h.emu.release()
    await h.until(lambda: h.stats()["backlog"] == 0)
    assert h.emu.max_in_flight == concurrency
    assert keys(h.emu.accepted) == expected(rs)
