"""The Vanda uplink through the shared machinery, against the Vanda emulator over real HTTP."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.config import Secret
from gateway.models import Reading, StoredReading
from gateway.sandbox.emulator import ManualClock
from gateway.sandbox.vanda import TOKEN_PATH, Measurement, VandaEmulator
from gateway.sandbox.vanda_tables import EXAMINATION_TYPES as SERVICE_TABLE
from gateway.uplinks.dispatch import UplinkState
from gateway.uplinks.vanda.config import VandaConfig
from gateway.uplinks.vanda.tables import EXAMINATION_TYPES, format_minute, round_result
from gateway.uplinks.vanda.uplink import VandaUplink

from .uplink_harness import Harness, Harnesses

CLIENT, SECRET = "fieldgate-test-client", "vanda-test-secret-123"
FIVE_MIN = 300_000
ROUTES: list[dict[str, Any]] = [
    {
        "series": "river1.level",
        "station_id": "52000123",
        "measurement_point_number": 1,
        "examination_type_sc": 25,
        "reason_code_sc": 5,
        "logger_id": "L-07",
    },
    {
        "series": "well7.level",
        "operator_station_id": "ACME-W7",
        "measurement_point_number": 2,
        "examination_type_sc": 31,
        "reason_code_sc": 17,
    },
]
STATION = {"river1.level": "52000123", "well7.level": "ACME-W7"}
#: The emulator's table (its own transcription of the document) with a narrower type 25.
NARROW = {**SERVICE_TABLE, 25: replace(SERVICE_TABLE[25], max=500.0)}
MEASUREMENTS = "/api/measurements"


def vcfg(emu: VandaEmulator, **kw: object) -> VandaConfig:
    data: dict[str, object] = {
        "name": "vanda",
        "type": "vanda",
        "api_url": emu.api_url,
        "token_url": emu.token_url,
        "client_id": {"env": "UNUSED"},
        "client_secret": {"env": "UNUSED"},
        "routes": ROUTES,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "timeout_s": 5,
        # Every reading here is stored at once and minutes old: windows close as soon as they
        # end, so one lease holds them all (test_window_replay.py: the default grace).
        "window_grace_s": 0,
        **kw,
    }
    return VandaConfig.model_validate(data)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    hs = Harnesses(tmp_path)

    async def make(
        secret: str = SECRET,
        emu_kw: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        **cfg_kw: object,
    ) -> Harness:
        emu = await hs.serve(VandaEmulator({CLIENT: SECRET}, **(emu_kw or {})))
        cfg = vcfg(emu, **cfg_kw)
        up = VandaUplink(cfg, Secret(CLIENT, "test"), Secret(secret, "test"), clock=clock)
        return await hs.build(cfg, up, emu)

    yield make
    await hs.aclose()


def t0(hours_ago: int = 6) -> int:
    """An hour boundary in the past: every window there is closed."""
    now = int(time.time() * 1000)
    return (now // 3_600_000 - hours_ago) * 3_600_000


def readings(
    n: int,
    start: int | None = None,
    *,
    series: tuple[str, ...] = tuple(STATION),
    step: int = FIVE_MIN,
) -> list[Reading]:
    """``n`` readings per series, one per window, at the window starts (values with more
    decimals than the service keeps, so rounding shows)."""
    base = start if start is not None else t0()
    out = []
    for i in range(n):
        if "river1.level" in series:
            out.append(Reading("river1.level", base + i * step, 120.04 + i * 1.25))
        if "well7.level" in series:
            out.append(Reading("well7.level", base + i * step, 3.14159 + i * 0.0005))
    return out


def expected(rs: list[Reading]) -> list[Measurement]:
    by = {r["series"]: r for r in ROUTES}
    out = []
    for r in rs:
        route = by[r.series]
        exam = EXAMINATION_TYPES[route["examination_type_sc"]]
        out.append(
            Measurement(
                STATION[r.series],
                route["measurement_point_number"],
                exam.sc,
                exam.parameter_sc,
                exam.unit_sc,
                route.get("logger_id"),
                format_minute(r.ts),
                round_result(r.value, exam.decimals),  # type: ignore[arg-type]
                route["reason_code_sc"],
            )
        )
    return out


def key(m: Measurement) -> tuple[object, ...]:
    return (m.station, m.examination_type_sc, m.measurement_date_time)


def same(got: list[Measurement], want: list[Measurement]) -> bool:
    return sorted(got, key=key) == sorted(want, key=key)


MINUTE_TEXT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\dZ$")


async def test_measurements_arrive_rounded_as_documented(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    rs = readings(30)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.measurements) >= len(rs))
    assert same(h.emu.measurements, expected(rs))
    assert {m.result for m in h.emu.measurements if m.examination_type_sc == 31} >= {3.142}
    assert all(MINUTE_TEXT.match(r.measurement_date_time) for r in h.emu.received)
    assert h.emu.actions["failed"] == 0
    await h.drained()
    assert h.runner.state is UplinkState.OK
    assert h.emu.count(path=MEASUREMENTS) == 2  # one request per station: two stations
    assert h.emu.tokens_issued == 1


async def test_backlog_drains_after_an_outage(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    await h.emu.aclose()
    rs = readings(20)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    assert "connect" in (h.runner.last_error or "")
    assert h.stats()["backlog"] == len(rs)
    await h.emu.start()  # the service comes back on the same address
    await h.until(lambda: len(h.emu.measurements) >= len(rs))
    assert same(h.emu.measurements, expected(rs))
    await h.until(lambda: h.runner.state is UplinkState.OK)


async def test_429_retry_after_is_honoured(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    h.emu.faults.fail_next(1, status=429, retry_after=1, prefix=MEASUREMENTS)
    rs = readings(5, series=("river1.level",))
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.measurements) >= len(rs))
    refused = [r.at for r in h.emu.requests if r.status == 429]
    ok = [r.at for r in h.emu.requests if r.status == 200 and r.path == MEASUREMENTS]
    assert len(refused) == 1 and ok[0] - refused[0] >= 0.99  # not earlier than asked
    assert h.runner.requests["transient"] == 1
    assert same(h.emu.measurements, expected(rs))


async def test_expired_token_is_refreshed_transparently(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    first = readings(4)
    await h.store.ingest(first, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.measurements) >= len(first))
    h.emu.expire_tokens()  # the IdP's clock says so; the client's cache does not know yet
    later = readings(4, t0() + 4 * FIVE_MIN)
    await h.store.ingest(later, durable=True)
    await h.until(lambda: len(h.emu.measurements) >= len(first + later))
    assert same(h.emu.measurements, expected(first + later))
    assert h.emu.tokens_issued == 2 and h.uplink.tokens.issued == 2
    assert h.emu.status_counts[401] == 1  # one refusal, then the fresh token
    assert h.runner.requests["auth"] == 0
    assert h.runner.state is UplinkState.OK


async def test_token_is_renewed_before_it_expires(env: Callable[..., Any]) -> None:
    clock = ManualClock()
    h: Harness = await env(clock=clock, emu_kw={"clock": clock, "token_lifetime_s": 600})
    first = readings(2)
    await h.store.ingest(first, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.measurements) >= len(first))
    clock.advance(560)  # inside the refresh margin (60 s), before the token's expiry
    later = readings(2, t0() + 2 * FIVE_MIN)
    await h.store.ingest(later, durable=True)
    await h.until(lambda: len(h.emu.measurements) >= len(first + later))
    assert h.emu.tokens_issued == 2
    assert h.emu.status_counts[401] == 0


@pytest.mark.parametrize("how", ["revoked", "wrong_secret"])
async def test_refused_credentials_are_auth_failed_and_keep_data(
    env: Callable[..., Any], how: str
) -> None:
    h: Harness = await env(
        secret="not-the-secret" if how == "wrong_secret" else SECRET, auth_retry_s=3600
    )
    first = readings(2) if how == "revoked" else []
    with capture_logs() as logs:
        if first:
            await h.store.ingest(first, durable=True)
            h.start()
            await h.until(lambda: len(h.emu.measurements) >= len(first))
            h.emu.revoke_client(CLIENT)
        rs = readings(3, t0() + 2 * FIVE_MIN)
        await h.store.ingest(rs, durable=True)
        if not first:
            h.start()
        await h.until(lambda: h.runner.state is UplinkState.AUTH_FAILED)
    assert h.stats()["backlog"] == len(rs)
    assert h.emu.count(path=TOKEN_PATH, status=401) == 1
    assert "invalid_client" in (h.runner.last_error or "")
    shown = f"{h.runner.status()} {logs}"
    for secret in (SECRET, "not-the-secret", CLIENT):
        assert secret not in shown


async def test_out_of_range_is_dead_lettered_locally(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    t = t0()
    await h.store.ingest(
        [
            Reading("river1.level", t, 10_000.06),  # 10000.1 cm > 10000
            Reading("well7.level", t, -5.0004),  # -5.000 m: inside
            Reading("well7.level", t + FIVE_MIN, -5.0006),  # -5.001 m < -5
            Reading("river1.level", t + FIVE_MIN, "high"),
        ],
        durable=True,
    )
    h.start()
    await h.until(lambda: h.stats()["dead_letters"] == 3)
    reasons = sorted(d["reason"] for d in await h.store.dead_letters("vanda"))
    assert any("above the maximum 10000" in r for r in reasons)
    assert any("below the minimum -5" in r for r in reasons)
    assert any("numeric results only" in r for r in reasons)
    await h.drained()
    assert [m.result for m in h.emu.measurements] == [-5.0]
    assert h.emu.count(path=MEASUREMENTS) == 1  # only the valid reading was sent


async def test_failed_items_are_dead_lettered_with_the_service_reason(
    env: Callable[..., Any],
) -> None:
    # The service's table (max 500 cm) is narrower than the document's: the local check passes.
    h: Harness = await env(emu_kw={"examination_types": NARROW})
    rs = readings(6, series=("river1.level",))  # 120.04, 121.29, ... all < 500
    bad = Reading("river1.level", t0() + 6 * FIVE_MIN, 612.5)
    await h.store.ingest([*rs, bad], durable=True)
    h.start()
    await h.until(lambda: h.stats()["dead_letters"] == 1)
    [letter] = await h.store.dead_letters("vanda")
    assert letter["ts"] == bad.ts
    assert letter["reason"].startswith("Vanda errorCode 4002: result 612.5 cm is above")
    await h.drained()
    assert same(h.emu.measurements, expected(rs))
    assert h.emu.count(path=MEASUREMENTS) == 1  # not bisected: the answer named the item


async def test_duplicate_after_a_lost_answer_counts_as_delivered(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    h.emu.drop_answer_next(1)  # stored, then the connection dies before the answer
    rs = readings(5, series=("river1.level",))
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.drained()
    assert h.emu.actions == Counter({"created": 5, "ignored": 5})
    assert same(h.emu.measurements, expected(rs))
    assert h.stats()["dead_letters"] == 0
    assert h.runner.state is UplinkState.OK


@pytest.mark.parametrize("answer", ["per_item", "status_400"])
async def test_transaction_based_isolates_the_bad_item(
    env: Callable[..., Any], answer: str
) -> None:
    h: Harness = await env(
        emu_kw={"examination_types": NARROW, "transaction_failure": answer}, transaction_based=True
    )
    # The culprit is the oldest: the rolled-back rest goes again in a later lease, and the
    # shared downsampling dead-letters a window older than one already settled (see report).
    bad = Reading("river1.level", t0(), 777.7)
    rs = readings(7, t0() + FIVE_MIN, series=("river1.level",))
    await h.store.ingest([*rs, bad], durable=True)
    h.start()
    await h.until(lambda: h.stats()["dead_letters"] == 1)
    [letter] = await h.store.dead_letters("vanda")
    assert letter["ts"] == bad.ts and "errorCode 4002" in letter["reason"]
    await h.drained()
    assert same(h.emu.measurements, expected(rs))
    if answer == "status_400":
        assert h.emu.status_counts[400] >= 2  # bisected down to the single bad item
    else:
        assert h.emu.count(path=MEASUREMENTS) == 2  # culprit named; the rest sent again
    await h.until(lambda: h.runner.state is UplinkState.OK)


async def test_corrections_update_existing_measurements(env: Callable[..., Any]) -> None:
    routes = [
        *ROUTES,
        {
            "series": "river1.fixed",
            "station_id": "52000123",
            "measurement_point_number": 1,
            "examination_type_sc": 25,
            "reason_code_sc": 4,
            "mode": "update",
        },
    ]
    h: Harness = await env(routes=routes)
    rs = readings(3, series=("river1.level",))
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.measurements) == 3)
    fixes = [
        Reading("river1.fixed", rs[1].ts, 99.96),
        Reading("river1.fixed", rs[2].ts, 100.0),
        Reading("river1.fixed", rs[2].ts + 10 * FIVE_MIN, 5.0),
    ]  # nothing there to fix
    await h.store.ingest(fixes, durable=True)
    await h.until(lambda: h.stats()["dead_letters"] == 1)
    await h.drained()
    assert [(m.result, m.reason_code_sc) for m in h.emu.measurements] == [
        (120.0, 5),
        (100.0, 4),
        (100.0, 4),
    ]
    [letter] = await h.store.dead_letters("vanda")
    assert "errorCode 4005" in letter["reason"]
    assert h.emu.count(path="/api/measurements/update") == 1


async def test_never_two_measurements_of_a_series_in_one_minute(env: Callable[..., Any]) -> None:
    h: Harness = await env()
    base = readings(6)
    extra = [replace(r, ts=r.ts + s * 1000, value=float(s)) for r in base for s in (10, 50)]
    await h.store.ingest(base + extra, durable=True)
    h.start()
    await h.drained()
    per_minute = Counter((r.station, r.measurement_date_time) for r in h.emu.received)
    assert per_minute and max(per_minute.values()) == 1
    assert len(h.emu.measurements) == len(base) and h.emu.actions["failed"] == 0


async def test_same_minute_in_one_batch_is_sent_once(env: Callable[..., Any]) -> None:
    # The plugin alone (no dispatcher, so no downsampling): two readings of one minute.
    h: Harness = await env()
    t = t0()
    batch = [
        StoredReading(1, "river1.level", t + 5_000, 50.0),
        StoredReading(2, "river1.level", t + 40_000, 60.0),
        StoredReading(3, "river1.level", t + FIVE_MIN, 70.0),
    ]
    result = await h.uplink.send(batch)
    assert sorted(result.delivered) == [1, 2, 3] and result.failure is None
    assert [(r.measurement_date_time, r.result) for r in h.emu.received] == [
        (format_minute(t), 50.0),
        (format_minute(t + FIVE_MIN), 70.0),
    ]


async def test_min_interval_downsampling(env: Callable[..., Any]) -> None:
    """Depends on the shared downsampling (gateway/uplinks/downsample.py): several readings
    per 5-minute window reach the service as one, stamped with the window's start."""
    h: Harness = await env()
    start = t0()
    rs = [Reading("river1.level", start + i * 60_000, 100.0 + i) for i in range(15)]
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.drained()
    got = sorted((r.measurement_date_time, r.result) for r in h.emu.received)
    assert got == [(format_minute(start + w * FIVE_MIN), 104.0 + 5 * w) for w in range(3)]
    assert h.emu.actions["failed"] == 0


async def test_probe_reports_differences_from_the_builtin_table(env: Callable[..., Any]) -> None:
    table = {**NARROW, 31: replace(SERVICE_TABLE[31], reason_codes=frozenset({0, 1}))}
    h: Harness = await env(emu_kw={"examination_types": table})
    cfg = h.uplink.cfg
    lines = await _differences(cfg)
    assert lines == [
        "examination type 25: max is 500 at the service, 10000 built in",
        "routes[1] (well7.level): reason code 17 is not accepted for examination type 31 "
        "(the service takes [0, 1])",
    ]
    h.emu.table = dict(SERVICE_TABLE)
    assert await _differences(cfg) == []


async def _differences(cfg: VandaConfig) -> list[str]:
    up = VandaUplink(cfg, Secret(CLIENT, "t"), Secret(SECRET, "t"))
    try:
        return await up.examination_type_differences()
    finally:
        await up.aclose()
