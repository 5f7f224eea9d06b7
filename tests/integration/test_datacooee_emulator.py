"""The Datacooee emulator enforces the upload document over real HTTP (plain httpx client).

Rate-limit windows move on a ManualClock; no test sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.sandbox.datacooee import MEDIA_TYPE, DatacooeeEmulator
from gateway.sandbox.emulator import ManualClock

ORG, KEY, READ_ONLY = "org-1", "key-1", "key-read-only"
PATH = "/api/external/v1/inputs/{}/inputdata/"
HEADERS = {"Content-Type": MEDIA_TYPE, "ORGANIZATION-ID": ORG, "ORGANIZATION-API-KEY": KEY}


def doc(input_pk: str = "sen1", **attributes: Any) -> dict[str, Any]:
    attrs: dict[str, Any] = {"value": "12.5", "timestamp": "2020-10-13T14:02:39.489Z"}
    attrs.update(attributes)
    attrs = {k: v for k, v in attrs.items() if v is not None}
    return {
        "data": {
            "type": "SensorData",
            "id": "null",
            "attributes": attrs,
            "relationships": {"sensor": {"data": {"type": "Sensor", "id": input_pk}}},
        }
    }


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def emu(clock: ManualClock) -> AsyncIterator[DatacooeeEmulator]:
    inputs = {"sen1": "any", "sennum": "number"}
    async with DatacooeeEmulator(
        ORG, KEY, inputs=inputs, forbidden_keys=[READ_ONLY], clock=clock
    ) as e:
        yield e


@pytest.fixture
async def client(emu: DatacooeeEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emu.url, timeout=httpx.Timeout(5.0)) as c:
        yield c


async def post(
    client: httpx.AsyncClient, body: object, input_pk: str = "sen1", **headers: str
) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    merged = {**HEADERS, **{k.replace("_", "-"): v for k, v in headers.items()}}
    return await client.post(PATH.format(input_pk), content=raw, headers=merged)


def errors(resp: httpx.Response) -> list[dict[str, Any]]:
    assert resp.headers["content-type"].startswith(MEDIA_TYPE)
    body: list[dict[str, Any]] = resp.json()["errors"]
    for err in body:
        assert err["status"] == str(resp.status_code) and err["detail"]
    return body


async def test_the_documents_example_is_created(
    emu: DatacooeeEmulator, client: httpx.AsyncClient
) -> None:
    resp = await post(client, doc(latitude="40.730610", longitude="-73.935242"))
    assert resp.status_code == 201, resp.text
    assert resp.headers["content-type"].startswith(MEDIA_TYPE)
    assert resp.json() == {
        "data": {
            "type": "SensorData",
            "id": "1",
            "attributes": {
                "timestamp": "2020-10-13T14:02:39.489000Z",
                "value": "12.5",
                "latitude": "40.730610",
                "longitude": "-73.935242",
            },
            "relationships": {"sensor": {"data": {"type": "Sensor", "id": "sen1"}}},
        }
    }
    [got] = emu.accepted
    assert (got.input_pk, got.value, got.timestamp, got.latitude) == (
        "sen1",
        "12.5",
        "2020-10-13T14:02:39.489Z",
        "40.730610",
    )


@pytest.mark.parametrize(
    ("headers", "status", "detail"),
    [
        ({"ORGANIZATION_API_KEY": ""}, 401, "not provided"),
        ({"ORGANIZATION_ID": "someone-else"}, 401, "Incorrect"),
        ({"ORGANIZATION_API_KEY": "guess"}, 401, "Incorrect"),
        ({"ORGANIZATION_API_KEY": READ_ONLY}, 403, "permission"),
        ({"Accept": "application/json"}, 406, "Accept"),
        ({"Content_Type": "application/json"}, 415, "application/json"),
        ({"Content_Type": f"{MEDIA_TYPE}; charset=utf-8"}, 415, "charset"),
    ],
)
async def test_headers_are_enforced(
    emu: DatacooeeEmulator,
    client: httpx.AsyncClient,
    headers: dict[str, str],
    status: int,
    detail: str,
) -> None:
    resp = await post(client, doc(), **headers)
    assert resp.status_code == status
    assert detail in errors(resp)[0]["detail"]
    assert emu.accepted == []


async def test_unknown_input_is_404(emu: DatacooeeEmulator, client: httpx.AsyncClient) -> None:
    resp = await post(client, doc("senghost"), "senghost")
    assert resp.status_code == 404 and errors(resp)[0]["detail"] == "Not found."
    emu.add_input("senghost")
    assert (await post(client, doc("senghost"), "senghost")).status_code == 201
    emu.remove_input("senghost")
    assert (await post(client, doc("senghost"), "senghost")).status_code == 404


@pytest.mark.parametrize(
    ("attributes", "pointer", "detail"),
    [
        ({"value": None}, "/data/attributes/value", "required"),
        ({"value": 12.5}, "/data/attributes/value", "Not a valid string."),
        ({"value": "  "}, "/data/attributes/value", "may not be blank"),
        ({"timestamp": "2020-10-13 14:02:39"}, "/data/attributes/timestamp", "wrong format"),
        ({"timestamp": "2020-10-13T14:02:39.489"}, "/data/attributes/timestamp", "wrong format"),
        ({"timestamp": "2020-13-13T14:02:39Z"}, "/data/attributes/timestamp", "wrong format"),
        ({"latitude": "40.7"}, "/data/attributes/longitude", "go together"),
        ({"latitude": 40.7, "longitude": "1"}, "/data/attributes/latitude", "Not a valid string."),
        ({"latitude": "95", "longitude": "1"}, "/data/attributes/latitude", "between -90 and 90"),
        ({"altitude": "12"}, "/data/attributes/altitude", "Unknown attribute"),
    ],
)
async def test_attributes_are_validated(
    client: httpx.AsyncClient, attributes: dict[str, Any], pointer: str, detail: str
) -> None:
    resp = await post(client, doc(**attributes))
    assert resp.status_code == 400
    [err] = errors(resp)
    assert err["source"]["pointer"] == pointer and detail in err["detail"]


async def test_every_field_problem_is_reported_at_once(client: httpx.AsyncClient) -> None:
    resp = await post(client, doc("sennum", value="high", timestamp="yesterday"), "sennum")
    assert resp.status_code == 400
    assert [e["source"]["pointer"] for e in errors(resp)] == [
        "/data/attributes/value",
        "/data/attributes/timestamp",
    ]
    assert errors(resp)[0]["detail"] == "A valid number is required."


async def test_document_shape(client: httpx.AsyncClient) -> None:
    wrong_type = doc()
    wrong_type["data"]["type"] = "Reading"
    assert (await post(client, wrong_type)).status_code == 409
    wrong_rel = doc()
    wrong_rel["data"]["relationships"]["sensor"]["data"]["type"] = "Input"
    assert (await post(client, wrong_rel)).status_code == 409
    client_id = doc()
    client_id["data"]["id"] = "42"
    assert (await post(client, client_id)).status_code == 403
    other_input = doc("sennum")
    resp = await post(client, other_input)  # the URL names sen1
    assert resp.status_code == 400 and "does not match" in errors(resp)[0]["detail"]
    assert (await post(client, {"value": "1"})).status_code == 400
    assert (await post(client, b"{not json")).status_code == 400
    no_id = doc()
    del no_id["data"]["id"]
    assert (await post(client, no_id)).status_code == 201


async def test_rate_limit_answers_429_with_retry_after(clock: ManualClock) -> None:
    limited = DatacooeeEmulator(ORG, KEY, rate_limit=3, rate_period_s=10, clock=clock)
    async with limited, httpx.AsyncClient(base_url=limited.url, timeout=5.0) as client:
        for _ in range(3):
            assert (await post(client, doc())).status_code == 201
        resp = await post(client, doc())
        assert resp.status_code == 429 and resp.headers["Retry-After"] == "10"
        assert "throttled" in errors(resp)[0]["detail"]
        clock.advance(10)
        assert (await post(client, doc())).status_code == 201
        assert len(limited.accepted) == 4


async def test_injected_faults_use_the_jsonapi_error_body(
    emu: DatacooeeEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.fail_next(1, status=503, retry_after=7)
    resp = await post(client, doc())
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "7"
    assert errors(resp)[0]["code"] == "error"


async def test_hold_keeps_requests_in_flight(
    emu: DatacooeeEmulator, client: httpx.AsyncClient
) -> None:
    emu.hold()
    pending = [asyncio.create_task(post(client, doc()), name=f"post:{i}") for i in range(2)]
    await emu.wait_for(lambda: emu.in_flight == 2)
    assert emu.accepted == []
    await emu.release()
    assert [r.status_code for r in await asyncio.gather(*pending)] == [201, 201]
    assert (emu.in_flight, emu.max_in_flight) == (0, 2)


async def test_standalone_cli_serves_until_interrupted() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.sandbox.datacooee",
        "--port",
        "0",
        "--input",
        "sen1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            while b"listening on" not in (line := await proc.stdout.readline()):
                assert line, "emulator exited before listening"
        url = line.decode().split("listening on ")[1].split()[0]
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(5.0)) as c:
            assert (await post(c, doc())).status_code == 401  # the demo key is not ours
            demo = {"ORGANIZATION_ID": "demo-org", "ORGANIZATION_API_KEY": "demo-key"}
            assert (await post(c, doc(), **demo)).status_code == 201
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await proc.wait()
