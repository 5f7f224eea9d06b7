"""Qatium Ingest API uplink (shared/seeds/000_1293a7a20405583b.txt).

Wire format: ``POST <url>`` with ``Authorization: Bearer <token>`` and a JSON array of
``{"time", "asset", "value", "metric", "unit"}`` rows; ``time`` ISO 8601 UTC, ``value`` a JSON
number. Job status at ``GET <jobs>/{job_id}`` and quarantine details at
``GET <jobs>/{job_id}/details``, where ``<jobs>`` is the ingest URL with its last ``/ingest``
segment replaced by ``/jobs`` (same host, as the service's docs put them) unless ``jobs_url``
is configured.

Choices where the document is silent or loose, written down:

* **Units** are validated at config time against the document's validation table (pressure,
  flow, level, status). ``setting`` and ``demand`` appear in the asset table but not in the
  validation table: ``demand`` takes the flow units, ``setting`` any unit of the hydraulic
  engine's list. ``status`` has no unit: the route leaves ``unit`` out and the row carries ``""``.
* **Values**: numbers only. Booleans go as 0/1; strings, NaN and infinities are dead-lettered
  locally with the reason (the service takes no null values); ``status`` must be 0 or 1.
* **Rate**: 20 requests per minute (sliding window, persisted across restarts), large batches
  (20,000 rows, at most 8 MiB of JSON, far below the 50 MB guidance and kind to a Pi's RAM).
* **Quarantine**: the answer's ``status`` percentages are read. Rows still ``pending`` are
  polled on the job status API a few times; if still pending they are taken as delivered (the
  service has them; re-sending would duplicate). When rows are quarantined, the job details'
  ``errors`` (``value 'x' on column 'c' ...``) are matched to the rows sent; if that names exactly
  the quarantined rows, those are dead-lettered with the service's text and the rest delivered.
  Otherwise the dispatcher bisects the batch to isolate them, which re-sends rows the service
  already appended (Qatium appends readings per asset and time; a re-sent identical row is a
  duplicate point, which we accept over losing one).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Hashable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from gateway.configbase import Secret
from gateway.models import StoredReading
from gateway.uplinks import http
from gateway.uplinks.base import Outcome, SendResult
from gateway.uplinks.qatium.config import (
    QatiumConfig,
    QatiumRoute,
)

log = structlog.get_logger(__name__)


def iso_time(ts_ms: int) -> str:
    """``2021-11-03T15:00:00Z``, with milliseconds only when there are some."""
    dt = datetime.fromtimestamp(ts_ms / 1000, UTC)
    if ts_ms % 1000:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


_ERROR = re.compile(r"'(?P<val>.*?)' on column '(?P<col>\w+)'")


class QatiumUplink(http.HttpPlugin[QatiumRoute]):
    """The Qatium plugin: rows out, per-row outcome back (see module docstring)."""

    def __init__(self, cfg: QatiumConfig, token: Secret) -> None:
        super().__init__(cfg, cfg.routes)
        self.cfg = cfg
        self._token = token
        self._jobs = cfg.resolved_jobs_url()

    # -- the plugin contract ---------------------------------------------------------------------

    def check(self, item: StoredReading) -> str | None:
        v = item.value
        if isinstance(v, str):
            return f"Qatium takes numbers only, got text {v[:40]!r}"
        if v is None:
            return "missing value (Qatium takes no null values)"
        if isinstance(v, float) and not math.isfinite(v):
            return f"value {v!r} is not a finite number"
        if self._routes[item.series].metric == "status" and v not in (0, 1):
            return f"status value must be 0 or 1, got {v!r}"
        return None

    def group_key(self, item: StoredReading) -> Hashable:
        return None

    def item_size(self, item: StoredReading) -> int:
        r = self._routes[item.series]
        return 80 + len(r.asset) + len(r.metric) + len(r.unit)

    def row(self, item: StoredReading) -> dict[str, Any]:
        r = self._routes[item.series]
        v = item.value
        value = int(v) if isinstance(v, bool) else v
        return {
            "time": iso_time(item.ts),
            "asset": r.asset,
            "value": value,
            "metric": r.metric,
            "unit": r.unit,
        }

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token.reveal()}"}

    async def send(self, batch: Sequence[StoredReading]) -> SendResult:
        rows = [self.row(i) for i in batch]
        body = json.dumps(rows, separators=(",", ":")).encode()
        try:
            resp = await self._http().post(
                self.cfg.url,
                content=body,
                headers={**self._headers(), "Content-Type": "application/json; charset=utf-8"},
            )
        except httpx.HTTPError as exc:
            return http.transport_failure(exc)
        if resp.status_code not in (200, 201):
            return http.classify(resp)
        try:
            answer = resp.json()
            job_id = str(answer.get("job_id") or "")
            status = answer.get("status") or {}
            quarantined = float(status.get("quarantined") or 0)
            pending = float(status.get("pending") or 0)
        except (ValueError, AttributeError, TypeError):
            log.warning("qatium_unexpected_answer", uplink=self.name, body=resp.text[:200])
            # 200 means the service took the rows; an answer we cannot read does not undo that.
            return SendResult.all_delivered(batch)
        if pending > 0 and job_id:
            quarantined = await self._wait_for_job(job_id, quarantined)
        if quarantined <= 0:
            return SendResult.all_delivered(batch)
        return await self._quarantine(batch, rows, job_id, quarantined)

    async def _wait_for_job(self, job_id: str, quarantined: float) -> float:
        """Poll the job status API while rows are pending; returns the quarantined share."""
        for _ in range(self.cfg.job_poll_max):
            await asyncio.sleep(self.cfg.job_poll_s)
            try:
                resp = await self._http().get(f"{self._jobs}/{job_id}", headers=self._headers())
            except httpx.HTTPError:
                continue
            if resp.status_code != 200:
                continue
            try:
                state = str(resp.json().get("status", "")).lower()
            except (ValueError, AttributeError):
                continue
            if state == "ok":
                return 0.0
            if state in ("warning", "invalid"):
                return max(quarantined, 1.0)
        log.warning("qatium_job_unresolved", uplink=self.name, job_id=job_id)
        return quarantined

    async def _quarantine(
        self, batch: Sequence[StoredReading], rows: list[dict[str, Any]], job_id: str, pct: float
    ) -> SendResult:
        errors = await self._job_errors(job_id)
        reason = "quarantined by Qatium: " + ("; ".join(errors) if errors else f"{pct:g}% of rows")
        reason = reason[: http.MAX_REASON]
        if len(batch) == 1:
            return SendResult(rejected={batch[0].id: reason})
        expected = round(pct * len(batch) / 100)
        bad = _match_errors(errors, rows)
        if bad is not None and len(bad) == expected and expected > 0:
            rejected = {
                batch[i].id: f"quarantined by Qatium: {msg}"[: http.MAX_REASON]
                for i, msg in bad.items()
            }
            delivered = [it.id for i, it in enumerate(batch) if i not in bad]
            return SendResult(delivered=delivered, rejected=rejected)
        # The service did not say which rows: let the dispatcher bisect.
        return SendResult.failed(Outcome.REJECTED, reason)

    async def _job_errors(self, job_id: str) -> list[str]:
        if not job_id:
            return []
        try:
            resp = await self._http().get(f"{self._jobs}/{job_id}/details", headers=self._headers())
            data = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return []
        if isinstance(data, list):
            data = data[0] if data else {}
        errs = data.get("errors") if isinstance(data, dict) else None
        return [str(e) for e in errs] if isinstance(errs, list) else []


def _match_errors(errors: list[str], rows: list[dict[str, Any]]) -> dict[int, str] | None:
    """Row index -> error, when every error names a value found in some rows; else None."""
    out: dict[int, str] = {}
    for err in errors:
        m = _ERROR.search(err)
        if m is None or m.group("col") not in ("time", "asset", "value", "metric", "unit"):
            return None
        col, val = m.group("col"), m.group("val")
        hits = [i for i, row in enumerate(rows) if _as_text(row[col]) == val]
        if not hits:
            return None
        for i in hits:
            out.setdefault(i, err)
    return out


def _as_text(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return json.dumps(v)
    return v if isinstance(v, str) else json.dumps(v)
