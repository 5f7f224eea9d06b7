"""TLS verification of every HTTP uplink, against the service emulators served over HTTPS.

Each emulator presents a certificate from a throw-away CA (``make_test_ca``). Without ``ca_file``
the uplink trusts only the system store, so it must refuse the certificate: nothing reaches the
service (the handshake fails before any request), every reading stays queued, and the uplink's
``last_error`` names the certificate verification. With ``ca_file`` naming the test CA it
delivers. A certificate from the trusted CA issued for another host name is refused as well.
The real store, the real dispatcher and the real plugins run; every wait is on a condition.
"""

from __future__ import annotations

import asyncio
import inspect
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Secret
from gateway.models import Reading
from gateway.sandbox.datacooee import DatacooeeEmulator
from gateway.sandbox.emulator import Emulator
from gateway.sandbox.mosquitto import TestCA, make_test_ca
from gateway.sandbox.nilu import NiluEmulator, SensorSchema
from gateway.sandbox.qatium import QatiumEmulator
from gateway.sandbox.vanda import VandaEmulator
from gateway.uplinks import http
from gateway.uplinks.base import Uplink
from gateway.uplinks.datacooee.config import DatacooeeConfig
from gateway.uplinks.datacooee.uplink import DatacooeeUplink
from gateway.uplinks.dispatch import UplinkState
from gateway.uplinks.energydata.config import BackfillConfig, EnergydataConfig
from gateway.uplinks.nilu.config import NiluConfig
from gateway.uplinks.nilu.uplink import NiluUplink
from gateway.uplinks.qatium.config import QatiumConfig
from gateway.uplinks.qatium.uplink import QatiumUplink
from gateway.uplinks.vanda.config import VandaConfig
from gateway.uplinks.vanda.uplink import VandaUplink

from .uplink_harness import Harness, Harnesses

TOKEN = "tls-test-token-0123456789"
ORG = "ZnlvcWXXXXXXXXXXXXXXXXXXXX5ieXVieHgudng="
API_KEY = "f13d34b-tls-key-0123456789a5da135d61"
CLIENT, CLIENT_SECRET = "fieldgate-tls-client", "vanda-tls-secret-123"
#: What OpenSSL and Python put in every verification failure, whatever the reason.
VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED"
#: ``window_grace_s = 0``: the readings are minutes old and stored at once, so NILU's and Vanda's
#: windows close as soon as they end (the default grace would hold the newest one).
COMMON: dict[str, object] = {
    "backoff_initial_s": 0.05,
    "backoff_max_s": 0.2,
    "timeout_s": 5,
    "window_grace_s": 0,
}
#: A refused uplink then waits 30-60 s: the test ends during that wait. (Cancelling an httpx
#: request in the middle of a TLS handshake leaks its socket in httpcore 1.0, whose start_tls
#: closes the stream on Exception only: a ResourceWarning later, an error under our filters.)
ONE_ATTEMPT: dict[str, object] = {"backoff_initial_s": 60, "backoff_max_s": 60}


# ----------------------------------------------------------------------------------------------
# Certificates: one CA whose server certificate names 127.0.0.1, one whose server certificate
# names another host (openssl, a fraction of a second each).


@pytest.fixture
async def good_ca(tmp_path: Path) -> TestCA:
    return await make_test_ca(tmp_path / "ca-good")


@pytest.fixture
async def other_host_ca(tmp_path: Path) -> TestCA:
    # Valid, from a CA the uplink is told to trust, but for a name the uplink does not dial.
    return await make_test_ca(tmp_path / "ca-other-host", hosts=("fieldgate.invalid",))


