"""The Qatium emulator enforces the Ingest API document over real HTTP (httpx client).

Rate-limit windows move on a ManualClock; waits go through ``emu.wait_for``; no test sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.sandbox.emulator import ManualClock, SlidingWindowLimiter
from gateway.sandbox.qatium import QatiumEmulator

TOKEN = "test-token"
FORBIDDEN = "read-nothing-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = httpx.Timeout(5.0)


def row(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "time": "2021-11-03T15:00:00Z",
        "asset": "J1",
        "value": 41.5,
        "metric": "pressure",
        "unit": "m",
    }
    base.update(overrides)
    return base


VALID_ROWS = [
    row(),
    row(asset="Pipe1", metric="flow", unit="l/s", value=2.75),
    row(asset="Tank1", metric="level", unit="ft^3", value=12),
    row(asset="Pump1", metric="status", unit="", value=1),
    row(asset="Valve1", metric="status", unit="none", value=0.0),
    row(asset="Pump1", metric="setting", unit="", value=0.85),
    row(asset="Valve1", metric="setting", unit="psi", value=30),
    row(asset="J1", metric="demand", unit="m^3/h", value=3.2),
    row(time="2021-11-03T16:00:00.250+01:00", metric="pressure", unit="psi", value=-1e-3),
]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def emu(clock: ManualClock) -> AsyncIterator[QatiumEmulator]:
    async with QatiumEmulator(TOKEN, forbidden_tokens=[FORBIDDEN], clock=clock) as e:
        yield e


@pytest.fixture
async def client(emu: QatiumEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=emu.url, headers=AUTH, timeout=TIMEOUT) as c:
        yield c


async def ingest(client: httpx.AsyncClient, rows: object) -> dict[str, Any]:
    resp = await client.post("/ingest", json=rows)
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def job_status(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    resp = await client.get(f"/jobs/{job_id}")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_valid_rows_are_appended_and_job_is_ok(
    emu: QatiumEmulator, client: httpx.AsyncClient
) -> None:
    body = await ingest(client, VALID_ROWS)
    assert uuid.UUID(body["job_id"])
    assert body["status"] == {"successful": 100, "quarantined": 0, "pending": 0}
    assert emu.rows == VALID_ROWS
    assert emu.quarantined == []
    status = await job_status(client, body["job_id"])
    assert status["job_id"] == body["job_id"]
    assert status["status"] == "Ok"
    assert f"{len(VALID_ROWS)} rows have been appended" in status["message"]
    details = await client.get(f"/jobs/{body['job_id']}/details")
    assert details.status_code == 200
    assert details.json() == []
    assert emu.count(path="/ingest", status=200) == 1


async def test_charset_is_optional_but_must_be_utf8(client: httpx.AsyncClient) -> None:
    payload = json.dumps([row()]).encode()
    for ctype in ("application/json", "application/json; charset=utf-8"):
        resp = await client.post("/ingest", content=payload, headers={"Content-Type": ctype})
        assert resp.status_code == 200, ctype
    resp = await client.post(
        "/ingest", content=payload, headers={"Content-Type": "application/json; charset=latin-1"}
    )
    assert resp.status_code == 400


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Basic {TOKEN}"}, 401),
        ({"Authorization": f"Bearer {FORBIDDEN}"}, 403),
    ],
)
async def test_auth_is_enforced_on_every_route(
    emu: QatiumEmulator, headers: dict[str, str], status: int
) -> None:
    async with httpx.AsyncClient(base_url=emu.url, timeout=TIMEOUT) as anon:
        ok = await anon.post("/ingest", json=[row()], headers=AUTH)
        job_id = ok.json()["job_id"]
        for method, path in (
            ("POST", "/ingest"),
            ("GET", f"/jobs/{job_id}"),
            ("GET", f"/jobs/{job_id}/details"),
        ):
            resp = await anon.request(method, path, json=[row()], headers=headers)
            assert resp.status_code == status, (method, path)
            assert "message" in resp.json()
            if status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert len(emu.jobs) == 1
    assert len(emu.rows) == 1


@pytest.mark.parametrize(
    ("content", "ctype"),
    [
        (b"not json", "application/json"),
        (b'{"time": "2021-11-03T15:00:00Z"}', "application/json"),
        (b"[1, 2]", "application/json"),
        (b"[]", "application/json"),
        (b'[{"asset": "J1"}, {"value": 1}]', "application/json"),
        # Python's json.dumps writes NaN by default; it is not JSON.
        (
            b'[{"time": "2021-11-03T15:00:00Z", "asset": "J1", "value": NaN, '
            b'"metric": "pressure", "unit": "m"}]',
            "application/json",
        ),
        (b"\xff\xfe[]", "application/json"),
        (json.dumps([row()]).encode(), "text/plain"),
    ],
)
async def test_malformed_bodies_are_400(
    emu: QatiumEmulator, client: httpx.AsyncClient, content: bytes, ctype: str
) -> None:
    resp = await client.post("/ingest", content=content, headers={"Content-Type": ctype})
    assert resp.status_code == 400
    assert resp.json()["message"]
    assert emu.jobs == {}
    assert emu.rows == []


async def test_body_over_limit_is_413(clock: ManualClock) -> None:
    async with (
        QatiumEmulator(TOKEN, max_body_bytes=1024, max_file_bytes=8192, clock=clock) as emu,
        httpx.AsyncClient(base_url=emu.url, headers=AUTH, timeout=TIMEOUT) as client,
    ):
        big = json.dumps([row(asset=f"J{i}") for i in range(40)]).encode()
        resp = await client.post("/ingest", json=[row(asset=f"J{i}") for i in range(40)])
        assert resp.status_code == 413
        assert resp.json()["message"]

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
            for start in range(0, len(big), 256):
                yield big[start : start + 256]

        resp = await client.post(
            "/ingest", content=chunked(), headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 413
        # The multipart file limit is separate and larger: this file fits, a bigger one not.
        assert (await client.post("/ingest", files={"file": ("a.json", big)})).status_code == 200
        huge = json.dumps([row(asset=f"J{i}") for i in range(120)]).encode()
        assert (await client.post("/ingest", files={"file": ("a.json", huge)})).status_code == 413
        assert len(emu.jobs) == 1
        assert (await client.post("/ingest", json=[row()])).status_code == 200


async def test_rate_limit_is_20_per_minute_with_retry_after(
    emu: QatiumEmulator, client: httpx.AsyncClient, clock: ManualClock
) -> None:
    job_id = ""
    for _ in range(20):
        job_id = (await ingest(client, [row()]))["job_id"]
        clock.advance(1.0)  # 20 requests spread over 20 s, the first at t=0
    refused = await client.post("/ingest", json=[row()])
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "40"  # the t=0 request leaves the window at 60
    clock.advance(39.5)
    again = await client.post("/ingest", json=[row()])
    assert again.status_code == 429
    assert again.headers["Retry-After"] == "1"  # 0.5 s rounded up
    # Job queries do not count towards the ingest limit.
    assert (await client.get(f"/jobs/{job_id}")).status_code == 200
    clock.advance(0.5)
    assert (await client.post("/ingest", json=[row()])).status_code == 200
    assert (await client.post("/ingest", json=[row()])).status_code == 429
    assert emu.count(path="/ingest", status=429) == 3
    assert len(emu.rows) == 21


async def test_quarantine_gives_warning_with_document_shapes(
    emu: QatiumEmulator, client: httpx.AsyncClient
) -> None:
    rows = [row(), row(unit="bar"), row(asset="J2"), row(asset="J3"), row(asset="J4")]
    body = await ingest(client, rows)
    assert body["status"] == {"successful": 80, "quarantined": 20, "pending": 0}
    status = await job_status(client, body["job_id"])
    assert status == {
        "job_id": body["job_id"],
        "status": "Warning",
        "message": "Your request has been processed with warnings so 4 rows have been "
        "appended and 1 rows could not be appended.",
    }
    details = (await client.get(f"/jobs/{body['job_id']}/details")).json()
    assert details["network"] == "00000000-0000-0000-0000-000000000000"
    assert details["job_id"] == body["job_id"]
    assert details["job_status"] == "warning"
    assert details["message"] == status["message"]
    assert details["errors"] == ["unit 'bar' on column 'unit' is not valid for metric 'pressure'"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", details["insertion_date"])
    assert emu.rows == [rows[0], *rows[2:]]
    assert [q.row for q in emu.quarantined] == [rows[1]]
    assert emu.jobs[body["job_id"]].status == "Warning"


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (row(value="undefined"), "value 'undefined' on column 'value' is not Float32"),
        (row(value=None), "value 'null' on column 'value' is not Float32"),
        (row(value=True), "value 'true' on column 'value' is not Float32"),
        (row(value="1.5"), "value '1.5' on column 'value' is not Float32"),
        (row(value=1e39), "value '1e+39' on column 'value' is not Float32"),
        (
            row(metric="temperature"),
            "metric 'temperature' on column 'metric' is not one of "
            "pressure, flow, level, status, setting, demand",
        ),
        (
            row(metric="flow", unit="psi"),
            "unit 'psi' on column 'unit' is not valid for metric 'flow'",
        ),
        (
            row(metric="level", unit="M"),
            "unit 'M' on column 'unit' is not valid for metric 'level'",
        ),
        (
            row(metric="status", unit="", value=2),
            "value '2' on column 'value' is not 0 or 1 for metric 'status'",
        ),
        (
            row(metric="status", unit="m", value=1),
            "unit 'm' on column 'unit' is not valid for metric 'status'",
        ),
        (
            row(metric="setting", unit="l/min"),
            "unit 'l/min' on column 'unit' is not valid for metric 'setting'",
        ),
        (
            row(time="2021-11-03T15:00:00"),
            "time '2021-11-03T15:00:00' on column 'time' is not an "
            "ISO 8601 timestamp with timezone",
        ),
        (
            row(time="2021-11-03 15:00:00Z"),
            "time '2021-11-03 15:00:00Z' on column 'time' is not "
            "an ISO 8601 timestamp with timezone",
        ),
        (
            row(time=1635951600),
            "time '1635951600' on column 'time' is not an ISO 8601 timestamp with timezone",
        ),
        (row(asset=""), "asset '' on column 'asset' is not a non-empty String"),
        ({k: v for k, v in row().items() if k != "unit"}, "column 'unit' is missing"),
        (row(sensor="S1"), "column 'sensor' is not expected"),
    ],
)
async def test_each_rule_quarantines_the_row(
    emu: QatiumEmulator, client: httpx.AsyncClient, bad: dict[str, Any], error: str
) -> None:
    body = await ingest(client, [row(), bad])
    assert body["status"] == {"successful": 50, "quarantined": 50, "pending": 0}
    assert (await job_status(client, body["job_id"]))["status"] == "Warning"
    details = (await client.get(f"/jobs/{body['job_id']}/details")).json()
    assert details["errors"] == [error]
    assert emu.rows == [row()]
    assert emu.quarantined[0].errors == (error,)


async def test_all_rows_invalid_is_invalid(emu: QatiumEmulator, client: httpx.AsyncClient) -> None:
    body = await ingest(client, [row(unit="bar"), row(value="x"), row(metric="status", value=3)])
    assert body["status"] == {"successful": 0, "quarantined": 100, "pending": 0}
    status = await job_status(client, body["job_id"])
    assert status["status"] == "Invalid"
    assert status["message"] == (
        "Your request have been processed with errors so no rows have been appended."
    )
    details = (await client.get(f"/jobs/{body['job_id']}/details")).json()
    assert details["job_status"] == "invalid"
    assert len(details["errors"]) == 4  # the status row breaks two rules (unit and value)
    assert emu.rows == []
    assert len(emu.quarantined) == 3


async def test_percentages_of_uneven_shares_sum_to_100(client: httpx.AsyncClient) -> None:
    body = await ingest(client, [row(), row(), row(unit="bar")])
    assert body["status"] == {"successful": 66.67, "quarantined": 33.33, "pending": 0}


async def test_asset_model_checks_the_mapping_table(clock: ManualClock) -> None:
    assets = {"Pipe1": "pipe", "J1": "junction"}
    async with (
        QatiumEmulator(TOKEN, assets=assets, clock=clock) as emu,
        httpx.AsyncClient(base_url=emu.url, headers=AUTH, timeout=TIMEOUT) as client,
    ):
        rows = [row(), row(asset="Pipe1"), row(asset="Nowhere")]
        body = await ingest(client, rows)
        details = (await client.get(f"/jobs/{body['job_id']}/details")).json()
        assert details["errors"] == [
            "metric 'pressure' on column 'metric' is not valid for asset 'Pipe1' (pipe)",
            "asset 'Nowhere' on column 'asset' is not in the network",
        ]
        assert emu.rows == [row()]


async def test_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    for path in (f"/jobs/{uuid.uuid4()}", f"/jobs/{uuid.uuid4()}/details", "/jobs/nope"):
        resp = await client.get(path)
        assert resp.status_code == 404
        assert resp.json()["message"]
    wrong_method = await client.get("/ingest")
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["Allow"]
    assert wrong_method.json()["error"] == "Method Not Allowed"


async def test_multipart_json_file(emu: QatiumEmulator, client: httpx.AsyncClient) -> None:
    content = json.dumps([row(), row(unit="bar")]).encode()
    resp = await client.post(
        "/ingest", files={"file": ("data.json", content, "application/json")}, data={"x": "1"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == {"successful": 50, "quarantined": 50, "pending": 0}
    assert emu.rows == [row()]
    assert emu.jobs[resp.json()["job_id"]].source == "file:json"


CSV_WITH_HEADER = (
    b'"asset","time","metric","unit","value","test"\r\n'
    b'"Pipe1","2021-12-31T23:45:00Z","flow","l/s",2.75,"a"\r\n'
    b'"Pipe1","2021-12-31T23:50:00Z","flow","l/s","1,5","b"\r\n'
)
CSV_WITHOUT_HEADER = (
    b'"2021-12-31T23:45:00Z","Pipe1","flow","l/s",2.75\n'
    b'"2021-12-31T23:45:00Z","Pump1","status","",1\n'
    b'"2021-12-31T23:45:00Z","Pump1","status",""\n'
)


@pytest.mark.parametrize(
    ("upload", "appended", "errors"),
    [
        (
            ("data.csv", CSV_WITH_HEADER, "text/csv"),
            [
                {
                    "time": "2021-12-31T23:45:00Z",
                    "asset": "Pipe1",
                    "metric": "flow",
                    "unit": "l/s",
                    "value": 2.75,
                }
            ],
            ["value '1,5' on column 'value' is not Float32"],
        ),
        (
            # No extension, no CSV type: recognised by its content.
            ("upload", CSV_WITHOUT_HEADER, "application/octet-stream"),
            [
                {
                    "time": "2021-12-31T23:45:00Z",
                    "asset": "Pipe1",
                    "metric": "flow",
                    "unit": "l/s",
                    "value": 2.75,
                },
                {
                    "time": "2021-12-31T23:45:00Z",
                    "asset": "Pump1",
                    "metric": "status",
                    "unit": "",
                    "value": 1,
                },
            ],
            ["column 'value' is missing"],
        ),
    ],
)
async def test_multipart_csv_file(
    emu: QatiumEmulator,
    client: httpx.AsyncClient,
    upload: tuple[str, bytes, str],
    appended: list[dict[str, object]],
    errors: list[str],
) -> None:
    resp = await client.post("/ingest", files={"file": upload})
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["job_id"]
    assert emu.rows == appended
    assert emu.jobs[job_id].source == "file:csv"
    details = (await client.get(f"/jobs/{job_id}/details")).json()
    assert details["errors"] == errors


@pytest.mark.parametrize(
    "files",
    [
        {"data": ("data.csv", b'"2021-12-31T23:45:00Z","Pipe1","flow","l/s",2.75\n', "text/csv")},
        {
            "file": (
                "data.csv",
                b'"time","asset","value"\n"2021-12-31T23:45:00Z","P",1\n',
                "text/csv",
            )
        },
        {"file": ("data.json", b'{"rows": []}', "application/json")},
    ],
)
async def test_multipart_without_usable_file_is_400(
    emu: QatiumEmulator, client: httpx.AsyncClient, files: dict[str, Any]
) -> None:
    resp = await client.post("/ingest", files=files)
    assert resp.status_code == 400
    assert emu.jobs == {}


async def test_async_mode_answers_pending_until_polled(clock: ManualClock) -> None:
    async with (
        QatiumEmulator(TOKEN, async_jobs=True, clock=clock) as emu,
        httpx.AsyncClient(base_url=emu.url, headers=AUTH, timeout=TIMEOUT) as client,
    ):
        body = await ingest(client, [row(), row(unit="bar")])
        assert body["status"] == {"successful": 0, "quarantined": 0, "pending": 100}
        job_id = body["job_id"]
        assert emu.jobs[job_id].status == "Pending"
        assert (await client.get(f"/jobs/{job_id}/details")).json() == []
        assert emu.rows == []
        first = await job_status(client, job_id)
        assert first["status"] == "Processing"
        assert emu.rows == []
        second = await job_status(client, job_id)
        assert second["status"] == "Warning"
        assert emu.rows == [row()]
        details = (await client.get(f"/jobs/{job_id}/details")).json()
        assert details["job_status"] == "warning"


async def test_async_mode_settles_by_itself(clock: ManualClock) -> None:
    async with (
        QatiumEmulator(TOKEN, async_jobs=True, settle_after_s=0.01, clock=clock) as emu,
        httpx.AsyncClient(base_url=emu.url, headers=AUTH, timeout=TIMEOUT) as client,
    ):
        body = await ingest(client, [row()])
        await emu.wait_for(lambda: len(emu.rows) == 1)
        assert (await job_status(client, body["job_id"]))["status"] == "Ok"


async def test_fail_next_answers_the_fault_without_state_change(
    emu: QatiumEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.fail_next(2, status=503, retry_after=7.2)
    for _ in range(2):
        resp = await client.post("/ingest", json=[row()])
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "8"
        assert resp.json()["message"] == "injected fault"
    assert emu.jobs == {}
    body = await ingest(client, [row()])
    emu.faults.fail_next(1, status=500, body="boom", prefix="/jobs")
    assert (await client.post("/ingest", json=[row()])).status_code == 200
    failed = await client.get(f"/jobs/{body['job_id']}")
    assert (failed.status_code, failed.text) == (500, "boom")
    assert (await client.get(f"/jobs/{body['job_id']}")).status_code == 200
    assert emu.status_counts[503] == 2
    assert emu.status_counts[500] == 1
    assert emu.faults.pending == 0
    assert emu.faults.injected["fail"] == 3


async def test_delay_next_makes_the_client_time_out(emu: QatiumEmulator) -> None:
    emu.faults.delay_next(1, seconds=60)
    async with httpx.AsyncClient(
        base_url=emu.url, headers=AUTH, timeout=httpx.Timeout(5.0, read=0.2)
    ) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/ingest", json=[row()])
        # The server cancels the abandoned request once it sees the client hang up.
        await emu.wait_for(lambda: emu.status_counts[None] == 1)
        assert emu.jobs == {}
        assert (await client.post("/ingest", json=[row()])).status_code == 200


async def test_short_delay_then_normal_answer(
    emu: QatiumEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.delay_next(1, seconds=0.01)
    await ingest(client, [row()])
    assert emu.faults.injected["delay"] == 1
    assert emu.rows == [row()]


async def test_shutdown_ends_a_pending_delay(clock: ManualClock) -> None:
    emu = QatiumEmulator(TOKEN, clock=clock)
    async with emu, httpx.AsyncClient(base_url=emu.url, headers=AUTH, timeout=TIMEOUT) as client:
        emu.faults.delay_next(1, seconds=600)
        request = asyncio.create_task(client.post("/ingest", json=[row()]), name="delayed-post")
        await emu.wait_for(lambda: emu.faults.injected["delay"] == 1)
        await emu.aclose()
        await emu.aclose()  # idempotent
        # The delay was cut short and the request handled before the server stopped (had it
        # waited out aiohttp's shutdown timeout instead, the handler would be cancelled).
        resp = await request
        assert resp.status_code == 200
        assert len(emu.rows) == 1
    with pytest.raises(RuntimeError):
        _ = emu.url


async def test_drop_next_closes_without_answer(
    emu: QatiumEmulator, client: httpx.AsyncClient
) -> None:
    emu.faults.drop_next(1, prefix="/ingest")
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("/ingest", json=[row()])
    assert emu.status_counts[None] == 1
    assert emu.jobs == {}
    await ingest(client, [row()])
    assert emu.total_requests == 2


async def test_restart_keeps_the_address_and_the_records(
    emu: QatiumEmulator, client: httpx.AsyncClient
) -> None:
    await ingest(client, [row()])
    url = emu.url
    await emu.aclose()
    with pytest.raises(httpx.ConnectError):
        await client.post("/ingest", json=[row()])
    await emu.start()
    assert emu.url == url
    await ingest(client, [row(asset="J2")])
    assert emu.rows == [row(), row(asset="J2")]


async def test_wait_for_times_out(emu: QatiumEmulator) -> None:
    with pytest.raises(TimeoutError):
        await emu.wait_for(lambda: False, timeout=0.01)


async def test_port_in_use_raises_and_cleans_up(emu: QatiumEmulator) -> None:
    other = QatiumEmulator(TOKEN, port=emu.port)
    with pytest.raises(OSError):
        await other.start()
    await other.aclose()  # nothing to close, still fine


def test_sliding_window_limiter_counts_admitted_requests_only() -> None:
    clock = ManualClock(0.0)
    limiter = SlidingWindowLimiter(2, 10.0, clock)
    assert limiter.acquire("a") is None
    clock.advance(4)
    assert limiter.acquire("a") is None
    assert limiter.acquire("b") is None  # per key
    assert limiter.acquire("a") == 6.0
    clock.advance(6)  # the t=0 request leaves the window exactly now
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") == 4.0


async def test_standalone_cli_serves_and_stops() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.sandbox.qatium",
        "--port",
        "0",
        "--token",
        "cli-token",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        match = None
        async with asyncio.timeout(20):
            while line := await proc.stdout.readline():
                if match := re.search(rb"listening on (http://\S+)", line):
                    break
        assert match, "the emulator never said where it listens"
        url = match.group(1).decode()
        headers = {"Authorization": "Bearer cli-token"}
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=TIMEOUT) as client:
            assert (await client.post("/ingest", json=[row()])).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(20):
            await proc.communicate()
    assert proc.returncode == 0
