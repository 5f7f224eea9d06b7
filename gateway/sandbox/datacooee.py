"""Datacooee upload API emulator (shared/seeds/003_afc91a89f7855120.txt), for tests and the demo.

Route: ``POST /api/external/v1/inputs/{input_pk}/inputdata/`` with the headers
``ORGANIZATION-ID`` and ``ORGANIZATION-API-KEY``, ``Content-Type: application/vnd.api+json`` and
a JSON:API document ``{"data": {"type": "SensorData", "id": "null", "attributes": {"value",
"timestamp", "latitude"?, "longitude"?}, "relationships": {"sensor": {"data": {"type":
"Sensor", "id": input_pk}}}}}``. 201 answers the document's response body: the stored resource
with a service id and the timestamp echoed with microseconds (``...39.489000Z``); the document's
response table says "Empty" but its example shows this body, so we send the example's.

Checks, in order (each answers a JSON:API error document, ``{"errors": [{"status", "code",
"title", "detail", "source": {"pointer"}?}]}``, as ``application/vnd.api+json``):

1. ``Accept`` (when sent) must admit ``application/vnd.api+json``: else 406;
2. both organisation headers present (else 401), matching the organisation and its key (else
   401); a key in ``forbidden_keys`` is known but may not upload: 403;
3. the optional rate limit (``rate_limit`` per ``rate_period_s``, per organisation): 429 with
   ``Retry-After`` in whole seconds;
4. a known input id (``inputs``; None accepts any id): else 404;
5. ``Content-Type: application/vnd.api+json`` with no media type parameters other than JSON:API
   1.1's ``ext``/``profile``: else 415;
6. body at most ``max_body_bytes`` (413), strict UTF-8 JSON (400);
7. the document: ``data.type`` ``SensorData`` and the sensor relationship's type ``Sensor``
   (409, as JSON:API says for a type the endpoint does not hold); ``data.id`` absent, null or
   the document's ``"null"`` (403, JSON:API's answer to a client-generated id); then every
   field problem at once as 400: value required, a non-blank JSON string (and a number's text
   for inputs of kind ``"number"``); timestamp required, an ISO 8601 string with a time zone;
   latitude/longitude optional, together, strings holding numbers within WGS84 ranges; no other
   attribute; the sensor relationship present, naming the input of the URL.

Decisions where the document is silent: the error format is JSON:API's (the API speaks
``application/vnd.api+json``) with Django REST framework's messages; 401 vs 403 as above; the
limits and the strictness on unknown attributes and on string-typed coordinates (the
definitions table says String) are ours, stricter than a lenient service, so that a client
sending anything the document does not define is caught here.

Records for tests: ``accepted`` (:class:`InputData`, in order of arrival, with the raw body),
``in_flight``/``max_in_flight`` (requests inside the upload handler now / at most so far), and
:meth:`hold`/:meth:`release` to keep uploads waiting inside the handler (counted as in flight).

Standalone: ``python -m gateway.sandbox.datacooee --port 8704 --input sen1 --input sen2:number``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Literal

import structlog
from aiohttp import web

from gateway.sandbox.emulator import (
    Clock,
    Emulator,
    Reject,
    SlidingWindowLimiter,
    parse_json,
    read_body,
)

log = structlog.get_logger(__name__)

MEDIA_TYPE = "application/vnd.api+json"
UPLOAD_PATH = "/api/external/v1/inputs/{input_pk}/inputdata/"
#: "any": every non-blank text; "number": the text of a finite number.
InputKind = Literal["any", "number"]

_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})$")
_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_TIMESTAMP_FORMAT = (
    "Datetime has wrong format. Use one of these formats instead: "
    "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."
)
_ATTRIBUTES = ("value", "timestamp", "latitude", "longitude")
_CODES = {
    400: "invalid",
    401: "not_authenticated",
    403: "permission_denied",
    404: "not_found",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "throttled",
}


@dataclass(frozen=True, slots=True)
class InputData:
    """One accepted upload as received (strings exactly as sent; coordinates None if absent)."""

    id: str
    input_pk: str
    value: str
    timestamp: str
    latitude: str | None
    longitude: str | None
    raw: bytes


@dataclass(frozen=True, slots=True)
class ApiError:
    """One JSON:API error object."""

    detail: str
    pointer: str | None = None
    code: str = "invalid"


class DocumentError(Exception):
    """Answer with ``status`` and these JSON:API errors (several field problems at once)."""

    def __init__(self, status: int, errors: list[ApiError]) -> None:
        super().__init__("; ".join(e.detail for e in errors))
        self.status = status
        self.errors = errors


def _error_object(status: int, err: ApiError) -> dict[str, Any]:
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    obj: dict[str, Any] = {
        "status": str(status),
        "code": err.code,
        "title": title,
        "detail": err.detail,
    }
    if err.pointer is not None:
        obj["source"] = {"pointer": err.pointer}
    return obj


def _media_params(header: str) -> list[str]:
    """Names of the media type parameters in one media range (lowercase)."""
    return [p.split("=", 1)[0].strip().lower() for p in header.split(";")[1:] if p.strip()]


def acceptable(accept: str | None) -> bool:
    """Whether an ``Accept`` header admits the JSON:API media type (absent: anything goes)."""
    if not accept or not accept.strip():
        return True
    for media_range in accept.split(","):
        media = media_range.split(";", 1)[0].strip().lower()
        params = set(_media_params(media_range)) - {"q"}
        if media in ("*/*", "application/*"):
            return True
        if media == MEDIA_TYPE and params <= {"ext", "profile"}:
            return True
    return False


def _text_number(raw: object, pointer: str, lo: float, hi: float, errors: list[ApiError]) -> None:
    if not isinstance(raw, str):
        errors.append(ApiError("Not a valid string.", pointer))
        return
    if not _NUMBER.match(raw.strip()) or not math.isfinite(float(raw)):
        errors.append(ApiError("A valid number is required.", pointer))
        return
    if not lo <= float(raw) <= hi:
        errors.append(ApiError(f"Ensure this value is between {lo:g} and {hi:g}.", pointer))


def validate(doc: object, input_pk: str, kind: InputKind) -> dict[str, Any]:
    """The document's attributes when it is a valid upload for ``input_pk``; else
    :class:`DocumentError` (409/403 for the first conflict, else 400 with every field problem)."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise DocumentError(
            400,
            [ApiError("Received document does not contain primary data", "/data", "parse_error")],
        )
    linkage = _sensor_linkage(data)
    _check_conflicts(data, linkage)
    errors: list[ApiError] = []
    if data.get("type") is None:
        errors.append(ApiError("This field is required.", "/data/type", "required"))
    attrs = data.get("attributes")
    if not isinstance(attrs, dict):
        errors.append(ApiError("This field is required.", "/data/attributes", "required"))
        attrs = {}
    errors.extend(
        ApiError(
            "Unknown attribute; the document defines value, timestamp, latitude and longitude.",
            f"/data/attributes/{name}",
            "unknown",
        )
        for name in attrs
        if name not in _ATTRIBUTES
    )
    _check_value(attrs.get("value"), kind, errors)
    _check_timestamp(attrs.get("timestamp"), errors)
    _check_position(attrs.get("latitude"), attrs.get("longitude"), errors)
    if not isinstance(linkage, dict):
        errors.append(ApiError("This field is required.", "/data/relationships/sensor", "required"))
    elif linkage.get("id") != input_pk:
        errors.append(
            ApiError(
                f"The sensor does not match the input of the URL ({input_pk}).",
                "/data/relationships/sensor",
            )
        )
    if errors:
        raise DocumentError(400, errors)
    return attrs


