"""The Vanda emulator enforces the document (and its IdP, RFC 6749), over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.sandbox.vanda import TOKEN_PATH, VandaEmulator

CLIENT, SECRET = "c1", "s3cret-value"


@pytest.fixture
async def emu() -> AsyncIterator[VandaEmulator]:
    async with VandaEmulator({CLIENT: SECRET, "reader": "r3ader"}, roles={"reader": []}) as e:
        yield e


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5) as c:
        yield c


async def token(
    emu: VandaEmulator, client: httpx.AsyncClient, cid: str = CLIENT, secret: str = SECRET
) -> str:
    resp = await client.post(
        emu.token_url,
        data={
            "grant_type": "client_credentials",
            "scope": "openid",
            "client_id": cid,
            "client_secret": secret,
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    return str(body["access_token"])


def create(items: list[dict[str, Any]], **head: Any) -> dict[str, Any]:
    return {
        "station": {"id": "52000123"},
        "measurementPointNumber": 1,
        "examinationTypeSc": 25,
        "parameterSc": 1233,
        "unitSc": 19,
        "transactionBased": False,
        "measurements": items,
        **head,
    }


def item(when: str, result: float = 10.0, reason: int = 5) -> dict[str, Any]:
    return {"measurementDateTime": when, "result": result, "reasonCodeSc": reason}


async def post(
    emu: VandaEmulator,
    client: httpx.AsyncClient,
    body: dict[str, Any],
    tok: str,
    path: str = "/api/measurements",
) -> httpx.Response:
    return await client.post(emu.url + path, json=body, headers={"Authorization": f"Bearer {tok}"})


def form(**kw: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "scope": "openid", **kw}


IN_FORM = {"client_id": CLIENT, "client_secret": SECRET}
TOKEN_CASES = [  # form fields, HTTP Basic credentials, status, OAuth error
    (form(), (CLIENT, SECRET), 200, None),
    (form(**IN_FORM), None, 200, None),
    (form(client_id=CLIENT, client_secret="wrong"), None, 401, "invalid_client"),
    (form(), (CLIENT, "x"), 401, "invalid_client"),
    (form(**IN_FORM, scope="profile"), None, 400, "invalid_scope"),
    (form(**IN_FORM, grant_type="password"), None, 400, "unsupported_grant_type"),
    (form(**IN_FORM), (CLIENT, SECRET), 400, "invalid_request"),  # two methods at once
]


@pytest.mark.parametrize("case", TOKEN_CASES)
async def test_token_endpoint(
    emu: VandaEmulator, client: httpx.AsyncClient, case: tuple[Any, ...]
) -> None:
    data, auth, status, error = case
    resp = await client.post(emu.url + TOKEN_PATH, data=data, auth=auth)
    assert resp.status_code == status
    if error is not None:
        assert resp.json()["error"] == error
    else:
        assert resp.json()["access_token"]


async def test_token_endpoint_wants_a_form(emu: VandaEmulator, client: httpx.AsyncClient) -> None:
    resp = await client.post(emu.token_url, json={"grant_type": "client_credentials"})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_request"


async def test_api_auth(emu: VandaEmulator, client: httpx.AsyncClient) -> None:
    body = create([item("2024-01-01T00:00Z")])
    assert (await client.post(emu.api_url + "/measurements", json=body)).status_code == 401
    assert (await post(emu, client, body, "forged")).status_code == 401
    reader = await token(emu, client, "reader", "r3ader")
    assert (await post(emu, client, body, reader)).status_code == 403
    writer = await token(emu, client)
    assert (await post(emu, client, body, writer)).status_code == 200
    emu.expire_tokens()
    assert (await post(emu, client, body, writer)).status_code == 401


async def test_items_are_checked_one_by_one(emu: VandaEmulator, client: httpx.AsyncClient) -> None:
    tok = await token(emu, client)
    resp = await post(
        emu,
        client,
        create(
            [
                item("2024-01-01T00:00Z", 12.345),  # created, stored as 12.3
                item("2024-01-01T00:10:30Z"),  # seconds on create
                item("2024-01-01T02:20+01:00"),  # not UTC
                item("2024-01-01T00:20Z", 10_000.06),  # 10000.1 > 10000
                item("2024-01-01T00:30Z", reason=18),  # reason marked for no type
                item("2024-01-01T00:03Z"),  # 3 minutes after 00:00: interval is 5
                item("2024-01-01T00:40Z", True),  # not a number
            ]
        ),
        tok,
    )
    assert resp.status_code == 200
    answer = resp.json()
    assert answer["successful"] == [{"timestamp": "2024-01-01T00:00Z", "action": "created"}]
    assert [(f["timestamp"], f["errorCode"], f["isSuccess"]) for f in answer["failed"]] == [
        ("2024-01-01T00:10:30Z", 4001, False),
        ("2024-01-01T02:20+01:00", 4001, False),
        ("2024-01-01T00:20Z", 4002, False),
        ("2024-01-01T00:30Z", 4003, False),
        ("2024-01-01T00:03Z", 4004, False),
        ("2024-01-01T00:40Z", 4006, False),
    ]
    [stored] = emu.measurements
    assert stored.result == 12.3 and stored.measurement_date_time == "2024-01-01T00:00Z"
    again = await post(emu, client, create([item("2024-01-01T00:00Z", 99.0)]), tok)
    assert again.json()["successful"] == [{"timestamp": "2024-01-01T00:00Z", "action": "ignored"}]
    assert emu.measurements[0].result == 12.3


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (create([item("2024-01-01T00:00Z")] * 1001), "at most 1000"),
        (create([item("2024-01-01T00:00Z"), item("2024-01-01T00:00Z", 2.0)]), "same minute"),
        (create([item("2024-01-01T00:00Z")], unitSc=63), "unitSc 63"),
        (create([item("2024-01-01T00:00Z")], examinationTypeSc=23), "examinationTypeSc 23"),
        (create([item("2024-01-01T00:00Z")], measurementPointNumber=3), "1 or 2"),
        (create([item("2024-01-01T00:00Z")], colour="blue"), "unknown field"),
        (create([]), "non-empty"),
        (create([item("2024-01-01T00:00Z")], station={}), "station"),
    ],
)
async def test_whole_request_problems_are_400(
    emu: VandaEmulator, client: httpx.AsyncClient, body: dict[str, Any], needle: str
) -> None:
    resp = await post(emu, client, body, await token(emu, client))
    assert resp.status_code == 400 and needle in resp.json()["detail"]
    assert emu.measurements == []


async def test_update_rounds_to_the_nearest_minute(
    emu: VandaEmulator, client: httpx.AsyncClient
) -> None:
    tok = await token(emu, client)
    await post(emu, client, create([item("2024-01-01T00:10Z", 1.0)]), tok)
    update = {
        "station": {"id": "52000123"},
        "measurementPointNumber": 1,
        "examinationTypeSc": 25,
        "transactionBased": False,
        "results": [item("2024-01-01T00:09:31Z", 2.04), item("2024-01-01T00:30Z", 3.0)],
    }
    answer = (await post(emu, client, update, tok, "/api/measurements/update")).json()
    assert answer["successful"] == [{"timestamp": "2024-01-01T00:09:31Z", "action": "updated"}]
    assert [f["errorCode"] for f in answer["failed"]] == [4005]
    assert emu.measurements[0].result == 2.0


async def test_transaction_is_all_or_nothing(emu: VandaEmulator, client: httpx.AsyncClient) -> None:
    tok = await token(emu, client)
    body = create(
        [item("2024-01-01T00:00Z"), item("2024-01-01T00:05Z", 1e6)], transactionBased=True
    )
    answer = (await post(emu, client, body, tok)).json()
    assert answer["successful"] == [] and emu.measurements == []
    assert [(f["isSuccess"], f["errorCode"]) for f in answer["failed"]] == [
        (True, 0),
        (False, 4002),
    ]
    emu.transaction_failure = "status_400"
    assert (await post(emu, client, body, tok)).status_code == 400


async def test_examination_types_table(emu: VandaEmulator, client: httpx.AsyncClient) -> None:
    tok = await token(emu, client)
    resp = await client.get(
        emu.api_url + "/config/examination-types", headers={"Authorization": f"Bearer {tok}"}
    )
    rows = {r["examinationTypeSc"]: r for r in resp.json()}
    assert rows[25]["max"] == 10000 and rows[31]["decimals"] == 3
    assert rows[29]["measurementIntervalMin"] == 60 and 18 not in rows[25]["reasonCodesSc"]
