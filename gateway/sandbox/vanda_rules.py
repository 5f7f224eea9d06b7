"""What the Vanda emulator checks in a request: pure functions, no server, no state.

Whole-request problems raise a 400 :class:`~gateway.sandbox.emulator.Reject` (the document: "4xx
errors relate to the provided information"); per-item problems become an :class:`ItemError`
with the ``errorCode``/``errorMessage`` a ``failed`` entry carries. Codes are the emulator's
own :class:`gateway.sandbox.vanda_tables.ErrorCode` (the document names the fields, not the
codes). The tables, rounding and time formats are the emulator's transcription of the document
(:mod:`gateway.sandbox.vanda_tables`); nothing is imported from the uplink.
The IdP's helpers at the end read HTTP Basic client credentials and build RFC 6749 errors.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_plus

from aiohttp import web

from gateway.sandbox.emulator import Reject
from gateway.sandbox.vanda_tables import (
    MAX_MEASUREMENTS_PER_REQUEST,
    ErrorCode,
    ExaminationType,
    bound_problem,
    read_time,
    stored_result,
)

Kind = Literal["create", "update"]

_HEAD_KEYS: Mapping[Kind, frozenset[str]] = {
    "create": frozenset(
        {
            "station",
            "measurementPointNumber",
            "examinationTypeSc",
            "loggerId",
            "parameterSc",
            "unitSc",
            "transactionBased",
            "measurements",
        }
    ),
    "update": frozenset(
        {"station", "measurementPointNumber", "examinationTypeSc", "transactionBased", "results"}
    ),
}
_ITEM_KEYS: Mapping[Kind, frozenset[str]] = {
    "create": frozenset({"formulaId", "measurementDateTime", "result", "reasonCodeSc"}),
    "update": frozenset({"measurementDateTime", "result", "reasonCodeSc"}),
}
LIST_KEY: Mapping[Kind, str] = {"create": "measurements", "update": "results"}


@dataclass(frozen=True, slots=True)
class Head:
    """The body's fields outside the item list."""

    station_id: str | None
    operator_station_id: str | None
    measurement_point_number: int
    exam: ExaminationType
    logger_id: str | None
    transactional: bool


@dataclass(frozen=True, slots=True)
class Item:
    """One valid item: its minute (epoch ms), rounded result, reason code, text as sent."""

    minute: int
    result: float
    reason_code_sc: int
    sent_time: str
    sent_result: object


@dataclass(frozen=True, slots=True)
class ItemError:
    code: ErrorCode
    message: str
    sent_time: str


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_head(body: object, kind: Kind, table: Mapping[int, ExaminationType]) -> Head:
    """The validated head of a create or update body; raises a 400 Reject."""
    if not isinstance(body, dict):
        raise Reject(400, "body must be a JSON object")
    unknown = sorted(set(body) - _HEAD_KEYS[kind])
    if unknown:
        raise Reject(400, f"unknown field(s) for this request: {', '.join(unknown)}")
    station = body.get("station")
    if not isinstance(station, dict) or set(station) - {"id", "operatorStationId"}:
        raise Reject(400, "station must be an object with id or operatorStationId")
    sid, op = station.get("id"), station.get("operatorStationId")
    if not any(isinstance(s, str) and s for s in (sid, op)) or any(
        s is not None and not isinstance(s, str) for s in (sid, op)
    ):
        raise Reject(400, "station needs an id or an operatorStationId (strings)")
    mp = body.get("measurementPointNumber")
    if not _is_int(mp) or mp not in (1, 2):
        raise Reject(400, "measurementPointNumber must be 1 or 2")
    sc = body.get("examinationTypeSc")
    exam = table.get(sc) if _is_int(sc) else None  # type: ignore[arg-type]
    if exam is None:
        raise Reject(
            400,
            f"examinationTypeSc {sc!r} is not a valid examination type "
            f"({', '.join(map(str, sorted(table)))})",
        )
    if kind == "create":
        for key, want in (("parameterSc", exam.parameter_sc), ("unitSc", exam.unit_sc)):
            if body.get(key) != want or not _is_int(body.get(key)):
                raise Reject(
                    400,
                    f"{key} {body.get(key)!r} is not valid for examination type "
                    f"{exam.sc} (expected {want})",
                )
    logger = body.get("loggerId")
    if logger is not None and not isinstance(logger, str):
        raise Reject(400, "loggerId must be a string")
    tb = body.get("transactionBased", False)
    if not isinstance(tb, bool):
        raise Reject(400, "transactionBased must be true or false")
    return Head(sid or None, op or None, mp, exam, logger, tb)


