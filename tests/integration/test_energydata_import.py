"""Energydata.dk backfill through the batch import API, against the emulator over real HTTP."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Secret, StoreConfig
from gateway.models import Reading
from gateway.sandbox.emulator import ManualClock
from gateway.sandbox.energydata_broker import EnergydataBroker
from gateway.sandbox.energydata_import import Datastream, EnergydataImportEmulator
from gateway.sandbox.mosquitto import Mosquitto, free_port
from gateway.store import Store
from gateway.uplinks.dispatch import UplinkRunner, UplinkState
from gateway.uplinks.energydata.config import EnergydataConfig
from gateway.uplinks.energydata.uplink import EnergydataUplink

TOKEN = "edk-import-token-123"
MQTT_TOKEN = "edk-mqtt-token-456"
DAY = 86_400_000
N_SERIES = 20
# Even series are addressed by datastream id, odd ones by topic; every fifth is an integer.
ROUTES = [
    {
        "series": f"s{i}",
        "dataset": "site",
        "suffix": f"m/{i}",
        **({"datastream": 5000 + i} if i % 2 == 0 else {}),
        **({"datatype": "integer"} if i % 5 == 0 else {}),
    }
    for i in range(N_SERIES)
]
STREAMS = [
    Datastream(5000 + i, f"siteA/m/{i}", "integer" if i % 5 == 0 else "double")
    for i in range(N_SERIES)
]
STREAM_OF = {f"s{i}": 5000 + i for i in range(N_SERIES)}


class Harness:
    def __init__(
        self,
        store: Store,
        runner: UplinkRunner,
        uplink: EnergydataUplink,
        emu: EnergydataImportEmulator,
    ) -> None:
        self.store, self.runner, self.uplink, self.emu = store, runner, uplink, emu
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.runner.run(), name="uplink:edk")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.uplink.aclose()

    async def until(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.store.wait_for_data(0.02)

    async def drained(self, timeout: float = 60) -> None:
        """Nothing pending, counted from the store's delivery state (not a running counter)."""
        async with asyncio.timeout(timeout):
            while True:
                await self.store.refresh_stats()
                if self.store.uplink_stats("edk")["backlog"] == 0:
                    return
                await self.store.wait_for_data(0.05)


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Harness, asyncio.Task[None]]] = []

    async def make(
        mqtt_port: int | None = None,
        token: str = TOKEN,
        emu_kw: dict[str, Any] | None = None,
        backfill: dict[str, Any] | None = None,
        **cfg_kw: Any,
    ) -> Harness:
        emu = EnergydataImportEmulator(TOKEN, datastreams=STREAMS, **(emu_kw or {}))
        await emu.start()
        cfg = EnergydataConfig.model_validate(
            {
                "name": "edk",
                "type": "energydata",
                "host": "127.0.0.1",
                "tls": False,
                "port": mqtt_port or free_port(),
                "token": {"env": "UNUSED"},
                "datasets": [{"name": "site", "prefix": "siteA"}],
                "routes": ROUTES,
                "backoff_initial_s": 0.05,
                "backoff_max_s": 0.2,
                "connect_timeout_s": 5,
                # One worker unless a test needs two (see test_energydata_mqtt.edk_cfg).
                "concurrency": 1,
                "backfill": {
                    "url": f"{emu.url}/api/v1",
                    "token": {"env": "UNUSED"},
                    "older_than_s": 3600,
                    "min_readings": 100,
                    "poll_s": 0.05,
                    **(backfill or {}),
                },
                **cfg_kw,
            }
        )
        store = await Store.open(
            StoreConfig(path=tmp_path / f"i{len(made)}.db", commit_interval_ms=10),
            {"edk": cfg.routed_series()},
        )
        writer = asyncio.create_task(store.run(), name="store:writer")
        up = EnergydataUplink(cfg, Secret(MQTT_TOKEN, "test"), Secret(token, "test"))
        h = Harness(store, UplinkRunner(up, cfg, store), up, emu)
        made.append((h, writer))
        return h

    yield make
    for h, writer in made:
        await h.stop()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await h.store.aclose()
        await h.emu.aclose()


def backlog(n_instants: int, t0: int, step_ms: int = 1000) -> list[Reading]:
    out = []
    for k in range(n_instants):
        t = t0 + k * step_ms
        for i in range(N_SERIES):
            value: float | int = (k * 7 + i) % 1000 if i % 5 == 0 else round(k * 0.01 + i, 3)
            out.append(Reading(f"s{i}", t, value))
    return out


