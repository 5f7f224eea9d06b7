"""Energydata.dk batch import (document section 4) for backfill: CSV, import job, per-row outcome.

The file (4.1.2): RFC 4180 with the document's ``;`` separator, CRLF line ends, UTF-8. The first
row holds the column headers: an empty first cell (ignored by the service), then per datastream
its id when the route gives one, else its full topic ``prefix/suffix``. Every other row starts
with a UTC timestamp ``YYYY-MM-DDTHH:mm:ss.SSSZ`` followed by one value per column; a datastream
without a reading at that instant has an empty cell (numeric datastreams only: "no value is
imported"; text never goes by import, see gateway/uplinks/energydata/uplink.py). Rows are in
time order; a second reading of one datastream at the same instant goes in a second row with
that timestamp.

The job (4.1.3 - 4.1.7), each step's failure classified::

    POST <url>/import?importname=...      -> {"id": N, "status": "stored", ...}
    GET  <url>/import/N/upload_url        -> {"upload_url": "<presigned>"}
    PUT  <presigned>  (the file; no token: the URL carries its own signature)
    PUT  <url>/import/N/validate          then GET <url>/import/N until "ready"
    PUT  <url>/import/N/ingest            then GET <url>/import/N until "done"

401/403 from the API is ``auth``; 413 on the upload ``too_large``; 408/429/5xx, network errors,
a refused upload URL (expired signature) and waits past ``max_wait_s`` are ``transient``.
Only ``done`` delivers. A failed validation (any status other than the documented progression)
comes with the service's ``errors``: those naming a line (and optionally a column) are mapped
to the readings of that cell or line, which are dead-lettered with the service's text, and the
rest goes again as a new import (at most three rounds). Errors that name no line leave the
readings unidentified: ``rejected`` without ids, so the dispatcher bisects.

:class:`ImportBatcher` runs one import at a time and merges the readings of sends that arrive
meanwhile into the next one (group commit), so a large backlog goes through a few imports.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from gateway.configbase import Secret
from gateway.models import StoredReading
from gateway.routes import RouteTable
from gateway.uplinks import http
from gateway.uplinks.base import Failure, Outcome, SendResult
from gateway.uplinks.energydata.config import EnergydataConfig, EnergydataRoute, WireTable
from gateway.uplinks.energydata.messages import wire_value

log = structlog.get_logger(__name__)

SEPARATOR = ";"
#: Statuses on the way to "ready" and to "done" (the document's helper class names them).
VALIDATING = frozenset({"open", "uploading", "uploaded", "stored", "validating"})
INGESTING = frozenset({"ready", "ingesting"})
MAX_ROUNDS = 3


def csv_time(ts_ms: int) -> str:
    """``2021-05-01T10:12:44.432Z``: UTC, always with milliseconds."""
    dt = datetime.fromtimestamp(ts_ms // 1000, UTC)
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{ts_ms % 1000:03d}Z"


def csv_value(r: StoredReading, route: EnergydataRoute) -> str:
    v = wire_value(r.value, route.datatype)
    return repr(v) if isinstance(v, float) else str(v)


@dataclass(slots=True)
class CsvFile:
    """A built import file and where each reading sits in it."""

    data: bytes
    ids: list[int]
    #: file line number (the header is line 1) -> column header -> reading id
    lines: dict[int, dict[str, int]] = field(default_factory=dict)


def build_csv(
    items: Sequence[StoredReading], routes: dict[str, EnergydataRoute], headers: dict[str, str]
) -> CsvFile:
    """The import file for ``items``; ``headers`` maps a series to its column header."""
    ordered = sorted(items, key=lambda r: (r.ts, r.id))
    columns = list(dict.fromkeys(headers[r.series] for r in ordered))
    rows: list[tuple[int, dict[str, StoredReading]]] = []
    open_from = 0  # first row of the current timestamp
    for r in ordered:
        col = headers[r.series]
        if not rows or rows[-1][0] != r.ts:
            open_from = len(rows)
            rows.append((r.ts, {}))
        for _, cells in rows[open_from:]:
            if col not in cells:
                cells[col] = r
                break
        else:
            rows.append((r.ts, {col: r}))
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=SEPARATOR, lineterminator="\r\n")
    writer.writerow(["", *columns])
    out = CsvFile(b"", [r.id for r in ordered])
    for n, (ts, cells) in enumerate(rows, start=2):
        writer.writerow(
            [
                csv_time(ts),
                *(
                    csv_value(cells[c], routes[cells[c].series]) if c in cells else ""
                    for c in columns
                ),
            ]
        )
        out.lines[n] = {c: r.id for c, r in cells.items()}
    out.data = buf.getvalue().encode("utf-8")
    return out


_LINE = re.compile(r"\b(?:line|row)\s+(\d+)", re.IGNORECASE)
_COLUMN = re.compile(r"\bcolumn\s+'([^']*)'", re.IGNORECASE)


def map_errors(errors: Sequence[object], f: CsvFile) -> dict[int, str] | None:
    """Reading id -> the service's error, or None when some error names no known line."""
    out: dict[int, str] = {}
    for err in errors:
        line: int | None = None
        column: str | None = None
        text = str(err)
        if isinstance(err, dict):
            text = str(err.get("message") or err)
            raw_line = err.get("line")
            if raw_line is None and err.get("row") is not None:
                raw_line = int(err["row"]) + 1  # a data row number: the header is line 1
            digits = isinstance(raw_line, int | str) and str(raw_line).isdigit()
            line = int(str(raw_line)) if digits else None
            column = str(err["column"]) if err.get("column") not in (None, "") else None
        else:
            m = _LINE.search(text)
            line = int(m.group(1)) if m else None
            c = _COLUMN.search(text)
            column = c.group(1) if c else None
        cells = f.lines.get(line) if line is not None else None
        if not cells:
            return None
        reason = f"import validation failed: {text}"[: http.MAX_REASON]
        if column is not None and column in cells:
            out.setdefault(cells[column], reason)
        else:
            for rid in cells.values():
                out.setdefault(rid, reason)
    return out


