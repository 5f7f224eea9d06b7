"""The supervisor in-process: health reasons, task restarts, metrics, status shape."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway
from gateway.config import load_config_text
from gateway.sandbox.qatium import QatiumEmulator
from gateway.sources.base import Emit, SourceStats

TOKEN = "gateway-test-token"

CONFIG = """
[store]
path = "{tmp}/fg.db"
commit_interval_ms = 20
[health]
port = 0
stuck_after_s = {stuck}
[[sources]]
name = "tank"
type = "synthetic"
interval_s = 0.05
[[sources.series]]
name = "tank1.level"
[[uplinks]]
name = "qatium"
type = "qatium"
url = "{url}/ingest"
token = {{ value = "{token}", plain_text = true }}
backoff_initial_s = 0.05
backoff_max_s = 0.2
[[uplinks.routes]]
series = "tank1.level"
asset = "Tank1"
metric = "level"
unit = "m"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Running:
    def __init__(self, gw: Gateway, task: asyncio.Task[int]) -> None:
        self.gw, self.task = gw, task
        assert gw.health_server is not None and gw.health_server.port
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.health_server.port}")

    async def until(self, predicate: Callable[[dict], bool], timeout: float = 20) -> dict:  # type: ignore[type-arg]
        async with asyncio.timeout(timeout):
            while True:
                st = (await self.client.get("/status")).json()
                if predicate(st):
                    return st  # type: ignore[no-any-return]
                assert self.gw.store is not None
                await self.gw.store.wait_for_data(0.05)

    async def stop(self) -> int:
        await self.client.aclose()
        self.gw.stop_event.set()
        return await self.task


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    running: list[Running] = []

    async def go(
        url: str, stuck: float = 3600, tweak: Callable[[Gateway], None] | None = None
    ) -> Running:
        loaded = load_config_text(CONFIG.format(tmp=tmp_path, url=url, stuck=stuck, token=TOKEN))
        gw = Gateway(loaded)
        if tweak is not None:
            tweak(gw)
        task = asyncio.create_task(gw.run(), name="gateway")
        async with asyncio.timeout(20):
            await gw.ready.wait()
        r = Running(gw, task)
        running.append(r)
        return r

    yield go
    for r in running:
        if not r.task.done():
            await r.stop()


async def test_status_health_and_metrics_while_delivering(start: Callable[..., object]) -> None:
    async with QatiumEmulator(token=TOKEN) as emu:
        r: Running = await start(emu.url)  # type: ignore[misc]
        st = await r.until(lambda s: s["uplinks"]["qatium"]["delivered"] >= 5)
        assert st["sources"]["tank"]["readings"] >= 5 and st["sources"]["tank"]["state"] == "ok"
        u = st["uplinks"]["qatium"]
        assert {
            "state",
            "delivered",
            "backlog",
            "oldest_pending_s",
            "dead_letters",
            "last_error",
        } <= set(u)
        assert {"path", "bytes", "free_disk_bytes"} <= set(st["store"])
        assert "synchronized" in st["clock"]
        health = await r.client.get("/health")
        assert health.status_code == 200 and health.json()["ok"] is True
        text = (await r.client.get("/metrics")).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        delivered = fams["fieldgate_uplink_delivered"].samples[0]
        assert delivered.labels == {"uplink": "qatium"} and delivered.value >= 5
        assert fams["fieldgate_readings_captured"].samples[0].value >= 5
        assert TOKEN not in text and TOKEN not in str(st)
        assert await r.stop() == 0


async def test_stuck_uplink_makes_health_503_with_the_reason(start: Callable[..., object]) -> None:
    r: Running = await start(f"http://127.0.0.1:{free_port()}", stuck=0.2)  # type: ignore[misc]
    await r.until(
        lambda s: (
            s["uplinks"]["qatium"]["state"] == "backing_off"
            and s["uplinks"]["qatium"]["backlog"] > 0
        )
    )
    async with asyncio.timeout(20):
        while (health := await r.client.get("/health")).status_code != 503:
            await r.gw.store.wait_for_data(0.05)  # type: ignore[union-attr]
    [reason] = health.json()["reasons"]
    assert "uplink qatium" in reason and "connect" in reason
    assert await r.stop() == 0


class CrashingSource:
    """Raises on its first two runs, then produces: a plugin bug the supervisor must survive."""

    name = "flaky"

    def __init__(self) -> None:
        self.stats = SourceStats()
        self.runs = 0

    async def run(self, emit: Emit) -> None:
        self.runs += 1
        if self.runs <= 2:
            raise RuntimeError(f"boom {self.runs}")
        self.stats.ok(0)
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        return None


async def test_a_failing_task_is_restarted_and_reported(start: Callable[..., object]) -> None:
    crash = CrashingSource()

    def add(gw: Gateway) -> None:
        real_run = gw._supervise_all

        async def with_flaky(store):  # type: ignore[no-untyped-def]
            gw.sources.append(crash)  # type: ignore[arg-type]
            gw._source_cfgs["flaky"] = gw._source_cfgs["tank"]
            return await real_run(store)

        gw._supervise_all = with_flaky  # type: ignore[method-assign]

    async with QatiumEmulator(token=TOKEN) as emu:
        r: Running = await start(emu.url, tweak=add)  # type: ignore[misc]
        st = await r.until(
            lambda s: (
                s["sources"].get("flaky", {}).get("restarts", 0) >= 2
                and s["sources"]["flaky"]["state"] == "ok"
            ),
            timeout=30,
        )
        assert st["sources"]["flaky"]["task_error"] == "RuntimeError: boom 2"
        assert st["sources"]["tank"]["state"] == "ok"  # the others never noticed
        assert await r.stop() == 0