def mqtt_values(front: EnergydataBroker) -> set[tuple[str, int, object]]:
    """(topic, timestamp, value) of every value the broker acknowledged."""
    out = set()
    for topic, payload in front.stored:
        msg = json.loads(payload)
        if isinstance(msg["value"], dict):
            out |= {(f"{topic}/{k}", msg["timestamp"], v) for k, v in msg["value"].items()}
        else:
            out.add((topic, msg["timestamp"], msg["value"]))
    return out


def expected(rs: list[Reading]) -> dict[int, dict[int, object]]:
    out: dict[int, dict[int, object]] = {}
    for r in rs:
        out.setdefault(STREAM_OF[r.series], {})[r.ts] = r.value
    return out


async def test_backlog_of_100k_readings_goes_through_a_few_imports_row_for_row(
    env: Callable[..., Any],
) -> None:
    h: Harness = await env()
    rs = backlog(5000, int(time.time() * 1000) - 2 * DAY)  # 100,000 readings, 20 series
    assert len(rs) == 100_000
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.drained(timeout=120)
    assert h.emu.values == expected(rs)  # every value, by datastream and instant
    assert 1 <= len(h.emu.imports) <= 5 and all(j.status == "done" for j in h.emu.imports.values())
    assert h.emu.ingested == len(rs)
    assert h.store.uplink_stats("edk")["delivered"] == len(rs)
    assert h.uplink.status().get("mqtt") is None  # nothing went over MQTT
    assert h.runner.state is UplinkState.OK


async def test_live_stream_keeps_flowing_over_mqtt_while_the_backfill_runs(
    tmp_path: Path, env: Callable[..., Any]
) -> None:
    async with (
        Mosquitto(tmp_path / "mq", acl={MQTT_TOKEN: ["readwrite #"]}) as mq,
        EnergydataBroker(("127.0.0.1", mq.port), tokens={MQTT_TOKEN: ["#"]}) as front,
    ):
        h: Harness = await env(front.port, concurrency=2)
        old = backlog(250, int(time.time() * 1000) - DAY)
        await h.store.ingest(old, durable=True)
        h.emu.hold()  # validation takes as long as the test says
        h.start()
        await h.emu.wait_for(lambda: any(j.status == "validating" for j in h.emu.imports.values()))
        live = [
            Reading(f"s{i}", int(time.time() * 1000) + k, float(k))
            for k in range(5)
            for i in range(N_SERIES)
        ]
        await h.store.ingest(live, durable=True)
        # The newest readings reach the service over MQTT while the import is still held.
        want = {(f"siteA/m/{r.series[1:]}", r.ts, r.value) for r in live}
        await front.wait_for(lambda: want <= mqtt_values(front), timeout=20)
        assert mqtt_values(front) == want
        assert all(j.status == "validating" for j in h.emu.imports.values())
        await h.emu.release()
        await h.drained()
        assert h.emu.values == expected(old)
        assert h.runner.state is UplinkState.OK


async def test_failed_validation_dead_letters_just_the_offending_readings(
    env: Callable[..., Any],
) -> None:
    # s0 is an integer datastream at the service; the gateway's route says double, so a
    # fractional value passes the local check and only the service's validation refuses it.
    h: Harness = await env(routes=[{**ROUTES[0], "datatype": "double"}, *ROUTES[1:]])
    t0 = int(time.time() * 1000) - DAY
    good = backlog(20, t0)
    bad = [Reading("s0", t0 + 500 + k * 1000, 2.5 + k) for k in range(3)]
    await h.store.ingest(good + bad, durable=True)
    h.start()
    await h.drained()
    letters = await h.store.dead_letters("edk")
    assert sorted(d["ts"] for d in letters) == [r.ts for r in bad]
    assert all("is not a valid integer" in d["reason"] for d in letters)
    assert h.emu.values == expected(good)
    assert [j.status for j in h.emu.imports.values()] == ["done"]  # the failed one was deleted
    assert h.emu.count(method="DELETE") == 1


