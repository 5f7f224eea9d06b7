"""HTTP uplinks retry a service they cannot reach on the short schedule, one that answers and
refuses on the long one (gateway/backoff.py RetrySchedule, gateway/uplinks/http.py unreachable).

Real parts: the uplink plugin and the runner over a real store, against the service emulators
over real HTTP, taken down (closed: connection refused) and brought back on the same port. The
schedules are made disjoint from the first failure on (``backoff_initial_s`` above the short
cap: short 1-2 s, refused 5-10 s, then 10-20 s...), so which one the runner took shows in the
delay it chose; nothing here waits a delay out (an operator's nudge, ``resume_now``, starts the
next attempt) and no assertion is about how long anything took.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.config import Secret
from gateway.sandbox.mosquitto import make_test_ca
from gateway.sandbox.qatium import QatiumEmulator
from gateway.sandbox.vanda import VandaEmulator
from gateway.uplinks import http
from gateway.uplinks.dispatch import UplinkState
from gateway.uplinks.qatium.uplink import QatiumUplink
from gateway.uplinks.vanda.uplink import VandaUplink

from .test_qatium_uplink import NETWORK, TOKEN, qcfg
from .test_qatium_uplink import readings as qatium_readings
from .test_vanda_uplink import CLIENT, SECRET, vcfg
from .test_vanda_uplink import readings as vanda_readings
from .uplink_harness import Harness, Harnesses

SHORT_CAP = 2.0
SCHEDULES: dict[str, object] = {
    "backoff_initial_s": 10.0,
    "backoff_max_s": 120.0,
    "reconnect_max_s": SHORT_CAP,
    "auth_retry_s": 3600.0,
}


@pytest.fixture
async def hs(tmp_path: Path) -> AsyncIterator[Harnesses]:
    made = Harnesses(tmp_path)
    yield made
    await made.aclose()


async def qatium(hs: Harnesses) -> Harness[QatiumEmulator, QatiumUplink]:
    emu = await hs.serve(QatiumEmulator(token=TOKEN, assets=NETWORK))
    cfg = qcfg(emu.url, **SCHEDULES)
    return await hs.build(cfg, QatiumUplink(cfg, Secret(TOKEN, "test")), emu)


def failures(h: Harness[Any, Any]) -> int:
    return h.runner.requests["transient"] + h.runner.requests["auth"]


async def failed_again(h: Harness[Any, Any], seen: int) -> dict[str, Any]:
    """Wait for the runner to record a failure after the ``seen`` first ones; its status (the
    delay it chose for the next attempt, and on which schedule)."""
    await h.until(lambda: failures(h) > seen and h.runner.status()["retry_in_s"] > 0)
    return h.runner.status()


async def test_service_down_is_retried_within_the_short_cap_refusals_on_the_long_schedule(
    hs: Harnesses,
) -> None:
    h = await qatium(hs)
    await h.emu.aclose()  # down: nothing listens on its port
    rs = qatium_readings(5)
    await h.store.ingest(rs, durable=True)
    h.start()
    seen = 0
    for _ in range(4):
        st = await failed_again(h, seen)
        seen = failures(h)
        assert st["state"] == "backing_off" and st["retry_kind"] == "unreachable"
        assert st["retry_in_s"] <= SHORT_CAP
        assert "connect failed" in st["last_error"]
        h.runner.resume_now()  # the next attempt now: the schedule, not the clock, is tested
    assert h.stats()["backlog"] == len(rs)

    # Up again on the same address: delivered at the next attempt, schedules reset.
    await h.emu.start()
    await h.until(lambda: len(h.emu.rows) >= len(rs))
    await h.until(lambda: h.runner.state is UplinkState.OK)
    assert h.runner.status()["retry_kind"] is None
    assert h.runner.retry.unreachable.attempts == 0

    # It answers 503 twice: the long schedule (5-10 s, then 10-20 s), not the short one.
    h.emu.faults.fail_next(2, status=503)
    more = qatium_readings(2, start=rs[-1].ts + 1000)
    await h.store.ingest(more, durable=True)
    st = await failed_again(h, failures(h))
    assert st["retry_kind"] == "refused" and st["retry_in_s"] > SHORT_CAP
    h.runner.resume_now()
    st = await failed_again(h, failures(h))
    assert st["retry_kind"] == "refused" and st["retry_in_s"] > 9.0

    # It refuses the token: auth_retry_s.
    h.emu.faults.fail_next(1, status=401)
    h.runner.resume_now()
    st = await failed_again(h, failures(h))
    assert st["state"] == "auth_failed" and st["retry_kind"] == "auth"
    assert st["retry_in_s"] > 3000
    h.runner.resume_now()
    await h.until(lambda: len(h.emu.rows) >= len(rs) + len(more))
    await h.until(lambda: h.runner.state is UplinkState.OK)


async def test_a_connection_dropped_without_an_answer_is_the_short_schedule(
    hs: Harnesses,
) -> None:
    h = await qatium(hs)
    h.emu.faults.drop_next(1, prefix="/ingest")  # the server closes without answering
    rs = qatium_readings(3)
    await h.store.ingest(rs, durable=True)
    h.start()
    st = await failed_again(h, 0)
    assert st["retry_kind"] == "unreachable" and st["retry_in_s"] <= SHORT_CAP
    await h.until(lambda: len(h.emu.rows) >= len(rs))  # on its own, within the short cap


async def test_vanda_token_endpoint_down_is_the_short_schedule(hs: Harnesses) -> None:
    emu = await hs.serve(VandaEmulator({CLIENT: SECRET}))
    cfg = vcfg(emu, **SCHEDULES)
    up = VandaUplink(cfg, Secret(CLIENT, "test"), Secret(SECRET, "test"))
    h = await hs.build(cfg, up, emu)
    await emu.aclose()  # the token is the first request: it cannot be had
    rs = vanda_readings(2)
    await h.store.ingest(rs, durable=True)
    h.start()
    st = await failed_again(h, 0)
    assert "token endpoint" in st["last_error"]
    assert st["retry_kind"] == "unreachable" and st["retry_in_s"] <= SHORT_CAP
    await emu.start()
    h.runner.resume_now()
    await h.until(lambda: len(emu.measurements) >= len(rs))


async def test_a_certificate_that_does_not_verify_is_not_unreachable(tmp_path: Path) -> None:
    # The service answered with a certificate we refuse: retrying within seconds cannot help.
    # The same address with nothing listening is "unreachable".
    ca = await make_test_ca(tmp_path / "ca")
    other = await make_test_ca(tmp_path / "other")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(ca.server_cert, ca.server_key)
    emu = QatiumEmulator(token=TOKEN, assets=NETWORK)
    emu.ssl_context = server
    async with emu:
        url = f"{emu.url}/ingest"
        async with http.make_client(5.0, ca_file=other.ca_cert) as client:
            with pytest.raises(httpx.ConnectError) as refused:
                await client.post(url, content=b"[]")
    async with http.make_client(5.0, ca_file=ca.ca_cert) as client:
        with pytest.raises(httpx.ConnectError) as down:
            await client.post(url, content=b"[]")
    bad = http.transport_failure(refused.value).failure
    gone = http.transport_failure(down.value).failure
    assert bad is not None and not bad.unreachable
    assert "CERTIFICATE_VERIFY_FAILED" in bad.message
    assert gone is not None and gone.unreachable
