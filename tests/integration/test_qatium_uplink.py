"""The Qatium uplink through the shared machinery, against the Qatium emulator over real HTTP."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.config import Secret
from gateway.models import Reading
from gateway.sandbox.qatium import QatiumEmulator
from gateway.uplinks.dispatch import UplinkState
from gateway.uplinks.qatium.config import QatiumConfig
from gateway.uplinks.qatium.uplink import QatiumUplink, iso_time

from .uplink_harness import Harness, Harnesses

TOKEN = "qatium-test-token-123"
ROUTES = [
    {"series": "tank1.level", "asset": "Tank1", "metric": "level", "unit": "m"},
    {"series": "pipe1.flow", "asset": "Pipe1", "metric": "flow", "unit": "l/s"},
    {"series": "pump2.status", "asset": "Pump2", "metric": "status"},
]
NETWORK = {"Tank1": "tank", "Pipe1": "pipe", "Pump2": "pump"}


def qcfg(url: str, **kw: object) -> QatiumConfig:
    data: dict[str, object] = {
        "name": "qatium",
        "type": "qatium",
        "url": f"{url}/ingest",
        "token": {"env": "UNUSED"},
        "routes": ROUTES,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "timeout_s": 5,
        "job_poll_s": 0.05,
        # The service's quota (20/min) stays; these tests are about the wire, so requests may
        # go back to back (bisection) instead of ~3 s apart (pacing: bench/pacing.py).
        "pacing": "burst",
        **kw,
    }
    return QatiumConfig.model_validate(data)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    hs = Harnesses(tmp_path)

    async def make(
        token: str = TOKEN, emu_kw: dict[str, object] | None = None, **cfg_kw: object
    ) -> Harness:
        emu = await hs.serve(QatiumEmulator(token=TOKEN, assets=NETWORK, **(emu_kw or {})))  # type: ignore[arg-type]
        cfg = qcfg(emu.url, **cfg_kw)
        return await hs.build(cfg, QatiumUplink(cfg, Secret(token, "test")), emu)

    yield make
    await hs.aclose()


def readings(n: int, start: int | None = None) -> list[Reading]:
    t0 = start if start is not None else int(time.time() * 1000) - n * 1000
    out = []
    for i in range(n):
        out.append(Reading("tank1.level", t0 + i * 1000, round(2 + i * 0.01, 3)))
        out.append(Reading("pipe1.flow", t0 + i * 1000, 10 + i))
        out.append(Reading("pump2.status", t0 + i * 1000, i % 2 == 0))
    return out


def expected_rows(rs: list[Reading]) -> list[dict[str, object]]:
    by = {r["series"]: r for r in ROUTES}
    return [
        {
            "time": iso_time(r.ts),
            "asset": by[r.series]["asset"],
            "value": int(r.value) if isinstance(r.value, bool) else r.value,
            "metric": by[r.series]["metric"],
            "unit": by[r.series].get("unit", ""),
        }
        for r in rs
    ]


def key(row: dict[str, object]) -> tuple[object, ...]:
    return (row["time"], row["asset"], row["value"], row["metric"], row["unit"])


async def test_every_reading_arrives_exactly_as_documented(env: Callable[..., object]) -> None:
    h: Harness = await env()  # type: ignore[misc]
    rs = readings(50)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.rows) >= len(rs))
    assert sorted(map(key, h.emu.rows)) == sorted(map(key, expected_rows(rs)))
    assert h.emu.quarantined == []
    await h.until(lambda: h.store.uplink_stats("qatium")["backlog"] == 0)
    assert h.runner.state is UplinkState.OK


async def test_service_down_then_up_loses_nothing(env: Callable[..., object]) -> None:
    h: Harness = await env()  # type: ignore[misc]
    port = h.emu.port
    await h.emu.aclose()
    rs = readings(20)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    assert "connect" in (h.runner.last_error or "")
    assert h.store.uplink_stats("qatium")["backlog"] == len(rs)
    h.emu._requested_port = port  # the service comes back on the same address
    await h.emu.start()
    await h.until(lambda: len(h.emu.rows) >= len(rs))
    assert sorted(map(key, h.emu.rows)) == sorted(map(key, expected_rows(rs)))
    await h.until(lambda: h.runner.state is UplinkState.OK)


@pytest.mark.parametrize("status", [500, 503])
async def test_server_errors_back_off_and_retry(env: Callable[..., object], status: int) -> None:
    h: Harness = await env()  # type: ignore[misc]
    h.emu.faults.fail_next(2, status=status)
    rs = readings(10)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.rows) >= len(rs))
    assert h.emu.status_counts[status] == 2
    assert sorted(map(key, h.emu.rows)) == sorted(map(key, expected_rows(rs)))
    assert h.runner.requests["transient"] == 2


async def test_429_retry_after_is_honoured(env: Callable[..., object]) -> None:
    h: Harness = await env()  # type: ignore[misc]
    h.emu.faults.fail_next(1, status=429, retry_after=1)
    await h.store.ingest(readings(5), durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    assert 0.5 < h.runner.status()["retry_in_s"] <= 1.0
    await h.until(lambda: len(h.emu.rows) >= 15)
    ok_at = [r.at for r in h.emu.requests if r.status == 200]
    refused_at = [r.at for r in h.emu.requests if r.status == 429]
    assert ok_at[0] - refused_at[0] >= 0.99  # not a second earlier than the service asked


async def test_wrong_token_is_auth_failed_and_keeps_data(env: Callable[..., object]) -> None:
    h: Harness = await env(token="not-the-token", auth_retry_s=3600)  # type: ignore[misc]
    await h.store.ingest(readings(5), durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.AUTH_FAILED)
    assert h.emu.status_counts[401] == 1
    assert h.store.uplink_stats("qatium")["backlog"] == 15
    assert "not-the-token" not in str(h.runner.status())


async def test_413_splits_the_batch_and_delivers_all(env: Callable[..., object]) -> None:
    h: Harness = await env(emu_kw={"max_body_bytes": 4000}, rate_limit_requests=0)  # type: ignore[misc]
    rs = readings(100)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.rows) >= len(rs))
    assert h.emu.status_counts[413] >= 1
    assert sorted(map(key, h.emu.rows)) == sorted(map(key, expected_rows(rs)))
    assert h.runner.batch_limit < 300


async def test_quarantined_rows_are_dead_lettered_with_the_service_text(
    env: Callable[..., object],
) -> None:
    # Tank9 passes every local check (valid metric and unit) but is not in the network model.
    h: Harness = await env(
        routes=[
            *ROUTES,
            {
                "series": "tank9.level",
                "asset": "Tank9",  # type: ignore[misc]
                "metric": "level",
                "unit": "m",
            },
        ]
    )
    good = readings(10)
    t = int(time.time() * 1000)
    bad = [Reading("tank9.level", t + i, 1.0 + i) for i in range(3)]
    await h.store.ingest(good + bad, durable=True)
    h.start()
    await h.until(lambda: h.store.uplink_stats("qatium")["dead_letters"] == 3)
    letters = await h.store.dead_letters("qatium")
    assert sorted(d["ts"] for d in letters) == [r.ts for r in bad]
    assert all("Tank9" in d["reason"] and "not in the network" in d["reason"] for d in letters)
    await h.until(lambda: h.store.uplink_stats("qatium")["backlog"] == 0)
    assert sorted(map(key, h.emu.rows)) == sorted(map(key, expected_rows(good)))


async def test_unidentifiable_quarantine_is_bisected(env: Callable[..., object]) -> None:
    # A 'level' reading for a pipe: the service's error names the metric, which every level row
    # shares, so the client cannot tell which row it was from the text and must bisect.
    h: Harness = await env(
        routes=[
            *ROUTES,
            {
                "series": "pipe1.level",
                "asset": "Pipe1",  # type: ignore[misc]
                "metric": "level",
                "unit": "m",
            },
        ]
    )
    good = readings(8)
    bad = Reading("pipe1.level", good[-1].ts + 5, 3.0)
    await h.store.ingest([*good, bad], durable=True)
    h.start()
    await h.until(lambda: h.store.uplink_stats("qatium")["dead_letters"] == 1)
    [letter] = await h.store.dead_letters("qatium")
    assert letter["series"] == "pipe1.level" and "not valid for asset 'Pipe1'" in letter["reason"]
    await h.until(lambda: h.store.uplink_stats("qatium")["backlog"] == 0)
    assert set(map(key, expected_rows(good))) <= set(map(key, h.emu.rows))


async def test_pending_jobs_are_polled(env: Callable[..., object]) -> None:
    h: Harness = await env(
        emu_kw={"async_jobs": True},
        routes=[  # type: ignore[misc]
            *ROUTES,
            {"series": "tank9.level", "asset": "Tank9", "metric": "level", "unit": "m"},
        ],
    )
    await h.store.ingest([Reading("tank9.level", int(time.time() * 1000), 1.0)], durable=True)
    h.start()
    await h.until(lambda: h.store.uplink_stats("qatium")["dead_letters"] == 1)
    assert any(
        r.path.startswith("/jobs/") and not r.path.endswith("/details") for r in h.emu.requests
    )


async def test_local_checks_never_send_nan_or_text(env: Callable[..., object]) -> None:
    h: Harness = await env()  # type: ignore[misc]
    t = int(time.time() * 1000)
    await h.store.ingest(
        [
            Reading("tank1.level", t, float("nan")),
            Reading("pipe1.flow", t, "high"),
            Reading("pump2.status", t, 3),
        ],
        durable=True,
    )
    h.start()
    await h.until(lambda: h.store.uplink_stats("qatium")["dead_letters"] == 3)
    assert h.emu.total_requests == 0
    reasons = sorted(d["reason"] for d in await h.store.dead_letters("qatium"))
    assert any("finite" in r for r in reasons) and any("numbers only" in r for r in reasons)
    assert any("0 or 1" in r for r in reasons)


async def test_backlog_drains_within_the_rate_limit_without_a_single_429(
    env: Callable[..., object],
) -> None:
    h: Harness = await env(
        emu_kw={"rate_limit": 5, "rate_period_s": 2.0},  # type: ignore[misc]
        rate_limit_requests=5,
        rate_limit_period_s=2.0,
        batch_max_items=40,
    )
    rs = readings(200)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: len(h.emu.rows) >= len(rs), timeout=60)
    assert h.emu.status_counts[429] == 0
    assert sorted(map(key, h.emu.rows)) == sorted(map(key, expected_rows(rs)))
