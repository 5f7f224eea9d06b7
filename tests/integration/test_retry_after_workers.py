"""Issue 13: a service's Retry-After holds for every worker of an uplink.

With ``concurrency = 2`` one worker can pass the rate-limit check and then wait for the store to
record its send time (``RateLimiter.acquire`` persists the sliding window before each request)
while the other worker's request comes back 429 with Retry-After. That first worker's request
must then wait out the pause too: no request of the uplink may *start* until the Retry-After has
elapsed, whatever the number of workers.

The construction is deterministic, no timing luck involved:

* the gateway's own window (1 request per 1 s) keeps worker A inside ``acquire`` while worker
  B's request is held inside the Datacooee emulator (``hold``);
* another writer holds the store's SQLite write lock (what a slow SD card or ``fieldgate
  dead-letters replay`` beside the daemon does), so once A's window has passed, A sits in the
  store write of its send time;
* another client of the same organisation takes the emulator's last slot of its 1-per-second
  quota, and B's held request is released: the real emulator answers it 429, Retry-After: 1;
* once the gateway has taken the 429 in (state ``backing_off``), the write lock is let go.

Times are recorded on both sides of the real HTTP exchange: the client's request start and the
moment each answer reached it (httpx event hooks on the plugin's own client, which also tag each
request with a sequence number), and each request's arrival and answer at the emulator.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from gateway.config import Secret
from gateway.models import Reading
from gateway.sandbox.datacooee import UPLOAD_PATH, DatacooeeEmulator
from gateway.sandbox.emulator import Reject
from gateway.uplinks.datacooee.config import DatacooeeConfig
from gateway.uplinks.datacooee.uplink import DatacooeeUplink
from gateway.uplinks.dispatch import UplinkState

from .uplink_harness import Harness, Harnesses

ORG = "ZnlvcWXXXXXXXXXXXXXXXXXXXX5ieXVieHgudng="
KEY = "f13d34b-test-key-0123456789a5da135d61"
TRACE = "X-Test-Trace"
#: The emulator's quota (per organisation): 1 request per second, so its 429 says Retry-After: 1.
SERVICE_PERIOD_S = 1.0


@dataclass
class Hit:
    """One upload as the emulator saw it (wall-clock seconds)."""

    trace: str | None
    arrived: float
    answered: float | None = None
    status: int | None = None


@dataclass
class Sent:
    """One request as the gateway's HTTP client saw it (wall-clock seconds)."""

    trace: str
    started: float
    answered: float | None = None
    status: int | None = None
    retry_after: str | None = None


class TimedDatacooee(DatacooeeEmulator):
    """The Datacooee emulator, unchanged, recording when each upload arrived and was answered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hits: list[Hit] = []

    def setup_routes(self, app: web.Application) -> None:
        app.router.add_post(UPLOAD_PATH, self._timed_upload)

    async def _timed_upload(self, request: web.Request) -> web.StreamResponse:
        hit = Hit(request.headers.get(TRACE), time.time())
        self.hits.append(hit)
        try:
            response = await self._upload(request)
            hit.status = response.status
            return response
        except Reject as exc:  # the 429 of the rate limit, answered by the error middleware
            hit.status = exc.status
            raise
        finally:
            hit.answered = time.time()


def trace_client(client: httpx.AsyncClient) -> list[Sent]:
    """Record every request the plugin's client starts and every answer it receives."""
    sent: list[Sent] = []

    async def on_request(request: httpx.Request) -> None:
        s = Sent(str(len(sent)), time.time())
        sent.append(s)
        request.headers[TRACE] = s.trace

    async def on_response(response: httpx.Response) -> None:
        s = sent[int(response.request.headers[TRACE])]
        s.answered = time.time()
        s.status = response.status_code
        s.retry_after = response.headers.get("retry-after")

    client.event_hooks["request"].append(on_request)
    client.event_hooks["response"].append(on_response)
    return sent