def _sensor_linkage(data: dict[str, Any]) -> object:
    rel = data.get("relationships")
    sensor = rel.get("sensor") if isinstance(rel, dict) else None
    return sensor.get("data") if isinstance(sensor, dict) else None


def _check_conflicts(data: dict[str, Any], linkage: object) -> None:
    """JSON:API's own answers: 409 for a type the endpoint does not hold, 403 for a client id."""
    rtype = data.get("type")
    if rtype is not None and rtype != "SensorData":
        raise DocumentError(
            409,
            [
                ApiError(
                    f"The resource object's type ({rtype}) is not the type that constitute the "
                    "collection represented by the endpoint (SensorData).",
                    "/data/type",
                    "conflict",
                )
            ],
        )
    if isinstance(linkage, dict) and linkage.get("type") != "Sensor":
        raise DocumentError(
            409,
            [
                ApiError(
                    f"Incorrect relation type. Expected Sensor, received {linkage.get('type')}.",
                    "/data/relationships/sensor",
                    "incorrect_type",
                )
            ],
        )
    if data.get("id") not in (None, "null"):
        raise DocumentError(
            403,
            [ApiError("Client-generated ids are not supported.", "/data/id", "permission_denied")],
        )


def _check_value(value: object, kind: InputKind, errors: list[ApiError]) -> None:
    pointer = "/data/attributes/value"
    if value is None:
        errors.append(ApiError("This field is required.", pointer, "required"))
    elif not isinstance(value, str):
        errors.append(ApiError("Not a valid string.", pointer))
    elif not value.strip():
        errors.append(ApiError("This field may not be blank.", pointer, "blank"))
    elif kind == "number":
        _text_number(value, pointer, -math.inf, math.inf, errors)