def server_context(ca: TestCA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(ca.server_cert, ca.server_key)
    return ctx


# ----------------------------------------------------------------------------------------------
# One case per HTTP uplink: its emulator, a config pointing at it, readings it accepts, and how
# many deliveries the emulator has recorded.


@dataclass
class Case:
    name: str
    emulator: Callable[[], Emulator]
    config: Callable[[Any, dict[str, object]], Any]
    uplink: Callable[[Any], Uplink]
    readings: Callable[[], list[Reading]]
    delivered: Callable[[Any], int]


def past_minutes(n: int) -> list[int]:
    """``n`` whole-minute timestamps (ms) ending two minutes ago: every window is closed."""
    last = (int(time.time()) // 60 - 2) * 60
    return [(last - 60 * (n - 1 - i)) * 1000 for i in range(n)]


def past_five_minutes(n: int) -> list[int]:
    """``n`` five-minute-aligned timestamps (ms), hours ago (Vanda's minimum interval)."""
    base = (int(time.time() * 1000) // 3_600_000 - 6) * 3_600_000
    return [base + i * 300_000 for i in range(n)]


def qatium_case() -> Case:
    return Case(
        "qatium",
        lambda: QatiumEmulator(token=TOKEN, assets={"Tank1": "tank"}),
        lambda emu, kw: QatiumConfig.model_validate(
            {
                "name": "qatium",
                "type": "qatium",
                "url": f"{emu.url}/ingest",
                "token": {"env": "UNUSED"},
                "job_poll_s": 0.05,
                **COMMON,
                **kw,
                "routes": [
                    {"series": "tank1.level", "asset": "Tank1", "metric": "level", "unit": "m"}
                ],
            }
        ),
        lambda cfg: QatiumUplink(cfg, Secret(TOKEN, "test")),
        lambda: [Reading("tank1.level", t, 2.0 + i / 10) for i, t in enumerate(past_minutes(5))],
        lambda emu: len(emu.rows),
    )


def nilu_case() -> Case:
    return Case(
        "nilu",
        lambda: NiluEmulator([SensorSchema(395, {"no2": "double"}, timestamp="time")], TOKEN),
        lambda emu, kw: NiluConfig.model_validate(
            {
                "name": "nilu",
                "type": "nilu",
                "url": emu.url,
                "token": {"env": "UNUSED"},
                "rate_limit_requests": 0,
                **COMMON,
                **kw,
                "sensors": [{"id": 395, "resolution_s": 60, "timestamp_field": "time"}],
                "routes": [{"series": "s395.no2", "sensor": 395, "parameter": "no2"}],
            }
        ),
        lambda cfg: NiluUplink(cfg, Secret(TOKEN, "test")),
        lambda: [Reading("s395.no2", t, 10.0 + i) for i, t in enumerate(past_minutes(5))],
        lambda emu: len(emu.packets),
    )


def datacooee_case() -> Case:
    return Case(
        "datacooee",
        lambda: DatacooeeEmulator(ORG, API_KEY, inputs={"senlevel01": "number"}),
        lambda emu, kw: DatacooeeConfig.model_validate(
            {
                "name": "datacooee",
                "type": "datacooee",
                "url": emu.url,
                "organization_id": ORG,
                "api_key": {"env": "UNUSED"},
                "rate_limit_requests": 0,
                **COMMON,
                **kw,
                "routes": [{"series": "well3.level", "input_pk": "senlevel01"}],
            }
        ),
        lambda cfg: DatacooeeUplink(cfg, Secret(API_KEY, "test")),
        lambda: [Reading("well3.level", t, 2.25 + i) for i, t in enumerate(past_minutes(5))],
        lambda emu: len(emu.accepted),
    )


def vanda_case() -> Case:
    # The first request of a Vanda uplink goes to the IdP's token endpoint: that is the one
    # whose certificate is checked (and refused) first.
    return Case(
        "vanda",
        lambda: VandaEmulator({CLIENT: CLIENT_SECRET}),
        lambda emu, kw: VandaConfig.model_validate(
            {
                "name": "vanda",
                "type": "vanda",
                "api_url": emu.api_url,
                "token_url": emu.token_url,
                "client_id": {"env": "UNUSED"},
                "client_secret": {"env": "UNUSED"},
                **COMMON,
                **kw,
                "routes": [
                    {
                        "series": "river1.level",
                        "station_id": "52000123",
                        "measurement_point_number": 1,
                        "examination_type_sc": 25,
                        "reason_code_sc": 5,
                    }
                ],
            }
        ),
        lambda cfg: VandaUplink(cfg, Secret(CLIENT, "test"), Secret(CLIENT_SECRET, "test")),
        lambda: [Reading("river1.level", t, 120.0 + i) for i, t in enumerate(past_five_minutes(5))],
        lambda emu: len(emu.measurements),
    )


CASES = [qatium_case(), nilu_case(), datacooee_case(), vanda_case()]


Make = Callable[..., Any]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Make]:
    """``await env(case, server_ca, **config)``: the case's emulator serving HTTPS with a
    certificate from ``server_ca``, a store holding the case's readings, the uplink running."""
    hs = Harnesses(tmp_path)

    async def make(case: Case, server_ca: TestCA, **cfg_kw: object) -> Harness[Any, Any]:
        emu = case.emulator()
        emu.ssl_context = server_context(server_ca)
        await hs.serve(emu)
        assert emu.url.startswith("https://127.0.0.1:")
        cfg = case.config(emu, cfg_kw)
        h: Harness[Any, Any] = await hs.build(cfg, case.uplink(cfg), emu)
        await h.store.ingest(case.readings(), durable=True)
        h.start()
        return h

    yield make
    await hs.aclose()
    await tls_handshakes_ended()


async def tls_handshakes_ended() -> None:
    """asyncio runs each server-side TLS handshake as a task of its own, which aiohttp does not
    track, so one the client refused a moment ago may outlive the emulator by a loop turn or
    two; with the client's socket closed it ends at once. Wait for them, bounded."""
    current = asyncio.current_task()
    handshakes = [
        t
        for t in asyncio.all_tasks()
        if t is not current
        and not t.done()
        and getattr(t.get_coro(), "__name__", "") == "_accept_connection2"
    ]
    if handshakes:
        async with asyncio.timeout(10):
            await asyncio.wait(handshakes)


def ids(case: Case) -> str:
    return case.name


# ----------------------------------------------------------------------------------------------


def test_tls_verification_is_on_by_default_in_every_http_uplink() -> None:
    for model in (QatiumConfig, NiluConfig, VandaConfig, DatacooeeConfig, BackfillConfig):
        fields = model.model_fields
        assert fields["verify_tls"].default is True, model.__name__
        assert fields["ca_file"].default is None, model.__name__
    # Energydata's MQTT connection: TLS on, verified against the system store unless ca_file.
    assert EnergydataConfig.model_fields["tls"].default is True
    assert EnergydataConfig.model_fields["ca_file"].default is None
    # The one place HTTP clients are made verifies unless told otherwise, against the system
    # store, or against ca_file alone when given.
    params = inspect.signature(http.make_client).parameters
    assert params["verify"].default is True and params["ca_file"].default is None


@pytest.fixture
def system_trust_only() -> Iterator[None]:
    """Make sure no environment variable adds the test CA to the default trust store."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            mp.delenv(var, raising=False)
        yield


@pytest.mark.usefixtures("system_trust_only")
@pytest.mark.parametrize("case", CASES, ids=ids)
async def test_an_untrusted_certificate_is_refused_and_nothing_is_lost(
    env: Make, good_ca: TestCA, case: Case
) -> None:
    # Default: verify against the system store only. One attempt per worker, then a long
    # backoff: the test ends while the uplink waits, never in the middle of a handshake.
    h: Harness[Any, Any] = await env(case, good_ca, **ONE_ATTEMPT)
    n = len(case.readings())
    await h.until(lambda: VERIFY_FAILED in (h.runner.last_error or ""))
    assert h.runner.state is UplinkState.BACKING_OFF
    assert "connect failed" in (h.runner.last_error or "")
    # The handshake failed before any HTTP request: the service saw nothing at all.
    assert h.emu.total_requests == 0 and case.delivered(h.emu) == 0
    assert h.stats()["backlog"] == n
    status = h.runner.status()
    assert VERIFY_FAILED in status["last_error"] and status["backlog"] == n
    assert status["retry_in_s"] > 0
    # End between requests: with two workers (Datacooee) the second one's handshake may still be
    # in flight, and cancelling it mid-handshake would leave its socket to the garbage collector.
    h.runner.stop_sending()
    await h.runner.wait_idle()


@pytest.mark.parametrize("case", CASES, ids=ids)
async def test_the_configured_ca_file_is_trusted_and_delivers(
    env: Make, good_ca: TestCA, case: Case
) -> None:
    h: Harness[Any, Any] = await env(case, good_ca, ca_file=str(good_ca.ca_cert))
    n = len(case.readings())
    await h.until(lambda: case.delivered(h.emu) >= n)
    await h.drained()
    assert case.delivered(h.emu) == n
    assert h.runner.state is UplinkState.OK and h.runner.last_error is None


@pytest.mark.parametrize("case", CASES, ids=ids)
async def test_a_certificate_for_another_host_name_is_refused(
    env: Make, other_host_ca: TestCA, case: Case
) -> None:
    # The CA is trusted; the certificate names fieldgate.invalid, the uplink dials 127.0.0.1.
    h: Harness[Any, Any] = await env(
        case, other_host_ca, ca_file=str(other_host_ca.ca_cert), **ONE_ATTEMPT
    )
    n = len(case.readings())
    await h.until(lambda: VERIFY_FAILED in (h.runner.last_error or ""))
    assert "mismatch" in (h.runner.last_error or "")  # OpenSSL: "IP address mismatch"
    assert h.emu.total_requests == 0 and case.delivered(h.emu) == 0
    assert h.stats()["backlog"] == n and h.runner.state is UplinkState.BACKING_OFF
