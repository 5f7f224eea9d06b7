"""The NILU uplink through the shared machinery, against the NILU emulator over real HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from gateway.config import Secret
from gateway.models import Position, Reading
from gateway.sandbox.nilu import Converter, NiluEmulator, SensorSchema
from gateway.uplinks.dispatch import UplinkState
from gateway.uplinks.nilu.config import NiluConfig
from gateway.uplinks.nilu.uplink import NiluUplink

from .uplink_harness import Harness, Harnesses

TOKEN = "nilu-test-token-123"
#: No daylight saving time and a half-hour offset: an offset mistake cannot hide.
ZONE = "Asia/Kolkata"
FMT = "yyyy/MM/dd HH:mm:ss"


async def pushtest(cfg: NiluConfig, token: Secret) -> list[str]:
    up = NiluUplink(cfg, token)
    try:
        return await up.check_uplink()
    finally:
        await up.aclose()


def schemas() -> list[SensorSchema]:
    return [
        SensorSchema(
            393,
            {"no2": "double", "pm10": "double", "date": "long"},
            timestamp="date",
            converters={"date": Converter("StringEpochTime", FMT, ZONE)},
        ),
        SensorSchema(
            394, {"temperature": "double", "time": "long"}, timestamp="time", location=None
        ),
        SensorSchema(395, {"no2": "double", "so2": "double"}, timestamp="time"),
        SensorSchema(
            396, {"no2": "double"}, timestamp="time", converters={"no2": Converter("StringDouble")}
        ),
        SensorSchema(398, {"no2": "double"}, timestamp="time"),
    ]


SENSORS: dict[int, dict[str, object]] = {
    393: {
        "id": 393,
        "resolution_s": 60,
        "timestamp_field": "date",
        "timestamp_format": FMT,
        "timestamp_timezone": ZONE,
    },
    394: {"id": 394, "resolution_s": 60, "gps": True, "timestamp_field": "time"},
    395: {"id": 395, "resolution_s": 60, "timestamp_field": "time"},
    396: {"id": 396, "resolution_s": 60, "timestamp_field": "time"},
    397: {"id": 397, "resolution_s": 60, "timestamp_field": "time"},
}
ROUTES: dict[str, dict[str, object]] = {
    "aq.no2": {"series": "aq.no2", "sensor": 393, "parameter": "no2"},
    "aq.pm10": {"series": "aq.pm10", "sensor": 393, "parameter": "pm10"},
    "van.temp": {"series": "van.temp", "sensor": 394, "parameter": "temperature"},
    "s395.no2": {"series": "s395.no2", "sensor": 395, "parameter": "no2"},
    "s396.no2": {"series": "s396.no2", "sensor": 396, "parameter": "no2"},
    "s397.no2": {"series": "s397.no2", "sensor": 397, "parameter": "no2"},
}


def ncfg(
    url: str, series: Sequence[str] = ("aq.no2", "aq.pm10", "van.temp"), **kw: object
) -> NiluConfig:
    routes = [ROUTES[s] for s in series]
    used = sorted({int(str(r["sensor"])) for r in routes})
    data: dict[str, object] = {
        "name": "nilu",
        "type": "nilu",
        "url": url,
        "token": {"env": "UNUSED"},
        "sensors": [SENSORS[i] for i in used],
        "routes": routes,
        "rate_limit_requests": 0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "timeout_s": 5,
        # Readings are stored all at once here: the newest window of each series closes 0.2 s
        # after the store took it, not one resolution later (test_window_replay.py: the default).
        "window_grace_s": 0.2,
        **kw,
    }
    return NiluConfig.model_validate(data)


Make = Callable[..., Any]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Make]:
    hs = Harnesses(tmp_path)

    async def make(
        series: Sequence[str] = ("aq.no2", "aq.pm10", "van.temp"),
        token: str = TOKEN,
        emu_kw: dict[str, Any] | None = None,
        **cfg_kw: object,
    ) -> Harness:
        emu = await hs.serve(NiluEmulator(schemas(), TOKEN, **(emu_kw or {})))
        cfg = ncfg(emu.url, series, **cfg_kw)
        return await hs.build(cfg, NiluUplink(cfg, Secret(token, "test")), emu)

    yield make
    await hs.aclose()


def minutes(n: int) -> list[int]:
    """``n`` timestamps (ms) one minute apart, on whole minutes, the last one's window closed.

    Shared downsampling holds a window until the clock is a window past its end; these are
    past that, so every packet goes at once and keeps its timestamp and value.
    """
    last = (int(time.time()) // 60 - 2) * 60
    return [(last - 60 * (n - 1 - i)) * 1000 for i in range(n)]


POS = [
    Position(lat=round(59.9127 + i / 1000, 4), lon=round(10.7461 - i / 1000, 4), alt=12.5)
    for i in range(100)
]


def readings(ts: Sequence[int], *, gps: bool = True) -> list[Reading]:
    out: list[Reading] = []
    for i, t in enumerate(ts):
        out.append(Reading("aq.no2", t, round(10 + i * 0.25, 3)))
        out.append(Reading("aq.pm10", t, 20 + i))
        if gps:
            out.append(Reading("van.temp", t, round(-3.5 + i / 8, 3), position=POS[i]))
    return out


def local_text(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms // 1000, ZoneInfo(ZONE)).strftime("%Y/%m/%d %H:%M:%S")


def expected(rs: Sequence[Reading]) -> set[tuple[object, ...]]:
    """(sensor, position, values, timestamp) per packet, built from what the sources made."""
    packets: dict[tuple[int, int], dict[str, object]] = {}
    where: dict[tuple[int, int], tuple[float, float, float] | None] = {}
    for r in rs:
        route = ROUTES[r.series]
        key = (int(str(route["sensor"])), r.ts // 1000)
        packets.setdefault(key, {})[str(route["parameter"])] = r.value
        p = r.position
        where[key] = None if p is None or key[0] != 394 else (p.lon, p.lat, p.alt or 0.0)
    return {(k[0], where[k], tuple(sorted(v.items())), k[1]) for k, v in packets.items()}


def received(emu: NiluEmulator) -> set[tuple[object, ...]]:
    return {
        (p.sensor, p.position, tuple(sorted(p.values.items())), p.timestamp) for p in emu.packets
    }


async def test_packets_arrive_exactly_as_documented(env: Make) -> None:
    h: Harness = await env()
    ts = minutes(30)
    rs = readings(ts)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.packets) >= 2 * len(ts))
    assert len(h.emu.packets) == 2 * len(ts)
    assert received(h.emu) == expected(rs)
    for p in h.emu.packets:  # the wire form: only declared keys, the timestamp as mapped
        if p.sensor == 393:
            assert set(p.raw) == {"no2", "pm10", "date"}
            assert p.raw["date"] == local_text(p.timestamp * 1000)
        else:
            assert set(p.raw) == {"temperature", "time"} and p.raw["time"] == p.timestamp
    assert h.emu.refused == [] and h.emu.duplicates == 0
    await h.until(lambda: h.stats()["backlog"] == 0)
    assert h.runner.state is UplinkState.OK and h.stats()["dead_letters"] == 0


async def test_service_down_then_up_loses_nothing(env: Make) -> None:
    # Leases of 12 readings: the backlog drains over several (3 readings a minute).
    h: Harness = await env(batch_max_items=12)
    await h.emu.aclose()
    rs = readings(minutes(15))
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    assert "connect" in (h.runner.last_error or "")
    assert h.stats()["backlog"] == len(rs)
    await h.emu.start()  # the service comes back on the same address
    await h.until(lambda: len(h.emu.packets) >= 30)
    assert received(h.emu) == expected(rs)
    await h.until(lambda: h.runner.state is UplinkState.OK and h.stats()["backlog"] == 0)


async def test_a_lease_ending_inside_a_packet_holds_that_packet_back_whole(env: Make) -> None:
    # Leases of 4 readings, 3 a minute (sensor 393's packet takes two, 394's one): most leases
    # end between a 393 packet's no2 and its pm10. NILU takes one packet per sensor and
    # instant (SendsWholeGroups): sending the part would make two packets for one timestamp.
    h: Harness = await env(batch_max_items=4)
    rs = readings(minutes(12))
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.stats()["backlog"] == 0)
    assert len(h.emu.packets) == 2 * 12 and h.emu.duplicates == 0
    assert received(h.emu) == expected(rs)
    assert h.stats()["dead_letters"] == 0


async def test_429_retry_after_is_honoured(env: Make) -> None:
    h: Harness = await env()
    h.emu.faults.fail_next(1, status=429, retry_after=1)
    rs = readings(minutes(3))
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    assert 0.5 < h.runner.status()["retry_in_s"] <= 1.0
    await h.until(lambda: len(h.emu.packets) >= 6)
    assert received(h.emu) == expected(rs)
    ok_at = [r.at for r in h.emu.requests if r.status == 200]
    refused_at = [r.at for r in h.emu.requests if r.status == 429]
    assert ok_at[0] - refused_at[0] >= 0.99  # not a second earlier than the service asked


@pytest.mark.parametrize("code", [300, 305])
async def test_backend_errors_are_transient(env: Make, code: int) -> None:
    h: Harness = await env()
    h.emu.faults.fail_next(
        2,
        status=500,
        body={"error-code": code, "error-message": "backend", "http-status-code": 500},
    )
    rs = readings(minutes(4))
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.packets) >= 8)
    assert received(h.emu) == expected(rs)
    assert h.runner.requests["transient"] == 2 and h.stats()["dead_letters"] == 0


async def test_schema_mismatch_110_is_dead_lettered_with_the_reason(env: Make) -> None:
    # Sensor 395 declares so2 too; nothing is routed to it, so every packet lacks it.
    h: Harness = await env(series=("aq.no2", "aq.pm10", "s395.no2"))
    ts = minutes(5)
    good = readings(ts, gps=False)
    bad = [Reading("s395.no2", t, 1.5) for t in ts]
    await h.store.ingest(good + bad, durable=True)
    h.start()
    await h.until(lambda: h.stats()["dead_letters"] == len(bad) and h.stats()["backlog"] == 0)
    letters = await h.store.dead_letters("nilu")
    assert sorted(d["ts"] for d in letters) == ts
    assert all("error-code 110" in d["reason"] and "missing so2" in d["reason"] for d in letters)
    assert received(h.emu) == expected(good)


async def test_conversion_error_131_dead_letters_only_that_packet(env: Make) -> None:
    h: Harness = await env(series=("s396.no2",))
    ts = minutes(4)
    values = ["12.5", "ERR", "13", "14.25"]
    await h.store.ingest(
        [Reading("s396.no2", t, v) for t, v in zip(ts, values, strict=True)], durable=True
    )
    h.start()
    await h.until(lambda: h.stats()["dead_letters"] == 1 and h.stats()["backlog"] == 0)
    [letter] = await h.store.dead_letters("nilu")
    assert letter["ts"] == ts[1] and letter["value"] == "ERR"
    assert "error-code 131" in letter["reason"] and "no2" in letter["reason"]
    assert sorted((p.timestamp, p.values["no2"]) for p in h.emu.packets) == [
        (t // 1000, v) for t, v in zip(ts, values, strict=True) if v != "ERR"
    ]


async def test_disabled_sensor_keeps_its_data_and_does_not_spin(env: Make) -> None:
    h: Harness = await env(disabled_retry_s=3)
    await h.emu.set_enabled(393, False)
    rs = readings(minutes(3), gps=False)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    assert "sensor 393 is disabled" in (h.runner.last_error or "")
    assert h.runner.status()["retry_in_s"] > 1.0  # the long pause, not the 0.05 s backoff
    assert h.stats()["backlog"] == len(rs) and h.stats()["dead_letters"] == 0
    await h.emu.set_enabled(393, True)
    await h.until(lambda: len(h.emu.packets) >= 3)
    assert received(h.emu) == expected(rs)
    assert [r.code for r in h.emu.refused] == [400]  # one refusal, then the wait
    await h.until(lambda: h.runner.state is UplinkState.OK)


async def test_300_endpoint_is_followed_and_remembered(env: Make) -> None:
    h: Harness = await env(series=("s397.no2",), emu_kw={"moved": {397: 398}})
    ts = minutes(3)
    await h.store.ingest([Reading("s397.no2", ts[0], 1.0)], durable=True)
    h.start()
    await h.until(lambda: len(h.emu.packets) == 1)
    new = f"{h.emu.url}/api/sensors/398/inbound"
    await h.until(lambda: h.runner.moved_to == new)
    await h.store.ingest([Reading("s397.no2", t, 2.0) for t in ts[1:]], durable=True)
    await h.until(lambda: len(h.emu.packets) == 3)
    assert {p.sensor for p in h.emu.packets} == {398}
    assert h.emu.count(path="/api/sensors/397/") == 1  # later packets go straight to 398
    assert h.emu.count(path="/api/sensors/398/", status=200) == 3


async def test_gps_sensor_configured_for_a_fixed_one_follows_the_documented_300(env: Make) -> None:
    h: Harness = await env(series=("aq.no2", "aq.pm10"), sensors=[{**SENSORS[393], "gps": True}])
    ts = minutes(2)
    rs = [Reading(r.series, r.ts, r.value, position=POS[0]) for r in readings(ts, gps=False)]
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.packets) == 2)
    assert h.runner.moved_to == f"{h.emu.url}/api/sensors/393/inbound"
    assert all(p.position is None for p in h.emu.packets)
    assert [r.status for r in h.emu.refused] == [300]


async def test_gps_sensor_with_and_without_a_fix(env: Make) -> None:
    h: Harness = await env(series=("van.temp",))
    ts = minutes(4)
    fixed = [
        Reading("van.temp", ts[0], 1.0, position=POS[3]),
        Reading("van.temp", ts[3], 4.0, position=POS[4]),
    ]
    no_fix = Reading("van.temp", ts[1], 2.0)
    flat = Reading("van.temp", ts[2], 3.0, position=Position(lat=60.0, lon=5.0))
    await h.store.ingest([*fixed, no_fix, flat], durable=True)
    h.start()
    await h.until(lambda: h.stats()["dead_letters"] == 2 and h.stats()["backlog"] == 0)
    assert received(h.emu) == expected(fixed)
    reasons = {d["ts"]: d["reason"] for d in await h.store.dead_letters("nilu")}
    assert reasons[ts[1]].startswith("no GPS fix when measured")
    assert "without altitude" in reasons[ts[2]]
    assert h.emu.total_requests == 2  # nothing was sent with an invented position


async def test_wrong_or_foreign_token_is_auth_failed_and_keeps_data(env: Make) -> None:
    h: Harness = await env(token="not-the-token", auth_retry_s=3600)
    g: Harness = await env(
        token="other-provider", auth_retry_s=3600, emu_kw={"foreign_tokens": ["other-provider"]}
    )
    for x in (h, g):
        await x.store.ingest(readings(minutes(2)), durable=True)
        x.start()
    await h.until(lambda: h.runner.state is UplinkState.AUTH_FAILED)
    await g.until(lambda: g.runner.state is UplinkState.AUTH_FAILED)
    assert h.emu.status_counts[401] == 1 and [r.code for r in g.emu.refused] == [500]
    for x, secret in ((h, "not-the-token"), (g, "other-provider")):
        assert x.stats()["backlog"] == 6
        assert secret not in str(x.runner.status())


async def test_pushtest_stores_nothing_and_reports(env: Make) -> None:
    h: Harness = await env()
    cfg = ncfg(h.emu.url)
    lines = await pushtest(cfg, Secret(TOKEN, "test"))
    assert lines and all(line.startswith("OK") for line in lines), lines
    assert sorted(p.sensor for p in h.emu.pushtests) == [393, 394]
    assert h.emu.packets == []
    assert all(TOKEN not in line for line in lines)

    wrong = ncfg(
        h.emu.url,
        series=("aq.no2", "aq.pm10", "s395.no2"),
        sensors=[{**SENSORS[393], "timestamp_format": "yyyy-MM-dd HH:mm:ss"}, SENSORS[395]],
    )
    bad = await pushtest(wrong, Secret("nope", "test"))
    text = "\n".join(bad)
    assert "FAIL sensor 393: NILU reads 'date' as 'yyyy/MM/dd HH:mm:ss'" in text
    assert "WARN sensor 395: NILU declares parameter 'so2' and no series is routed" in text
    assert "token refused (HTTP 401)" in text
    assert h.emu.packets == []

    await h.emu.aclose()
    down = await pushtest(cfg, Secret(TOKEN, "test"))
    assert down and all(line.startswith("FAIL") for line in down)


async def test_emulator_enforces_the_document(env: Make) -> None:
    h: Harness = await env()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    t = minutes(1)[0] // 1000
    async with httpx.AsyncClient(base_url=h.emu.url, headers=auth) as c:
        fixed_on_gps = await c.post("/api/sensors/393/10/60/1/inbound", json={})
        assert fixed_on_gps.status_code == 300
        assert fixed_on_gps.headers["endpoint"] == f"{h.emu.url}/api/sensors/393/inbound"
        gps_on_fixed = await c.post("/api/sensors/394/inbound", json={"temperature": 1, "time": t})
        assert gps_on_fixed.status_code == 400
        ok = await c.post(
            "/api/sensors/394/5.1/60.2/3/inbound",
            json={"temperature": 1.5, "time": t, "freemembytes": "1024"},
        )
        assert ok.status_code == 200 and ok.json()["message"] == "OK"
        again = await c.post(
            "/api/sensors/394/5.1/60.2/3/inbound",
            json={"temperature": 1.5, "time": t, "freemembytes": "1024"},
        )
        close = await c.post(
            "/api/sensors/394/5.1/60.2/3/inbound", json={"temperature": 2.5, "time": t + 30}
        )
        assert again.status_code == 200 and h.emu.duplicates == 1
        assert close.status_code == 500 and close.json()["error-code"] == 110
        wrong_type = await c.post(
            "/api/sensors/394/5/60/3/inbound/?pushtest=true",
            json={"temperature": "warm", "time": t + 60},
        )
        assert wrong_type.json()["error-code"] == 110
        schema = (await c.get("/api/sensors/394")).json()
        assert schema["location"] == {} and schema["mapping"][0]["target-path"] == "/time"
    assert [p.raw.get("freemembytes") for p in h.emu.packets] == ["1024"]  # kept, as raw data
    assert h.emu.packets[0].position == (5.1, 60.2, 3.0)