def item_list(body: dict[str, Any], kind: Kind) -> list[dict[str, Any]]:
    """The body's item list: 1 to 1000 objects with only documented fields; else a 400."""
    key = LIST_KEY[kind]
    items = body.get(key)
    if not isinstance(items, list) or not items:
        raise Reject(400, f"{key} must be a non-empty list")
    if len(items) > MAX_MEASUREMENTS_PER_REQUEST:
        raise Reject(
            400, f"at most {MAX_MEASUREMENTS_PER_REQUEST} {key} per request, got {len(items)}"
        )
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise Reject(400, f"{key}[{i}] must be an object")
        unknown = sorted(set(it) - _ITEM_KEYS[kind])
        if unknown:
            raise Reject(400, f"{key}[{i}]: unknown field(s) {', '.join(unknown)}")
    return items


def check_item(raw: dict[str, Any], kind: Kind, exam: ExaminationType) -> Item | ItemError:
    """One item against the document: time without seconds (create) or rounded to the nearest
    minute (update), a numeric result inside the bounds after rounding, a valid reason code."""
    text = raw.get("measurementDateTime")
    shown = text if isinstance(text, str) else repr(text)
    try:
        when = read_time(text) if isinstance(text, str) else None
    except ValueError:
        when = None
    if when is None or not when.utc:
        return ItemError(
            ErrorCode.INVALID_DATETIME,
            f"measurementDateTime {shown} must be an RFC 3339 UTC date and time, "
            "e.g. 2023-09-21T14:34Z",
            shown,
        )
    if kind == "create" and when.has_seconds:
        return ItemError(
            ErrorCode.INVALID_DATETIME,
            f"measurementDateTime {shown} must be given without seconds, e.g. 2023-09-21T14:34Z",
            shown,
        )
    minute = when.minute_ms if kind == "create" else when.nearest_minute_ms
    value = raw.get("result")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return ItemError(ErrorCode.INVALID_RESULT, f"result {value!r} is not a number", shown)
    try:
        result = stored_result(value, exam.decimals)
    except ValueError as exc:
        return ItemError(ErrorCode.INVALID_RESULT, str(exc), shown)
    problem = bound_problem(exam, result)
    if problem is not None:
        return ItemError(ErrorCode.OUT_OF_RANGE, problem, shown)
    reason = raw.get("reasonCodeSc")
    if not _is_int(reason) or reason not in exam.reason_codes:
        return ItemError(
            ErrorCode.INVALID_REASON,
            f"reasonCodeSc {reason!r} is not valid for examination type {exam.sc}",
            shown,
        )
    return Item(minute, result, reason, shown, value)


# -- the IdP -------------------------------------------------------------------------------------


def oauth_error(status: int, error: str, description: str, *, basic: bool = False) -> web.Response:
    """An RFC 6749 5.2 error answer of the token endpoint."""
    headers = {"Cache-Control": "no-store"}
    if status == 401 and basic:
        headers["WWW-Authenticate"] = 'Basic realm="token"'
    return web.json_response(
        {"error": error, "error_description": description}, status=status, headers=headers
    )


def basic_credentials(header: str) -> tuple[str, str] | None:
    """Client id and secret of an HTTP Basic header (RFC 6749 2.3.1), None without one."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        cid, _, secret = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return ("", "")
    return unquote_plus(cid), unquote_plus(secret)