class WriteLock:
    """Another connection holding the store's SQLite write lock (BEGIN IMMEDIATE), taken and
    let go in a thread so the event loop (and the store's own transactions) keep running."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(
            path, timeout=10, isolation_level=None, check_same_thread=False
        )

    async def take(self) -> None:
        await asyncio.to_thread(self._conn.execute, "BEGIN IMMEDIATE")

    async def release(self) -> None:
        if self._conn.in_transaction:
            await asyncio.to_thread(self._conn.execute, "ROLLBACK")

    async def aclose(self) -> None:
        await self.release()
        self._conn.close()


@pytest.fixture
async def hs(tmp_path: Path) -> AsyncIterator[Harnesses]:
    made = Harnesses(tmp_path)
    yield made
    await made.aclose()


async def test_retry_after_holds_a_worker_whose_send_was_being_recorded(hs: Harnesses) -> None:
    emu = await hs.serve(
        TimedDatacooee(
            ORG, KEY, inputs={"senlevel01": "number"}, rate_limit=1, rate_period_s=SERVICE_PERIOD_S
        )
    )
    cfg = DatacooeeConfig.model_validate(
        {
            "name": "datacooee",
            "type": "datacooee",
            "url": emu.url,
            "organization_id": ORG,
            "api_key": {"env": "UNUSED"},
            "routes": [{"series": "well3.level", "input_pk": "senlevel01"}],
            "concurrency": 2,
            "rate_limit_requests": 1,
            "rate_limit_period_s": 1.0,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
            "timeout_s": 10,
        }
    )
    uplink = DatacooeeUplink(cfg, Secret(KEY, "test"))
    h: Harness[TimedDatacooee, DatacooeeUplink] = await hs.build(cfg, uplink, emu)
    sent = trace_client(uplink._http())
    t0 = (int(time.time()) - 60) * 1000
    readings = [Reading("well3.level", t0 + i * 1000, 2.0 + i) for i in range(2)]
    await h.store.ingest(readings, durable=True)
    lock = WriteLock(h.store.path)
    try:
        emu.hold()
        h.start()
        # Worker B's request waits inside the emulator; worker A holds the other reading and
        # waits for the gateway's window (1 request per 1.15 s) inside the rate limiter.
        await emu.wait_for(lambda: emu.in_flight == 1)
        await lock.take()
        stamps = h.runner.limiter.history
        assert len(stamps) == 1, "worker A passed its window before the store was locked"
        b_stamp = stamps[0]
        # A's window passes: A takes its slot (B's ages out of the window as it does) and waits
        # for the store to record it.
        await h.until(lambda: h.runner.limiter.history[-1:] > [b_stamp], timeout=10)
        assert len(sent) == 1 and emu.in_flight == 1
        # Another client of the organisation takes the service's last slot; B's request is let
        # through and the service answers it 429 with Retry-After.
        assert emu.limiter is not None and emu.limiter.acquire(ORG) is None
        await emu.release()
        await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF, timeout=10)
        assert sent[0].status == 429 and sent[0].retry_after == "1"
        await lock.release()
        await h.until(
            lambda: len(emu.accepted) == len(readings) and h.stats()["backlog"] == 0, timeout=20
        )
    finally:
        await lock.aclose()

    assert sorted(float(a.value) for a in emu.accepted) == [2.0, 3.0]
    assert all(s.answered is not None for s in sent)
    by_trace = {s.trace: s for s in sent}
    assert sorted(str(x.trace) for x in emu.hits) == sorted(by_trace)  # every request arrived once
    pauses = [s for s in sent if s.retry_after is not None]
    assert pauses and all(s.status in (429, 503) for s in pauses)
    answers = {x.trace: x for x in emu.hits}
    for p in pauses:
        assert p.answered is not None and p.retry_after is not None
        received, retry_after = p.answered, float(p.retry_after)
        answered_at = answers[p.trace].answered
        assert answered_at is not None
        # The client's view: no request started while the pause it had received was running.
        early = [
            (s.trace, round(s.started - received, 3))
            for s in sent
            if received <= s.started < received + retry_after
        ]
        assert early == [], (
            f"requests started within the Retry-After of {retry_after:g} s that request "
            f"{p.trace} received (trace, seconds after the 429 reached the gateway): {early}"
        )
        # The service's view: nothing arrived within the pause after it answered, except a
        # request the gateway had already started before the answer reached it.
        arrived = [
            (x.trace, round(x.arrived - answered_at, 3))
            for x in emu.hits
            if answered_at < x.arrived < answered_at + retry_after
            and by_trace[str(x.trace)].started >= received
        ]
        assert arrived == [], (
            f"requests arrived within {retry_after:g} s of the service answering {p.trace} "
            f"{p.status} with Retry-After (trace, seconds after the answer): {arrived}"
        )
