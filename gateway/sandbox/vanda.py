"""Emulator of the Vanda Hydro API and its OAuth2 IdP (shared/seeds/004_eb17c629c85a279b.txt).

Routes, as the real hosts put them (the IdP and the API share this one server):

- ``POST /runtime/oauth2/token.idp`` - client credentials (RFC 6749 4.4): form-encoded
  ``grant_type=client_credentials``, ``scope`` containing ``openid``, the client authenticated by
  ``client_id``/``client_secret`` form fields or HTTP Basic. 200 ``{"access_token",
  "token_type": "Bearer", "expires_in", "scope"}``; unknown client, wrong or revoked secret ->
  401 ``{"error": "invalid_client"}``; other mistakes -> 400 with the RFC's error codes.
- ``POST /api/measurements`` and ``POST /api/measurements/update`` - bearer token with a write
  role (``miljoe_vanda_write``/``_operator``/``_admin``; 401 missing/unknown/expired, 403 no
  role). Body as the document's request objects; 200 with ``created``, ``transactionId``,
  ``successful`` (``timestamp``, ``action``: created/updated/ignored) and ``failed``
  (``timestamp``, ``isSuccess``, ``errorCode``, ``errorMessage``); ``timestamp`` echoes the item's
  ``measurementDateTime``.
- ``GET /api/config/examination-types`` - any valid token; the table as JSON
  (:meth:`~gateway.sandbox.vanda_tables.ExaminationType.to_json`).

Errors other than the token endpoint's answer ``{"title", "status", "detail"}``.

The document's tables (examination types, parameters, units, bounds, decimals, minimum
intervals, reason codes) and its time format are the emulator's own transcription of the
document, in :mod:`gateway.sandbox.vanda_tables`; nothing is imported from the uplink, so the
two can only agree through the document.

Decisions where the document is silent:

- whole-request problems are 400: body shape, unknown fields, unknown examination type,
  parameter/unit not the type's, more than 1000 items, two items of the same minute (the document
  says so for updates; creates are held to the same rule). An unknown station (when ``stations``
  is given) is 404;
- per item (``failed``, :class:`~gateway.sandbox.vanda_tables.ErrorCode`): a time with seconds
  on create (updates round to the nearest minute, as documented) or not UTC, a result that is not
  a number or outside the bounds after rounding, a reason code the type does not take, a create
  closer than ``measurementIntervalMin`` to another measurement of the same station, point and
  type, an update of a measurement that does not exist;
- a create at a minute that already holds a measurement is ``successful`` with action
  ``ignored`` (whatever the value: corrections go through update); an update to the stored value
  is ``ignored`` too; results are stored rounded;
- ``transactionBased`` (default false): with true and any item failing nothing is stored; with
  ``transaction_failure="per_item"`` every item is listed in ``failed`` (``isSuccess`` false for
  the culprits, true with errorCode 0 for the rest), with ``"status_400"`` the request is a 400
  that names no item;
- tokens live ``token_lifetime_s`` by the emulator's clock; :meth:`VandaEmulator.expire_tokens`
  ends every token now, :meth:`VandaEmulator.revoke_client` refuses a client from now on.

Records for tests: ``measurements`` (stored, in creation order), ``received`` (every item of every
accepted request, valid or not), ``actions`` (counts by action and "failed").

Standalone: ``python -m gateway.sandbox.vanda --port 8705``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
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
    bearer_token,
    parse_json,
    read_body,
)
from gateway.sandbox.faults import FAULT_KEY
from gateway.sandbox.vanda_rules import (
    Head,
    Item,
    ItemError,
    Kind,
    basic_credentials,
    check_item,
    item_list,
    oauth_error,
    parse_head,
)
from gateway.sandbox.vanda_tables import (
    EXAMINATION_TYPES,
    ErrorCode,
    ExaminationType,
    minute_text,
)

log = structlog.get_logger(__name__)

TOKEN_PATH = "/runtime/oauth2/token.idp"
WRITE_ROLES = frozenset({"miljoe_vanda_write", "miljoe_vanda_operator", "miljoe_vanda_admin"})


@dataclass(frozen=True, slots=True)
class Measurement:
    """One stored measurement; ``station`` is the station id (or the operator reference when the
    emulator knows no stations), ``measurement_date_time`` the minute as ``...THH:MMZ``."""

    station: str
    measurement_point_number: int
    examination_type_sc: int
    parameter_sc: int
    unit_sc: int
    logger_id: str | None
    measurement_date_time: str
    result: float
    reason_code_sc: int


@dataclass(frozen=True, slots=True)
class Received:
    """One item as it arrived (``path`` tells create from update)."""

    path: str
    station: str
    measurement_point_number: int
    examination_type_sc: int
    measurement_date_time: str
    result: object


@dataclass(slots=True)
class _Grant:
    client_id: str
    roles: frozenset[str]
    expires_at: float


_Key = tuple[str, int, int]  # station, measurement point, examination type


class VandaEmulator(Emulator):
    """The Hydro API and its IdP on 127.0.0.1; see the module docstring for the contract."""

    name = "vanda"

    def __init__(
        self,
        clients: Mapping[str, str] | None = None,
        *,
        roles: Mapping[str, Iterable[str]] | None = None,
        token_lifetime_s: float = 3600.0,
        stations: Mapping[str, str | None] | None = None,
        examination_types: Mapping[int, ExaminationType] | None = None,
        transaction_failure: Literal["per_item", "status_400"] = "per_item",
        rate_limit: int | None = None,
        rate_period_s: float = 60.0,
        max_body_bytes: int = 4 * 1024 * 1024,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
    ) -> None:
        """``clients``: client id -> secret (default ``demo-client``/``demo-secret``); ``roles``:
        client id -> roles (default ``miljoe_vanda_write``); ``stations``: station id ->
        operatorStationId or None (None: any station is accepted); ``examination_types``: the
        service's table (default: the document's); ``clock`` drives token expiry and limits."""
        super().__init__(host=host, port=port, clock=clock)
        self.clients = dict(clients or {"demo-client": "demo-secret"})
        self.roles = {c: frozenset(r) for c, r in (roles or {}).items()}
        self.token_lifetime_s = token_lifetime_s
        self.stations = dict(stations) if stations is not None else None
        self.table = dict(examination_types or EXAMINATION_TYPES)
        self.transaction_failure = transaction_failure
        self.limiter = (
            SlidingWindowLimiter(rate_limit, rate_period_s, clock) if rate_limit else None
        )
        self.max_body_bytes = max_body_bytes
        self._grants: dict[str, _Grant] = {}
        self._stored: dict[tuple[_Key, int], Measurement] = {}
        self._minutes: dict[_Key, list[int]] = {}
        self._drop_answers = 0
        self.received: list[Received] = []
        self.actions: Counter[str] = Counter()
        self.tokens_issued = 0

    def setup_routes(self, app: web.Application) -> None:
        app.router.add_post(TOKEN_PATH, self._token)
        app.router.add_post("/api/measurements", self._create)
        app.router.add_post("/api/measurements/update", self._update)
        app.router.add_get("/api/config/examination-types", self._examination_types)

    def error_body(self, status: int, message: str) -> object:
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
        return {"title": title, "status": status, "detail": message}

    # -- for tests ---------------------------------------------------------------------------

    @property
    def token_url(self) -> str:
        return f"{self.url}{TOKEN_PATH}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def measurements(self) -> list[Measurement]:
        """Stored measurements in the order they were created (updates change them in place)."""
        return list(self._stored.values())

    def expire_tokens(self) -> None:
        """Every token issued so far is expired from now on (the client still thinks not)."""
        for grant in self._grants.values():
            grant.expires_at = float("-inf")

    def revoke_client(self, client_id: str) -> None:
        """The client's secret is no longer accepted and its tokens stop working."""
        self.clients.pop(client_id, None)
        self._grants = {t: g for t, g in self._grants.items() if g.client_id != client_id}

    def drop_answer_next(self, n: int = 1) -> None:
        """Commit the next ``n`` measurement requests, then close the connection unanswered
        (a crash or network cut after the service stored them)."""
        self._drop_answers += n

    # -- the IdP -----------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            return oauth_error(400, "invalid_request", "the body must be form-encoded")
        form = await request.post()
        basic = basic_credentials(request.headers.get("Authorization", ""))
        in_form = form.get("client_id"), form.get("client_secret")
        if basic is not None and any(in_form):
            return oauth_error(400, "invalid_request", "use one client authentication method")
        client_id, secret = basic if basic is not None else in_form
        known = self.clients.get(str(client_id)) if client_id else None
        if known is None or not secrets.compare_digest(known, str(secret or "")):
            return oauth_error(
                401, "invalid_client", "client authentication failed", basic=basic is not None
            )
        if form.get("grant_type") != "client_credentials":
            return oauth_error(400, "unsupported_grant_type", "only client_credentials")
        scope = str(form.get("scope") or "")
        if "openid" not in scope.split():
            return oauth_error(400, "invalid_scope", "scope must include openid")
        token = secrets.token_urlsafe(24)
        roles = self.roles.get(str(client_id), frozenset({"miljoe_vanda_write"}))
        self._grants[token] = _Grant(str(client_id), roles, self.clock() + self.token_lifetime_s)
        self.tokens_issued += 1
        return web.json_response(
            {
                "access_token": token,
                "token_type": "Bearer",
                "expires_in": int(self.token_lifetime_s),
                "scope": scope,
            },
            headers={"Cache-Control": "no-store"},
        )

    def _grant(self, request: web.Request) -> _Grant:
        token = bearer_token(request)
        if token is None:
            raise Reject(401, "authentication token missing", {"WWW-Authenticate": "Bearer"})
        grant = self._grants.get(token)
        if grant is None or self.clock() >= grant.expires_at:
            raise Reject(
                401,
                "authentication token invalid or expired",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if self.limiter is not None:
            self.limiter.check(grant.client_id)
        return grant

    # -- the API -----------------------------------------------------------------------------

    async def _examination_types(self, request: web.Request) -> web.Response:
        self._grant(request)
        return web.json_response([t.to_json() for t in self.table.values()])

    async def _create(self, request: web.Request) -> web.Response:
        return await self._write(request, "create")

    async def _update(self, request: web.Request) -> web.Response:
        return await self._write(request, "update")

    async def _write(self, request: web.Request, kind: Kind) -> web.Response:
        grant = self._grant(request)
        if not grant.roles & WRITE_ROLES:
            raise Reject(403, "one of the roles " + ", ".join(sorted(WRITE_ROLES)) + " needed")
        body = parse_json(await read_body(request, self.max_body_bytes))
        head = parse_head(body, kind, self.table)
        raws = item_list(body, kind)  # type: ignore[arg-type]
        station = self._station(head)
        key: _Key = (station, head.measurement_point_number, head.exam.sc)
        self.received.extend(
            Received(
                request.path,
                station,
                head.measurement_point_number,
                head.exam.sc,
                str(r.get("measurementDateTime")),
                r.get("result"),
            )
            for r in raws
        )
        checked = [check_item(r, kind, head.exam) for r in raws]
        minutes = [c.minute for c in checked if isinstance(c, Item)]
        if len(set(minutes)) != len(minutes):
            raise Reject(400, "several measurementDateTime values identify the same minute")
        answer = self._commit(head, key, kind, checked)
        if self._drop_answers > 0:
            self._drop_answers -= 1
            request[FAULT_KEY] = "drop"
            request.protocol.force_close()  # the response below is discarded unsent
        return web.json_response(answer)

    def _station(self, head: Head) -> str:
        if self.stations is None:
            return head.station_id or head.operator_station_id or ""
        if head.station_id is not None:
            if head.station_id not in self.stations:
                raise Reject(404, f"station {head.station_id} not found")
            if head.operator_station_id not in (None, self.stations[head.station_id]):
                raise Reject(400, "station id and operatorStationId name different stations")
            return head.station_id
        for sid, op in self.stations.items():
            if op is not None and op == head.operator_station_id:
                return sid
        raise Reject(404, f"station with operatorStationId {head.operator_station_id} not found")

    def _commit(
        self, head: Head, key: _Key, kind: Kind, checked: list[Item | ItemError]
    ) -> dict[str, Any]:
        """Decide every item, store what may be stored, and build the answer."""
        outcomes: list[tuple[str, Item] | ItemError] = []
        pending: list[int] = []
        for c in checked:
            if isinstance(c, ItemError):
                outcomes.append(c)
                continue
            outcomes.append(self._decide(head, key, kind, c, pending))
        failed = [o for o in outcomes if isinstance(o, ItemError)]
        successful: list[dict[str, Any]] = []
        failed_out: list[dict[str, Any]] = []
        if head.transactional and failed:
            if self.transaction_failure == "status_400":
                first = failed[0]
                raise Reject(
                    400,
                    f"transaction rolled back: {len(failed)} of {len(outcomes)} "
                    f"measurements failed (errorCode {int(first.code)}: "
                    f"{first.message})",
                )
            for o in outcomes:
                if isinstance(o, ItemError):
                    failed_out.append(_failed(o, is_success=False))
                else:
                    failed_out.append(
                        _failed(
                            ItemError(
                                ErrorCode.NOT_COMMITTED,
                                "not committed: the transaction was rolled "
                                "back because other measurements failed",
                                o[1].sent_time,
                            ),
                            True,
                        )
                    )
            self.actions["failed"] += len(outcomes)
        else:
            for o in outcomes:
                if isinstance(o, ItemError):
                    failed_out.append(_failed(o, is_success=False))
                    self.actions["failed"] += 1
                    continue
                action, item = o
                self._store(head, key, item, action)
                successful.append({"timestamp": item.sent_time, "action": action})
                self.actions[action] += 1
        log.debug(
            "vanda_transaction",
            kind=kind,
            station=key[0],
            successful=len(successful),
            failed=len(failed_out),
        )
        return {
            "created": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "transactionId": str(uuid.uuid4()),
            "successful": successful,
            "failed": failed_out,
        }

    def _decide(
        self, head: Head, key: _Key, kind: Kind, item: Item, pending: list[int]
    ) -> tuple[str, Item] | ItemError:
        stored = self._stored.get((key, item.minute))
        if kind == "update":
            if stored is None:
                return ItemError(
                    ErrorCode.NOT_FOUND,
                    f"no measurement at {item.sent_time} to "
                    "update on this station, point and examination type",
                    item.sent_time,
                )
            return ("ignored" if stored.result == item.result else "updated"), item
        if stored is not None:
            return "ignored", item
        gap = head.exam.interval_min * 60_000
        for minute in (*self._neighbours(key, item.minute, gap), *pending):
            if minute != item.minute and abs(minute - item.minute) < gap:
                return ItemError(
                    ErrorCode.MIN_INTERVAL,
                    f"measurement at {minute_text(minute)} is less than the "
                    f"minimum interval of {head.exam.interval_min} minutes away",
                    item.sent_time,
                )
        pending.append(item.minute)
        return "created", item

    def _neighbours(self, key: _Key, minute: int, gap: int) -> list[int]:
        times = self._minutes.get(key, [])
        lo = bisect.bisect_right(times, minute - gap)
        hi = bisect.bisect_left(times, minute + gap)
        return times[lo:hi]

    def _store(self, head: Head, key: _Key, item: Item, action: str) -> None:
        if action == "ignored":
            return
        slot = (key, item.minute)
        if action == "updated":
            self._stored[slot] = replace(
                self._stored[slot], result=item.result, reason_code_sc=item.reason_code_sc
            )
            return
        self._stored[slot] = Measurement(
            key[0],
            head.measurement_point_number,
            head.exam.sc,
            head.exam.parameter_sc,
            head.exam.unit_sc,
            head.logger_id,
            minute_text(item.minute),
            item.result,
            item.reason_code_sc,
        )
        bisect.insort(self._minutes.setdefault(key, []), item.minute)


def _failed(err: ItemError, is_success: bool) -> dict[str, Any]:
    return {
        "timestamp": err.sent_time,
        "isSuccess": is_success,
        "errorCode": int(err.code),
        "errorMessage": err.message,
    }


async def _serve(emu: VandaEmulator) -> None:
    async with emu:
        print(
            f"vanda emulator listening on {emu.url} (token {emu.token_url}, api {emu.api_url})",
            flush=True,
        )
        await asyncio.Event().wait()  # until Ctrl-C cancels us


def main(argv: list[str] | None = None) -> None:
    """Run the emulator until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m gateway.sandbox.vanda")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8705)
    parser.add_argument("--client-id", default="demo-client")
    parser.add_argument("--client-secret", default="demo-secret")
    parser.add_argument("--token-lifetime", type=float, default=3600.0, help="seconds")
    parser.add_argument(
        "--transaction-failure", choices=["per_item", "status_400"], default="per_item"
    )
    args = parser.parse_args(argv)
    emu = VandaEmulator(
        {args.client_id: args.client_secret},
        token_lifetime_s=args.token_lifetime,
        transaction_failure=args.transaction_failure,
        host=args.host,
        port=args.port,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(emu))


if __name__ == "__main__":
    main()