class _Failed(Exception):
    """A step failed; ``failure`` is its classified outcome."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class ImportClient:
    """Runs whole imports against the batch import API (module docstring)."""

    def __init__(self, cfg: EnergydataConfig, token: Secret) -> None:
        assert cfg.backfill is not None
        self.cfg = cfg.backfill
        self.name = cfg.name
        self._token = token
        self._base = self.cfg.url.rstrip("/")
        self._routes = RouteTable(cfg.routes)
        self._wire = WireTable(self._routes, {d.name: d for d in cfg.datasets})
        self._client = http.LazyClient(
            self.cfg.timeout_s, verify=self.cfg.verify_tls, ca_file=self.cfg.ca_file
        )
        self.imports = 0
        self.last_import: dict[str, object] | None = None

    def _http(self) -> httpx.AsyncClient:
        return self._client.get()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def run(self, items: Sequence[StoredReading]) -> SendResult:
        """Import ``items``: delivered on "done", rows refused by validation rejected."""
        remaining = list(items)
        rejected: dict[int, str] = {}
        for _ in range(MAX_ROUNDS):
            series = {r.series for r in remaining}
            f = build_csv(
                remaining,
                {s: self._routes[s] for s in series},
                {s: self._wire.header(s) for s in series},
            )
            try:
                errors = await self._import(f)
            except _Failed as exc:
                return SendResult(rejected=rejected, failure=exc.failure)
            if errors is None:
                return SendResult(delivered=f.ids, rejected=rejected)
            bad = map_errors(errors, f) if errors else None
            if not bad:
                text = "; ".join(str(e) for e in errors[:5]) or "no errors given"
                return SendResult(
                    rejected=rejected,
                    failure=Failure(
                        Outcome.REJECTED, f"import validation failed: {text}"[: http.MAX_REASON]
                    ),
                )
            rejected.update(bad)
            log.warning(
                "energydata_import_rows_refused",
                uplink=self.name,
                readings=len(bad),
                reason=next(iter(bad.values())),
            )
            remaining = [r for r in remaining if r.id not in bad]
            if not remaining:
                return SendResult(rejected=rejected)
        return SendResult(
            rejected=rejected,
            failure=Failure(
                Outcome.TRANSIENT, f"import still failing validation after {MAX_ROUNDS} rounds"
            ),
        )

    async def _import(self, f: CsvFile) -> list[object] | None:
        """One import job. None: done; a list: the validation errors; raises _Failed."""
        name = (
            f"fieldgate-{self.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-"
            f"{uuid.uuid4().hex[:8]}"
        )
        job = await self._call("create", "POST", "/import", params={"importname": name})
        job_id = job.get("id")
        if not isinstance(job_id, int | str) or not str(job_id):
            raise _Failed(Failure(Outcome.TRANSIENT, "import created without an id"))
        self.imports += 1
        log.info(
            "energydata_import_created",
            uplink=self.name,
            import_id=job_id,
            readings=len(f.ids),
            bytes=len(f.data),
        )
        url = (await self._call("upload_url", "GET", f"/import/{job_id}/upload_url")).get(
            "upload_url"
        )
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise _Failed(Failure(Outcome.TRANSIENT, "import upload_url answer has no URL"))
        await self._upload(url, f.data)
        await self._call("validate", "PUT", f"/import/{job_id}/validate")
        state = await self._wait(job_id, VALIDATING, "validation")
        if state.get("status") != "ready":
            errors = state.get("errors")
            await self._delete(job_id)
            return list(errors) if isinstance(errors, list) else []
        await self._call("ingest", "PUT", f"/import/{job_id}/ingest")
        state = await self._wait(job_id, INGESTING, "ingestion")
        if state.get("status") != "done":
            errors = state.get("errors")
            if isinstance(errors, list) and errors and map_errors(errors, f):
                return list(errors)
            raise _Failed(
                Failure(
                    Outcome.TRANSIENT,
                    f"import {job_id} ingestion ended {state.get('status')!r}: {str(errors)[:200]}",
                )
            )
        log.info("energydata_import_done", uplink=self.name, import_id=job_id, readings=len(f.ids))
        return None

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.reveal()}", "Accept": "application/json"}

    async def _call(
        self, step: str, method: str, path: str, params: dict[str, str] | None = None
    ) -> dict[str, Any]:
        try:
            resp = await self._http().request(
                method, f"{self._base}{path}", params=params, headers=self._auth()
            )
        except httpx.HTTPError as exc:
            raise _Failed(_named(step, http.transport_failure(exc))) from None
        if resp.status_code >= 300:
            raise _Failed(_named(step, http.classify(resp), client_error_is_data=False))
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = {}
        self.last_import = body if isinstance(body, dict) and "status" in body else self.last_import
        return body if isinstance(body, dict) else {}

    async def _upload(self, url: str, data: bytes) -> None:
        try:
            # No Authorization header: the presigned URL is its own credential (and may be
            # another host; the API token must not travel there).
            resp = await self._http().put(
                url, content=data, headers={"Content-Type": "application/octet-stream"}
            )
        except httpx.HTTPError as exc:
            raise _Failed(_named("upload", http.transport_failure(exc))) from None
        if resp.status_code >= 300:
            result = http.classify(resp)
            if resp.status_code in (401, 403):  # a stale or refused signature, not our token
                result = SendResult.failed(
                    Outcome.TRANSIENT, http.reason_text(resp), status=resp.status_code
                )
            raise _Failed(_named("upload", result, client_error_is_data=False))

    async def _wait(self, job_id: object, passing: frozenset[str], what: str) -> dict[str, Any]:
        """Poll the import until its status leaves ``passing``; its last state."""
        deadline = time.monotonic() + self.cfg.max_wait_s
        pause = 0.1
        while True:
            state = await self._call(what, "GET", f"/import/{job_id}")
            status = str(state.get("status", "")).lower()
            state["status"] = status
            if status not in passing:
                return state
            if time.monotonic() + pause > deadline:
                raise _Failed(
                    Failure(
                        Outcome.TRANSIENT,
                        f"import {job_id}: {what} not finished within {self.cfg.max_wait_s:g} s",
                    )
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, self.cfg.poll_s)

    async def _delete(self, job_id: object) -> None:
        with contextlib.suppress(httpx.HTTPError):  # tidiness: a failed import harms nothing
            await self._http().delete(f"{self._base}/import/{job_id}", headers=self._auth())


def _named(step: str, result: SendResult, *, client_error_is_data: bool = True) -> Failure:
    f = result.failure
    assert f is not None
    outcome = f.outcome
    if outcome is Outcome.REJECTED and not client_error_is_data:
        # A 400 on a protocol step is not about any reading: keep them all.
        outcome = Outcome.TRANSIENT
    return Failure(outcome, f"import {step}: {f.message}", f.retry_after, f.status, f.unreachable)


@dataclass(slots=True)
class _Entry:
    items: Sequence[StoredReading]
    future: asyncio.Future[SendResult]


class ImportBatcher:
    """One import at a time; readings submitted meanwhile go together in the next one."""

    def __init__(self, cfg: EnergydataConfig, token: Secret) -> None:
        self.client = ImportClient(cfg, token)
        self._lock = asyncio.Lock()
        self._pending: list[_Entry] = []
        self.readings = 0

    def status(self) -> dict[str, object]:
        return {
            "imports": self.client.imports,
            "readings": self.readings,
            "queued": sum(len(e.items) for e in self._pending),
            "last_import": self.client.last_import,
        }

    async def aclose(self) -> None:
        await self.client.aclose()

    async def submit(self, items: Sequence[StoredReading]) -> SendResult:
        """Import ``items`` (possibly with others'); their per-item result."""
        entry = _Entry(items, asyncio.get_running_loop().create_future())
        self._pending.append(entry)
        try:
            async with self._lock:
                if not entry.future.done():
                    batch, self._pending = self._pending, []
                    await self._run(batch)
        finally:
            if entry in self._pending:
                self._pending.remove(entry)
        return entry.future.result()

    async def _run(self, batch: list[_Entry]) -> None:
        items = [i for e in batch for i in e.items]
        try:
            result = await self.client.run(items)
        except BaseException:
            for e in batch:  # cancelled: the others keep their readings (transient)
                e.future.set_result(SendResult.failed(Outcome.TRANSIENT, "import interrupted"))
            raise
        self.readings += len(result.delivered)
        for e in batch:
            ids = {i.id for i in e.items}
            e.future.set_result(
                SendResult(
                    delivered=[i for i in result.delivered if i in ids],
                    rejected={i: r for i, r in result.rejected.items() if i in ids},
                    failure=result.failure,
                )
            )