def _check_timestamp(stamp: object, errors: list[ApiError]) -> None:
    pointer = "/data/attributes/timestamp"
    if stamp is None:
        errors.append(ApiError("This field is required.", pointer, "required"))
    elif not isinstance(stamp, str) or parse_timestamp(stamp) is None:
        errors.append(ApiError(_TIMESTAMP_FORMAT, pointer))


def _check_position(lat: object, lon: object, errors: list[ApiError]) -> None:
    if (lat is None) != (lon is None):
        missing = "longitude" if lon is None else "latitude"
        errors.append(
            ApiError(
                "latitude and longitude go together.", f"/data/attributes/{missing}", "required"
            )
        )
    if lat is not None:
        _text_number(lat, "/data/attributes/latitude", -90, 90, errors)
    if lon is not None:
        _text_number(lon, "/data/attributes/longitude", -180, 180, errors)


def parse_timestamp(text: str) -> datetime | None:
    """An ISO 8601 time with a zone, as the service reads it; None when it does not."""
    if not _TIMESTAMP.match(text):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:  # month 13 and friends
        return None


class DatacooeeEmulator(Emulator):
    """The Datacooee upload API on 127.0.0.1; see the module docstring for the contract."""

    name = "datacooee"

    def __init__(
        self,
        organization_id: str = "demo-org",
        api_key: str = "demo-key",
        *,
        inputs: Mapping[str, InputKind] | Iterable[str] | None = None,
        forbidden_keys: Iterable[str] = (),
        rate_limit: int | None = None,
        rate_period_s: float = 60.0,
        max_body_bytes: int = 2_621_440,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        """``inputs``: the organisation's input ids (a mapping gives each its kind; default
        ``"any"``); None accepts every id. ``clock`` drives the rate-limit window only.
        ``max_body_bytes`` defaults to Django's upload limit (2.5 MiB)."""
        super().__init__(host=host, port=port, clock=clock)
        self.organization_id = organization_id
        self.api_key = api_key
        self.forbidden_keys = set(forbidden_keys)
        self.inputs: dict[str, InputKind] | None
        if inputs is None:
            self.inputs = None
        elif isinstance(inputs, Mapping):
            self.inputs = dict(inputs)
        else:
            self.inputs = dict.fromkeys(inputs, "any")
        self.limiter = (
            SlidingWindowLimiter(rate_limit, rate_period_s, clock) if rate_limit else None
        )
        self.max_body_bytes = max_body_bytes
        self.accepted: list[InputData] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._gate = asyncio.Event()
        self._gate.set()
        self._next_id = 1

    def setup_routes(self, app: web.Application) -> None:
        app.router.add_post(UPLOAD_PATH, self._upload)

    def client_max_size(self) -> int:
        return self.max_body_bytes

    def error_body(self, status: int, message: str) -> object:
        return {
            "errors": [_error_object(status, ApiError(message, None, _CODES.get(status, "error")))]
        }

    def error_response(
        self, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.json_response(
            self.error_body(status, message),
            status=status,
            headers=dict(headers or {}),
            content_type=MEDIA_TYPE,
        )

    # -- test controls -----------------------------------------------------------------------

    def add_input(self, input_pk: str, kind: InputKind = "any") -> None:
        if self.inputs is None:
            self.inputs = {}
        self.inputs[input_pk] = kind

    def remove_input(self, input_pk: str) -> None:
        """Forget an input: its next upload gets 404 (an input deleted in the web UI)."""
        if self.inputs is not None:
            self.inputs.pop(input_pk, None)

    def hold(self) -> None:
        """Keep every upload waiting inside the handler (and in ``in_flight``) until release."""
        self._gate.clear()

    async def release(self) -> None:
        """Let held uploads (and every later one) through."""
        self._gate.set()
        await self.changed()

    async def aclose(self) -> None:
        self._gate.set()  # held handlers finish instead of waiting for the shutdown timeout
        await super().aclose()

    # -- the upload --------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.changed()
            await self._gate.wait()
            return await self._handle(request)
        except DocumentError as exc:
            body = {"errors": [_error_object(exc.status, e) for e in exc.errors]}
            return web.json_response(body, status=exc.status, content_type=MEDIA_TYPE)
        finally:
            self.in_flight -= 1

    def _authenticate(self, request: web.Request) -> str:
        org = request.headers.get("ORGANIZATION-ID", "").strip()
        key = request.headers.get("ORGANIZATION-API-KEY", "").strip()
        if not org or not key:
            raise Reject(401, "Authentication credentials were not provided.")
        if org != self.organization_id or key not in {self.api_key, *self.forbidden_keys}:
            raise Reject(401, "Incorrect authentication credentials.")
        if key in self.forbidden_keys:
            raise Reject(403, "You do not have permission to perform this action.")
        return org

    def _throttle(self, org: str) -> None:
        if self.limiter is None:
            return
        wait = self.limiter.acquire(org)
        if wait is not None:
            seconds = max(1, math.ceil(wait))
            raise Reject(
                429,
                f"Request was throttled. Expected available in {seconds} seconds.",
                {"Retry-After": str(seconds)},
            )

    def _input_kind(self, input_pk: str) -> InputKind:
        if self.inputs is None:
            return "any"
        kind = self.inputs.get(input_pk)
        if kind is None:
            raise Reject(404, "Not found.")
        return kind

    @staticmethod
    def _check_content_type(request: web.Request) -> None:
        header = request.headers.get("Content-Type", "")
        media = header.split(";", 1)[0].strip().lower()
        if media != MEDIA_TYPE:
            raise Reject(415, f'Unsupported media type "{media or "(none)"}" in request.')
        extra = set(_media_params(header)) - {"ext", "profile"}
        if extra:
            raise Reject(415, f"Media type parameters are not allowed: {', '.join(sorted(extra))}.")

    async def _handle(self, request: web.Request) -> web.Response:
        if not acceptable(request.headers.get("Accept")):
            raise Reject(406, f"Could not satisfy the request Accept header ({MEDIA_TYPE}).")
        org = self._authenticate(request)
        self._throttle(org)
        input_pk = request.match_info["input_pk"]
        kind = self._input_kind(input_pk)
        self._check_content_type(request)
        raw = await read_body(request, self.max_body_bytes)
        attrs = validate(parse_json(raw), input_pk, kind)
        record = InputData(
            id=str(self._next_id),
            input_pk=input_pk,
            value=attrs["value"],
            timestamp=attrs["timestamp"],
            latitude=attrs.get("latitude"),
            longitude=attrs.get("longitude"),
            raw=raw,
        )
        self._next_id += 1
        self.accepted.append(record)
        log.debug("datacooee_input_data", input_pk=input_pk, id=record.id)
        return web.json_response(self._resource(record), status=201, content_type=MEDIA_TYPE)

    @staticmethod
    def _resource(rec: InputData) -> dict[str, Any]:
        when = parse_timestamp(rec.timestamp)
        assert when is not None  # validated
        attributes: dict[str, Any] = {
            "timestamp": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "value": rec.value,
        }
        if rec.latitude is not None:
            attributes["latitude"] = rec.latitude
            attributes["longitude"] = rec.longitude
        return {
            "data": {
                "type": "SensorData",
                "id": rec.id,
                "attributes": attributes,
                "relationships": {"sensor": {"data": {"type": "Sensor", "id": rec.input_pk}}},
            }
        }


async def _serve(emu: DatacooeeEmulator) -> None:
    async with emu:
        # A plain line for scripts to read the chosen port from.
        print(
            f"datacooee emulator listening on {emu.url} (POST {emu.url}{UPLOAD_PATH})", flush=True
        )
        await asyncio.Event().wait()  # until Ctrl-C cancels us


def main(argv: list[str] | None = None) -> None:
    """Run the emulator until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m gateway.sandbox.datacooee")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8704)
    parser.add_argument("--organization-id", default="demo-org")
    parser.add_argument("--api-key", default="demo-key")
    parser.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="ID[:number]",
        help="a known input id (repeat); none given: every id is known",
    )
    parser.add_argument("--rate-limit", type=int, default=0, help="requests per period (0: off)")
    parser.add_argument("--rate-period", type=float, default=60.0, help="seconds")
    args = parser.parse_args(argv)
    inputs: dict[str, InputKind] | None = None
    if args.input:
        inputs = {}
        for spec in args.input:
            pk, _, kind = spec.partition(":")
            inputs[pk] = "number" if kind == "number" else "any"
    emu = DatacooeeEmulator(
        args.organization_id,
        args.api_key,
        inputs=inputs,
        rate_limit=args.rate_limit or None,
        rate_period_s=args.rate_period,
        host=args.host,
        port=args.port,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(emu))


if __name__ == "__main__":
    main()
