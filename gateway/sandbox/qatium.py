"""Emulator of the Qatium Ingest API (seed document 000), enforcing its rules over real HTTP.

Routes (the document names no paths; the real URL is handed out with the token, so the uplink
takes a base URL and these paths are relative to it):

- ``POST /ingest`` - ``application/json`` array body (charset optional, must be UTF-8), or
  ``multipart/form-data`` with a ``file`` field holding a JSON array or a CSV (header optional).
  200 ``{"job_id": "<uuid4>", "status": {"successful": S, "quarantined": Q, "pending": P}}``.
- ``GET /jobs/{job_id}`` - 200 ``{"job_id", "status", "message"}`` with status one of
  ``Ok Warning Invalid Processing Pending``; 404 unknown job.
- ``GET /jobs/{job_id}/details`` - 200 ``[]`` when nothing is quarantined (or the job is not
  final yet), else ``{"network", "job_id", "job_status": "warning"|"invalid", "message",
  "errors": [...], "insertion_date": "YYYY-MM-DD HH:MM:SS"}``; 404 unknown job.

Every route needs ``Authorization: Bearer <token>``: 401 when missing or unknown, 403 for a
token in ``forbidden_tokens``. Errors answer ``{"error": "<reason phrase>", "message": "..."}``.
Ingest checks, in order: auth, rate limit, content type, size (413), body format (400), rows.

Decisions where the document is silent:

- the 20 requests/minute limit applies per token to ``POST /ingest`` only (the document puts
  it under "HTTP Method ... POST"); job queries are not limited. Requests refused with 401 or
  429 do not use up the window. 429 carries ``Retry-After`` in whole seconds, rounded up;
- percentages are JSON numbers of the share of rows, rounded to 2 decimals and written as
  integers when whole (so the document's ``80``/``20`` appear verbatim); ``successful +
  quarantined + pending == 100``;
- an empty array, a body that is not an array of objects, or rows none of which has all five
  columns is a 400, not a job; a single incomplete row is quarantined;
- job details list one error text per broken rule per quarantined row, in row order, without
  row numbers (the document gives none); ``insertion_date`` is the UTC time of the ingest;
- the 50 MB body limit is ``max_body_bytes`` (MiB by default, as the brief set it); the
  multipart file limit is ``max_file_bytes`` (1.5 GB);
- with ``async_jobs=True`` the ingest answers ``pending: 100`` and appends nothing yet; the
  first ``pending_polls`` status queries answer ``Processing``, the next one makes the job
  final (and so does ``settle_after_s``, when set). Details of a job not yet final are ``[]``.

Records for tests: ``rows`` (accepted rows in order, as received; CSV values parsed to
numbers), ``quarantined`` (:class:`QuarantinedRow`), ``jobs`` (job id -> :class:`QatiumJob`).
Row rules are in :mod:`gateway.sandbox.qatium_rules`.

Standalone: ``python -m gateway.sandbox.qatium --port 8701 --token demo-token``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import structlog
from aiohttp import BodyPartReader, web

from gateway.sandbox.emulator import (
    BearerAuth,
    Clock,
    Emulator,
    Reject,
    SlidingWindowLimiter,
    read_body,
    read_part,
)
from gateway.sandbox.qatium_rules import check_rows, rows_from_csv, rows_from_json

log = structlog.get_logger(__name__)

JobStatus = Literal["Pending", "Processing", "Ok", "Warning", "Invalid"]
FINAL_STATUSES: frozenset[str] = frozenset({"Ok", "Warning", "Invalid"})
DEFAULT_NETWORK = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True, slots=True)
class QuarantinedRow:
    """A row that was not appended, with every rule it broke."""

    job_id: str
    row: dict[str, object]
    errors: tuple[str, ...]


@dataclass(slots=True)
class QatiumJob:
    """One ingest request and its outcome; ``status`` is final once Ok/Warning/Invalid."""

    job_id: str
    source: Literal["json", "file:json", "file:csv"]
    valid_rows: list[dict[str, object]]
    quarantined: list[QuarantinedRow]
    insertion_date: datetime
    status: JobStatus = "Pending"
    status_queries: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.valid_rows) + len(self.quarantined)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def outcome(self) -> JobStatus:
        if not self.quarantined:
            return "Ok"
        return "Warning" if self.valid_rows else "Invalid"

    def message(self) -> str:
        appended, failed = len(self.valid_rows), len(self.quarantined)
        match self.status:
            case "Pending":
                return "Your request has not started to be processed yet."
            case "Processing":
                return "Your request is being processed."
            case "Ok":
                return f"Your request has been processed so {appended} rows have been appended."
            case "Warning":
                # The document's example text, word for word.
                return (
                    f"Your request has been processed with warnings so {appended} rows have "
                    f"been appended and {failed} rows could not be appended."
                )
            case "Invalid":
                return "Your request have been processed with errors so no rows have been appended."

    def percentages(self) -> dict[str, int | float]:
        if not self.final:
            return {"successful": 0, "quarantined": 0, "pending": 100}
        successful = round(100 * len(self.valid_rows) / self.total, 2)
        quarantined = round(100 - successful, 2)
        return {
            "successful": _number(successful),
            "quarantined": _number(quarantined),
            "pending": 0,
        }


def _number(value: float) -> int | float:
    return int(value) if value.is_integer() else value


class QatiumEmulator(Emulator):
    """The Qatium Ingest API on 127.0.0.1; see the module docstring for the contract."""

    name = "qatium"

    def __init__(
        self,
        token: str = "demo-token",
        *,
        forbidden_tokens: Iterable[str] = (),
        rate_limit: int = 20,
        rate_period_s: float = 60.0,
        max_body_bytes: int = 50 * 1024 * 1024,
        max_file_bytes: int = 1_500_000_000,
        async_jobs: bool = False,
        pending_polls: int = 1,
        settle_after_s: float | None = None,
        network_id: str = DEFAULT_NETWORK,
        assets: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        """``assets`` (asset id -> pipe/junction/pump/valve/tank), when given, is the network
        model: rows for unknown assets or with a metric the mapping table forbids for the
        asset's type are quarantined. ``clock`` drives the rate-limit window only."""
        super().__init__(host=host, port=port, clock=clock)
        self.token = token
        self.auth = BearerAuth({token: {"ingest", "jobs"}})
        for forbidden in forbidden_tokens:
            self.auth.grant(forbidden)  # known to the service, allowed nothing: 403
        self.limiter = SlidingWindowLimiter(rate_limit, rate_period_s, clock)
        self.max_body_bytes = max_body_bytes
        self.max_file_bytes = max_file_bytes
        self.async_jobs = async_jobs
        self.pending_polls = pending_polls
        self.settle_after_s = settle_after_s
        self.network_id = network_id
        self.assets = dict(assets) if assets is not None else None
        self.rows: list[dict[str, object]] = []
        self.quarantined: list[QuarantinedRow] = []
        self.jobs: dict[str, QatiumJob] = {}

    def setup_routes(self, app: web.Application) -> None:
        app.router.add_post("/ingest", self._ingest)
        app.router.add_get("/jobs/{job_id}", self._job_status)
        app.router.add_get("/jobs/{job_id}/details", self._job_details)

    # -- ingest ------------------------------------------------------------------------------

    async def _ingest(self, request: web.Request) -> web.Response:
        token = self.auth.require(request, "ingest")
        self.limiter.check(token)
        source: Literal["json", "file:json", "file:csv"]
        if request.content_type == "application/json":
            charset = (request.charset or "utf-8").lower()
            if charset not in {"utf-8", "utf8"}:
                raise Reject(400, f"charset {charset} is not supported, send utf-8")
            rows = rows_from_json(await read_body(request, self.max_body_bytes))
            source = "json"
        elif request.content_type == "multipart/form-data":
            raw, is_csv = await self._read_file_field(request)
            rows = rows_from_csv(raw) if is_csv else rows_from_json(raw)
            source = "file:csv" if is_csv else "file:json"
        else:
            raise Reject(
                400,
                f"Content-Type {request.content_type} is not application/json "
                "or multipart/form-data",
            )
        job = self._create_job(rows, source)
        return web.json_response({"job_id": job.job_id, "status": job.percentages()})

    async def _read_file_field(self, request: web.Request) -> tuple[bytes, bool]:
        """The bytes of the form's ``file`` field and whether they are CSV."""
        try:
            reader = await request.multipart()
            async for part in reader:
                # Other fields are skipped; the reader discards their content on next().
                if isinstance(part, BodyPartReader) and part.name == "file":
                    raw = await read_part(part, self.max_file_bytes)
                    return raw, _looks_like_csv(part, raw)
        except ValueError as exc:  # aiohttp's malformed multipart errors
            raise Reject(400, f"malformed multipart body: {exc}") from exc
        raise Reject(400, "multipart form has no 'file' field")

    def _create_job(
        self, rows: list[dict[str, object]], source: Literal["json", "file:json", "file:csv"]
    ) -> QatiumJob:
        job_id = str(uuid.uuid4())
        checks = check_rows(rows, self.assets)
        job = QatiumJob(
            job_id=job_id,
            source=source,
            valid_rows=[c.row for c in checks if not c.errors],
            quarantined=[QuarantinedRow(job_id, c.row, c.errors) for c in checks if c.errors],
            insertion_date=datetime.now(UTC).replace(microsecond=0),
        )
        self.jobs[job_id] = job
        log.debug("qatium_job_created", job_id=job_id, rows=job.total, source=source)
        if not self.async_jobs:
            self._finish(job)
        elif self.settle_after_s is not None:
            self.spawn(self._settle(job, self.settle_after_s), f"settle:{job_id[:8]}")
        return job

    def _finish(self, job: QatiumJob) -> None:
        if job.final:
            return
        job.status = job.outcome()
        job.errors = [err for q in job.quarantined for err in q.errors]
        self.rows.extend(job.valid_rows)
        self.quarantined.extend(job.quarantined)
        log.debug(
            "qatium_job_final",
            job_id=job.job_id,
            status=job.status,
            appended=len(job.valid_rows),
            quarantined=len(job.quarantined),
        )

    async def _settle(self, job: QatiumJob, delay: float) -> None:
        await asyncio.sleep(delay)
        self._finish(job)
        await self.changed()

    # -- jobs --------------------------------------------------------------------------------

    def _job(self, request: web.Request) -> QatiumJob:
        self.auth.require(request, "jobs")
        job = self.jobs.get(request.match_info["job_id"])
        if job is None:
            raise Reject(404, "job not found")
        return job

    async def _job_status(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if not job.final:
            if job.status_queries < self.pending_polls:
                job.status = "Processing"
            else:
                self._finish(job)
            job.status_queries += 1
        return web.json_response(
            {"job_id": job.job_id, "status": job.status, "message": job.message()}
        )

    async def _job_details(self, request: web.Request) -> web.Response:
        job = self._job(request)
        if not job.final or not job.quarantined:
            return web.json_response([])
        return web.json_response(
            {
                "network": self.network_id,
                "job_id": job.job_id,
                "job_status": job.status.lower(),
                "message": job.message(),
                "errors": job.errors,
                "insertion_date": job.insertion_date.strftime("%Y-%m-%d %H:%M:%S"),
            }
        )


def _looks_like_csv(part: BodyPartReader, raw: bytes) -> bool:
    """CSV by file name or part type, else by content: a JSON file starts with ``[``."""
    filename = (part.filename or "").lower()
    ctype = part.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if filename.endswith(".csv") or ctype in {"text/csv", "application/csv"}:
        return True
    if filename.endswith(".json") or ctype == "application/json":
        return False
    return not raw.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


async def _serve(emu: QatiumEmulator) -> None:
    async with emu:
        # A plain line for scripts (and the CLI test) to read the chosen port from.
        print(f"qatium emulator listening on {emu.url} (POST {emu.url}/ingest)", flush=True)
        await asyncio.Event().wait()  # until Ctrl-C cancels us


def main(argv: list[str] | None = None) -> None:
    """Run the emulator until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m gateway.sandbox.qatium")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--token", default="demo-token")
    parser.add_argument("--forbidden-token", action="append", default=[])
    parser.add_argument("--rate-limit", type=int, default=20, help="requests per period")
    parser.add_argument("--rate-period", type=float, default=60.0, help="seconds")
    parser.add_argument("--async-jobs", action="store_true", help="answer pending, poll to end")
    parser.add_argument("--settle-after", type=float, default=None, help="seconds")
    args = parser.parse_args(argv)
    emu = QatiumEmulator(
        args.token,
        forbidden_tokens=args.forbidden_token,
        rate_limit=args.rate_limit,
        rate_period_s=args.rate_period,
        async_jobs=args.async_jobs,
        settle_after_s=args.settle_after,
        host=args.host,
        port=args.port,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(emu))


if __name__ == "__main__":
    main()
