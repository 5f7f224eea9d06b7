"""Emulator of the Energydata.dk batch import API (seed document 001, section 4) and its values API.

Routes, under ``/api/v1`` (the document's paths), every one but the upload needing
``Authorization: Bearer <token>`` (401 missing/unknown, 403 without the permission)::

    POST   /import?importname=NAME     201 {"user_id","status":"stored","name","updated_at",
                                            "created_at","id","errors":[]}
    GET    /import/{id}                200 the import (status, errors); DELETE: 204
    GET    /import/{id}/upload_url     200 {"upload_url": "<this server>/s3/import/inbox/..."}
    PUT    /import/{id}/validate       202 the import, status "validating"
    PUT    /import/{id}/ingest         202 the import, status "ingesting" (only when "ready")
    GET    /datastreams/values?ids=1,2&latest=true | &from=..&to=..   200 text/csv "id,ms,value"
    PUT    /s3/import/inbox/{user}/{key}.csv?X-Amz-...   the presigned upload (no token: the
                                       signature in the URL; 403 when wrong or expired)

Statuses: ``stored`` -> (upload) -> ``validating`` -> ``ready`` | ``failed``; ``ready`` ->
``ingesting`` -> ``done``. A job reports ``validating``/``ingesting`` for ``polls_per_phase``
status queries, then its outcome; while :meth:`hold` is in force it stays there. Errors answer
``{"message": "..."}`` (the API's timestamps look like Laravel's; so does this).

Validation follows 4.1.2: UTF-8; RFC 4180 with ``;``; a header row whose first cell is ignored
and whose other cells are known datastream ids or topics (no repeats); then rows of a timestamp
``YYYY-MM-DDTHH:mm:ss.SSSZ`` and one field per column; a value must match its datastream's type
(integer, double, string); an empty field imports "" on a string datastream and nothing on a
numeric one. Blank lines are skipped. Every broken rule is one error
``{"line": <file line, header = 1>, "column": <header or null>, "message": "..."}``;
any error fails the whole import (nothing is ingested).

Decisions where the document is silent: the failure status is ``failed``; validate without an
uploaded file is a 409; a re-ingested value for the same datastream and instant replaces the
old one (so a re-sent row is harmless); the presigned URL lives ``url_ttl_s`` seconds.

Records: ``imports`` (id -> :class:`ImportJob`), ``values`` (datastream id -> ms -> value, what
ingestion stored), ``ingested`` (count of values ingested, repeats included).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from aiohttp import web

from gateway.sandbox.emulator import BearerAuth, Clock, Emulator, Reject, read_body

DatastreamType = Literal["double", "integer", "string"]
_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
_INT = re.compile(r"^[+-]?\d+$")
_DOUBLE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
MAX_ERRORS = 1000
USER_ID = 11


@dataclass(frozen=True, slots=True)
class Datastream:
    id: int
    topic: str  # prefix/suffix
    type: DatastreamType = "double"


@dataclass(slots=True)
class ImportJob:
    id: int
    name: str
    status: str
    created_at: str
    updated_at: str
    object_key: str = ""
    file: bytes | None = None
    errors: list[dict[str, object]] = field(default_factory=list)
    rows: list[tuple[int, int, object]] = field(default_factory=list)
    polls_left: int = 0
    #: What the running phase will end in: its status and (validation) errors.
    outcome: str = ""
    outcome_errors: list[dict[str, object]] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "user_id": USER_ID,
            "status": self.status,
            "name": self.name,
            "updated_at": self.updated_at,
            "created_at": self.created_at,
            "id": self.id,
            "errors": self.errors,
        }


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


def parse_ts(text: str) -> int | None:
    """Milliseconds of a ``YYYY-MM-DDTHH:mm:ss.SSSZ`` timestamp, or None when malformed."""
    if not _TS.match(text):
        return None
    try:
        dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None
    return int(dt.timestamp()) * 1000 + int(text[20:23])


def validate_csv(
    data: bytes, datastreams: Iterable[Datastream]
) -> tuple[list[tuple[int, int, object]], list[dict[str, object]]]:
    """(rows as (datastream id, ms, value), errors) per the module docstring."""
    by_key: dict[str, Datastream] = {}
    for ds in datastreams:
        by_key[str(ds.id)] = ds
        by_key[ds.topic] = ds
    errors: list[dict[str, object]] = []

    def err(line: int | None, column: str | None, message: str) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"line": line, "column": column, "message": message})

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        err(None, None, f"file is not UTF-8: {exc.reason} at byte {exc.start}")
        return [], errors
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=";", strict=True)
    rows: list[tuple[int, int, object]] = []
    try:
        header = next(reader, None)
        if header is None or len(header) < 2:
            err(1, None, "the first row must hold a header per datastream column")
            return [], errors
        columns: list[Datastream | None] = []
        for h in header[1:]:
            known = by_key.get(h.strip())
            if known is None:
                err(1, h, f"unknown datastream {h!r}")
            elif any(c is not None and c.id == known.id for c in columns):
                err(1, h, f"datastream {h!r} appears twice")
                known = None
            columns.append(known)
        for fields in reader:
            line = reader.line_num
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                err(line, None, f"expected {len(header)} fields, got {len(fields)}")
                continue
            ms = parse_ts(fields[0])
            if ms is None:
                err(line, None, f"timestamp {fields[0]!r} is not YYYY-MM-DDTHH:mm:ss.SSSZ UTC")
                continue
            for h, col, cell in zip(header[1:], columns, fields[1:], strict=True):
                if col is None:
                    continue
                value = _typed(cell, col.type)
                if value is _BAD:
                    err(line, h, f"value {cell!r} is not a valid {col.type}")
                elif value is not None:
                    rows.append((col.id, ms, value))
    except csv.Error as exc:
        err(reader.line_num, None, f"not RFC 4180 CSV: {exc}")
    return rows, errors


_BAD = object()


def _typed(cell: str, kind: DatastreamType) -> object:
    if kind == "string":
        return cell
    if cell == "":
        return None  # "no value will be imported"
    if kind == "integer":
        return int(cell) if _INT.match(cell) else _BAD
    return float(cell) if _DOUBLE.match(cell) else _BAD


class EnergydataImportEmulator(Emulator):
    """The batch import and datastream values API on 127.0.0.1 (module docstring)."""

    name = "energydata-import"

    def __init__(
        self,
        token: str = "import-token",
        *,
        datastreams: Iterable[Datastream] = (),
        forbidden_tokens: Iterable[str] = (),
        polls_per_phase: int = 1,
        url_ttl_s: float = 7200.0,
        max_file_bytes: int = 512 * 1024 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        """``clock`` drives the presigned URLs' expiry."""
        super().__init__(host=host, port=port, clock=clock)
        self.auth = BearerAuth({token: {"import", "read"}})
        for t in forbidden_tokens:
            self.auth.grant(t)  # known, allowed nothing: 403
        self.datastreams = {ds.id: ds for ds in datastreams}
        self.polls_per_phase = polls_per_phase
        self.url_ttl_s = url_ttl_s
        self.max_file_bytes = max_file_bytes
        self.imports: dict[int, ImportJob] = {}
        self.values: dict[int, dict[int, object]] = {}
        self.ingested = 0
        self._next_id = 1340
        self._key = uuid.uuid4().bytes
        self._issued: dict[str, tuple[int, float]] = {}  # object key -> (import id, issued at)
        self._held = False

    def client_max_size(self) -> int:
        return self.max_file_bytes

    def error_body(self, status: int, message: str) -> object:
        return {"message": message}

    def setup_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/api/v1/import", self._create)
        r.add_get("/api/v1/import/{id}", self._show)
        r.add_delete("/api/v1/import/{id}", self._delete)
        r.add_get("/api/v1/import/{id}/upload_url", self._upload_url)
        r.add_put("/api/v1/import/{id}/validate", self._validate)
        r.add_put("/api/v1/import/{id}/ingest", self._ingest)
        r.add_get("/api/v1/datastreams/values", self._values)
        r.add_put("/s3/import/inbox/{user}/{key}", self._upload)

    # -- controls ----------------------------------------------------------------------------

    def hold(self) -> None:
        """Keep every import in validating/ingesting until :meth:`release`."""
        self._held = True

    async def release(self) -> None:
        self._held = False
        await self.changed()

    def add_datastream(self, ds: Datastream) -> None:
        self.datastreams[ds.id] = ds

    # -- the import API ----------------------------------------------------------------------

    def _job(self, request: web.Request) -> ImportJob:
        self.auth.require(request, "import")
        job = (
            self.imports.get(int(request.match_info["id"]))
            if request.match_info["id"].isdigit()
            else None
        )
        if job is None:
            raise Reject(404, "import not found")
        return job

    async def _create(self, request: web.Request) -> web.Response:
        self.auth.require(request, "import")
        name = request.query.get("importname", "").strip()
        if not name:
            raise Reject(422, "The importname field is required.")
        now = _stamp()
        job = ImportJob(self._next_id, name, "stored", now, now)
        self._next_id += 1
        self.imports[job.id] = job
        return web.json_response(job.as_json(), status=201)

    async def _show(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job.status in ("validating", "ingesting") and not self._held:
            if job.polls_left > 0:
                job.polls_left -= 1
            else:
                self._finish(job)
        return web.json_response(job.as_json())

    async def _delete(self, request: web.Request) -> web.Response:
        job = self._job(request)
        del self.imports[job.id]
        return web.Response(status=204)

    async def _upload_url(self, request: web.Request) -> web.Response:
        job = self._job(request)
        key = f"{uuid.uuid4()}.csv"
        date = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = f"/s3/import/inbox/user{USER_ID}/{key}"
        expires = str(int(self.url_ttl_s))
        sig = self._sign(path, date, expires)
        self._issued[key] = (job.id, self.clock())
        query = (
            "X-Amz-Content-Sha256=UNSIGNED-PAYLOAD&X-Amz-Algorithm=AWS4-HMAC-SHA256&"
            f"X-Amz-Credential=edk-s3root%2F{date[:8]}%2Fdefault%2Fs3%2Faws4_request&"
            f"X-Amz-Date={date}&X-Amz-Expires={expires}&X-Amz-SignedHeaders=host&"
            f"X-Amz-Signature={sig}"
        )
        return web.json_response({"upload_url": f"{self.url}{path}?{query}"})

    def _sign(self, path: str, date: str, expires: str) -> str:
        text = f"{path}\n{date}\n{expires}".encode()
        return hmac.new(self._key, text, hashlib.sha256).hexdigest()

    async def _upload(self, request: web.Request) -> web.Response:
        q = request.query
        sig = self._sign(request.path, q.get("X-Amz-Date", ""), q.get("X-Amz-Expires", ""))
        issued = self._issued.get(request.match_info["key"])
        if issued is None or not hmac.compare_digest(sig, q.get("X-Amz-Signature", "")):
            raise Reject(403, "SignatureDoesNotMatch")
        if self.clock() - issued[1] > self.url_ttl_s:
            raise Reject(403, "Request has expired")
        job = self.imports.get(issued[0])
        if job is None:
            raise Reject(404, "NoSuchUpload")
        job.file = await read_body(request, self.max_file_bytes)
        job.object_key = request.match_info["key"]
        job.updated_at = _stamp()
        return web.Response(status=200, headers={"ETag": hashlib.md5(job.file).hexdigest()})

    async def _validate(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job.status not in ("stored", "failed"):
            raise Reject(409, f"import is {job.status}, not stored")
        if job.file is None:
            raise Reject(409, "no file has been uploaded for this import")
        rows, errors = validate_csv(job.file, self.datastreams.values())
        job.rows, job.errors = rows, []
        job.outcome, job.outcome_errors = ("failed" if errors else "ready"), errors
        job.status = "validating"
        job.polls_left = self.polls_per_phase
        job.updated_at = _stamp()
        return web.json_response(job.as_json(), status=202)

    async def _ingest(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if job.status != "ready":
            raise Reject(409, f"import is {job.status}, not ready")
        job.status = "ingesting"
        job.outcome = "done"
        job.polls_left = self.polls_per_phase
        job.updated_at = _stamp()
        return web.json_response(job.as_json(), status=202)

    def _finish(self, job: ImportJob) -> None:
        if job.status == "validating":
            job.status = job.outcome
            if job.status == "failed":
                job.errors = job.outcome_errors
                job.rows = []
        elif job.status == "ingesting":
            for ds_id, ms, value in job.rows:
                self.values.setdefault(ds_id, {})[ms] = value
            self.ingested += len(job.rows)
            job.status = "done"
        job.updated_at = _stamp()

    # -- datastream values (section 2) -------------------------------------------------------

    async def _values(self, request: web.Request) -> web.Response:
        self.auth.require(request, "read")
        try:
            ids = [int(i) for i in request.query.get("ids", "").split(",") if i]
        except ValueError:
            raise Reject(422, "ids must be a comma-separated list of datastream ids") from None
        if not ids:
            raise Reject(422, "The ids field is required.")
        out = io.StringIO()
        for ds_id in ids:
            series = sorted(self.values.get(ds_id, {}).items())
            if request.query.get("latest") == "true":
                series = series[-1:]
            else:
                lo, hi = _span(request.query.get("from"), request.query.get("to"))
                series = [(ms, v) for ms, v in series if lo <= ms <= hi]
            for ms, v in series:
                out.write(f"{ds_id},{ms},{v}\r\n")
        return web.Response(
            text=out.getvalue(),
            content_type="text/csv",
            charset="utf-8",
            headers={"Content-Disposition": "attachment; filename=data.csv"},
        )


def _span(lo: str | None, hi: str | None) -> tuple[int, int]:
    def ms(text: str) -> int:
        try:
            return int(
                datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp() * 1000
            )
        except ValueError:
            raise Reject(422, f"{text!r} is not YYYY-mm-ddTHH:MM:SS") from None

    if lo is None or hi is None:
        raise Reject(422, "give latest=true, or both from and to")
    return ms(lo), ms(hi) + 999  # both inclusive, to the second
