"""Datacooee upload API uplink (shared/seeds/003_afc91a89f7855120.txt).

Wire format, one reading per request::

    POST <url>/api/external/v1/inputs/{input_pk}/inputdata/
    Content-Type: application/vnd.api+json
    ORGANIZATION-ID: <organization id>
    ORGANIZATION-API-KEY: <api key>

    {"data": {"type": "SensorData", "id": "null",
              "attributes": {"value": "12.5", "timestamp": "2020-10-13T14:02:39.489Z",
                             "latitude": "40.73061", "longitude": "-73.935242"},
              "relationships": {"sensor": {"data": {"type": "Sensor", "id": "<input_pk>"}}}}}

Keys go in the document's order ("keep formatting in this order"); ``latitude``/``longitude``
only when the reading has a position. ``201 Created`` is delivered.

Choices where the document is silent or loose, written down:

* **Headers**: the hyphenated ``ORGANIZATION-ID`` of the header block and every example (the
  prose's ``ORGANIZATION_ID`` is a variable name; proxies drop underscore headers). We also send
  ``Accept: application/vnd.api+json`` as the document's non-curl examples do.
* **id**: the literal string ``"null"``, exactly as the document's template and examples.
* **Body**: compact JSON, pure ASCII (non-ASCII text as ``\\uXXXX``), no charset parameter
  (JSON:API forbids media type parameters on ``application/vnd.api+json``).
* **Credentials**: the API key is a secret reference; the organisation id is an identifier kept
  in plain config (it names the account, it does not grant access). Neither is ever logged.
* **Values** are strings (the definitions table): integers in decimal (``"42"``); floats as the
  shortest text that reads back as the same float, in positional notation (``"12.5"``,
  ``"0.0000001"``, never ``1e-07``), ``-0.0`` as ``"0.0"``; booleans ``"1"``/``"0"`` by default
  so a numeric input can chart them (a route may choose ``booleans = "text"``:
  ``"true"``/``"false"``); text as is. Empty text and non-finite floats are refused locally
  (dead-lettered without spending quota): the service requires a value.
* **Timestamps** are UTC with exactly three fractional digits and ``Z``
  (``2020-10-13T14:02:39.489Z``), as the example.
* **Positions**: latitude/longitude as strings (the definitions table says String) with at most
  seven decimals (about 1 cm), trailing zeros trimmed. Altitude has no field and is not sent.
  A position outside WGS84 ranges is left out rather than losing the reading's value.
* **Rate**: the document states no limit. Defaults are conservative: 60 requests per minute,
  2 in flight, ``batch_max_items`` fixed at 1 (the API takes one value per request).
* **Answers**: any 2xx is delivered (the service stored it; re-sending would duplicate); the
  201 body is not read (the document's table says "Empty", its example shows the resource).
  400/422 is a rejection of that reading with the service's JSON:API ``errors[].detail`` as
  reason. 404 *with a JSON:API errors body* means the service does not know the input id: a
  mapping error for that series, rejected with a reason naming the input (replay the dead letters
  once the route is fixed); a 404 without one (a proxy, a wrong base URL) keeps the data and
  retries, so a typo in ``url`` never dead-letters everything. 401/403 auth; 413 too large;
  408/429/5xx transient honouring Retry-After; anything else transient.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

import httpx
import structlog

from gateway.configbase import Secret
from gateway.models import Position, StoredReading, Value
from gateway.uplinks import http
from gateway.uplinks.base import SendResult
from gateway.uplinks.datacooee.config import (
    DatacooeeConfig,
    DatacooeeRoute,
)

log = structlog.get_logger(__name__)

MEDIA_TYPE = "application/vnd.api+json"
#: Bytes of a document around its value and ids (measured on a positioned reading, rounded up).
_BODY_OVERHEAD = 240
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# -- body building (pure) ------------------------------------------------------------------------


def iso_ms(ts_ms: int) -> str:
    """``2020-10-13T14:02:39.489Z``: UTC, always three fractional digits."""
    # isoformat, not strftime: %Y does not pad years before 1000 on glibc.
    dt = _EPOCH + timedelta(milliseconds=ts_ms)
    return dt.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def float_text(x: float) -> str:
    """The shortest decimal that reads back as ``x``, positional (no exponent). Finite only."""
    if not math.isfinite(x):
        raise ValueError(f"{x!r} is not a finite number")
    if x == 0:
        return "0.0"  # also for -0.0: a signed zero means nothing to a chart
    text = format(Decimal(repr(x)), "f")
    return text if "." in text else f"{text}.0"


def value_text(value: Value, booleans: Literal["number", "text"] = "number") -> str:
    """A reading's value in the string form the service takes (see module docstring)."""
    if isinstance(value, bool):  # before int: bool is an int
        if booleans == "text":
            return "true" if value else "false"
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return float_text(value)
    return value


def coord_text(x: float) -> str:
    """A latitude or longitude: at most seven decimals, trailing zeros trimmed."""
    text = f"{x:.7f}".rstrip("0")
    text = text + "0" if text.endswith(".") else text
    return "0.0" if text == "-0.0" else text


def usable_position(pos: Position | None) -> bool:
    return (
        pos is not None
        and math.isfinite(pos.lat)
        and math.isfinite(pos.lon)
        and -90 <= pos.lat <= 90
        and -180 <= pos.lon <= 180
    )