@pytest.mark.parametrize(
    ("prefix", "status", "step"),
    [
        ("/api/v1/import", 503, "import create"),
        ("/s3/", 403, "import upload"),
        ("/api/v1/import/1340/validate", 500, "import validate"),
        ("/api/v1/import/1340/ingest", 429, "import ingest"),
    ],
)
async def test_each_step_failure_is_classified_and_retried(
    env: Callable[..., Any], prefix: str, status: int, step: str
) -> None:
    h: Harness = await env()
    rs = backlog(10, int(time.time() * 1000) - DAY)
    h.emu.faults.fail_next(1, status=status, prefix=prefix)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.drained()
    assert h.emu.values == expected(rs)
    assert h.runner.requests["transient"] == 1 and step in (h.runner.last_error or "")
    assert h.emu.faults.injected["fail"] == 1


async def test_refused_token_is_auth_failed_and_waiting_too_long_is_transient(
    env: Callable[..., Any],
) -> None:
    h: Harness = await env(token="wrong-token", auth_retry_s=3600)
    rs = backlog(10, int(time.time() * 1000) - DAY)
    await h.store.ingest(rs, durable=True)
    h.start()
    await h.until(lambda: h.runner.state is UplinkState.AUTH_FAILED)
    assert "import create: HTTP 401" in (h.runner.last_error or "")
    assert "wrong-token" not in json.dumps(h.runner.status(), default=str)
    assert h.store.uplink_stats("edk")["backlog"] == len(rs)

    slow: Harness = await env(backfill={"max_wait_s": 0.3, "timeout_s": 2})
    await slow.store.ingest(rs, durable=True)
    slow.emu.hold()
    slow.start()
    await slow.until(lambda: slow.runner.state is UplinkState.BACKING_OFF)
    assert "validation not finished within 0.3 s" in (slow.runner.last_error or "")
    await slow.emu.release()
    await slow.drained()
    assert slow.emu.values == expected(rs)


async def test_emulator_enforces_the_documented_protocol() -> None:
    clock = ManualClock()
    async with (
        EnergydataImportEmulator(TOKEN, datastreams=STREAMS, clock=clock) as emu,
        httpx.AsyncClient(base_url=f"{emu.url}/api/v1") as c,
    ):
        auth = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/json"}
        assert (await c.post("/import", params={"importname": "x"})).status_code == 401
        job = (await c.post("/import", params={"importname": "x"}, headers=auth)).json()
        assert job["status"] == "stored" and job["name"] == "x" and job["user_id"] == 11
        jid = job["id"]
        assert (await c.put(f"/import/{jid}/validate", headers=auth)).status_code == 409
        url = (await c.get(f"/import/{jid}/upload_url", headers=auth)).json()["upload_url"]
        assert url.startswith(emu.url + "/s3/import/inbox/") and "X-Amz-Signature=" in url
        body = b";5000;siteA/m/1\r\n2021-03-10T20:24:30.139Z;7;1.5\r\n"
        assert (
            await c.put(url.replace("X-Amz-Signature=", "X-Amz-Signature=0"), content=body)
        ).status_code == 403
        clock.advance(7201)
        assert (await c.put(url, content=body)).status_code == 403  # expired
        url = (await c.get(f"/import/{jid}/upload_url", headers=auth)).json()["upload_url"]
        assert (await c.put(url, content=body)).status_code == 200
        assert (await c.put(f"/import/{jid}/ingest", headers=auth)).status_code == 409
        assert (await c.put(f"/import/{jid}/validate", headers=auth)).status_code == 202
        states = [(await c.get(f"/import/{jid}", headers=auth)).json()["status"] for _ in range(2)]
        assert states == ["validating", "ready"]
        assert (await c.put(f"/import/{jid}/ingest", headers=auth)).status_code == 202
        states = [(await c.get(f"/import/{jid}", headers=auth)).json()["status"] for _ in range(2)]
        assert states == ["ingesting", "done"]
        values = await c.get(
            "/datastreams/values", params={"ids": "5000,5001", "latest": "true"}, headers=auth
        )
        assert values.headers["content-type"].startswith("text/csv")
        assert values.text == "5000,1615407870139,7\r\n5001,1615407870139,1.5\r\n"
        span = await c.get(
            "/datastreams/values",
            headers=auth,
            params={"ids": "5001", "from": "2021-03-10T20:24:30", "to": "2021-03-10T20:24:30"},
        )
        assert span.text == "5001,1615407870139,1.5\r\n"