def document(item: StoredReading, route: DatacooeeRoute) -> dict[str, Any]:
    """The JSON:API document for one reading, keys in the documented order."""
    attributes = {"value": value_text(item.value, route.booleans), "timestamp": iso_ms(item.ts)}
    if item.position is not None and usable_position(item.position):
        attributes["latitude"] = coord_text(item.position.lat)
        attributes["longitude"] = coord_text(item.position.lon)
    return {
        "data": {
            "type": "SensorData",
            "id": "null",
            "attributes": attributes,
            "relationships": {"sensor": {"data": {"type": "Sensor", "id": route.input_pk}}},
        }
    }


def encode(doc: Mapping[str, Any]) -> bytes:
    """Compact JSON, pure ASCII (non-ASCII text as ``\\uXXXX`` escapes, which every JSON parser
    reads whatever charset it assumes for a body sent without one)."""
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def error_details(response: httpx.Response) -> list[str] | None:
    """``detail`` (with its pointer's last segment) of each JSON:API error in the body, or None
    when the body is not a JSON:API error document."""
    try:
        body = response.json()
    except ValueError:
        return None
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors:
        return None
    out: list[str] = []
    for err in errors:
        if not isinstance(err, dict):
            continue
        detail = str(err.get("detail") or err.get("title") or err.get("code") or "error")
        source = err.get("source")
        pointer = source.get("pointer") if isinstance(source, dict) else None
        field = str(pointer).rstrip("/").rsplit("/", 1)[-1] if pointer else ""
        out.append(f"{field}: {detail}" if field and field != "data" else detail)
    return out or None


# -- the plugin ----------------------------------------------------------------------------------


class DatacooeeUplink(http.HttpPlugin[DatacooeeRoute]):
    """The Datacooee plugin: one JSON:API request per reading (see module docstring)."""

    def __init__(self, cfg: DatacooeeConfig, api_key: Secret) -> None:
        super().__init__(cfg, cfg.routes)
        self.cfg = cfg
        self._api_key = api_key
        self._unknown_inputs: set[str] = set()  # warned about once each

    # -- the plugin contract ---------------------------------------------------------------------

    def check(self, item: StoredReading) -> str | None:
        v = item.value
        if isinstance(v, str) and not v.strip():
            return "Datacooee requires a value: the reading's text is empty"
        if isinstance(v, float) and not math.isfinite(v):
            return f"value {v!r} is not a finite number"
        return None

    def group_key(self, item: StoredReading) -> Hashable:
        return None

    def item_size(self, item: StoredReading) -> int:
        v = item.value
        return (
            _BODY_OVERHEAD
            + 2 * len(self._routes[item.series].input_pk)
            + (len(v.encode()) if isinstance(v, str) else 24)
        )

    def body(self, item: StoredReading) -> bytes:
        return encode(document(item, self._routes[item.series]))

    async def send(self, batch: Sequence[StoredReading]) -> SendResult:
        """Post each reading (the config keeps batches at one); stops at the first reading that
        is neither delivered nor rejected, leaving it and the rest to the dispatcher."""
        delivered: list[int] = []
        rejected: dict[int, str] = {}
        for item in batch:
            result = await self._send_one(item)
            delivered.extend(result.delivered)
            rejected.update(result.rejected)
            if result.failure is not None:
                return SendResult(delivered, rejected, result.failure)
        return SendResult(delivered, rejected)

    async def _send_one(self, item: StoredReading) -> SendResult:
        route = self._routes[item.series]
        headers = {
            "Content-Type": MEDIA_TYPE,
            "Accept": MEDIA_TYPE,
            "ORGANIZATION-ID": self.cfg.organization_id,
            "ORGANIZATION-API-KEY": self._api_key.reveal(),
        }
        try:
            resp = await self._http().post(
                self.cfg.endpoint(route.input_pk), content=self.body(item), headers=headers
            )
        except httpx.HTTPError as exc:
            return http.transport_failure(exc)
        if 200 <= resp.status_code < 300:
            return SendResult(delivered=[item.id])
        return self._classify(item, route, resp)

    def _classify(
        self, item: StoredReading, route: DatacooeeRoute, resp: httpx.Response
    ) -> SendResult:
        code = resp.status_code
        details = error_details(resp)
        if code == 404 and details is not None:
            if route.input_pk not in self._unknown_inputs:
                self._unknown_inputs.add(route.input_pk)
                log.warning(
                    "datacooee_unknown_input",
                    uplink=self.name,
                    series=item.series,
                    input_pk=route.input_pk,
                    detail="; ".join(details)[:200],
                )
            reason = (
                f"Datacooee does not know input {route.input_pk!r} (series "
                f"{item.series!r}); fix the route and replay: HTTP 404: {'; '.join(details)}"
            )
            return SendResult(rejected={item.id: reason[: http.MAX_REASON]})
        if code in (400, 422):
            text = "; ".join(details) if details else http.reason_text(resp)
            reason = f"refused by Datacooee for input {route.input_pk!r}: {text}"
            return SendResult(rejected={item.id: reason[: http.MAX_REASON]})
        failure = http.classify(resp).failure
        assert failure is not None  # classify always describes a failure
        message = f"HTTP {code}: {'; '.join(details)}"[: http.MAX_REASON] if details else None
        return SendResult.failed(
            failure.outcome,
            message or failure.message,
            retry_after=failure.retry_after,
            status=code,
        )
