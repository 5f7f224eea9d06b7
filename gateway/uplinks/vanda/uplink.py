"""Vanda Hydro API uplink (Danmarks Miljøportal; shared/seeds/004_eb17c629c85a279b.txt).

Wire format: ``POST <api_url>/measurements`` with ``Authorization: Bearer <token>`` and one JSON
object per station, measurement point and examination type::

    {"station": {"id": "..."} | {"operatorStationId": "..."}, "measurementPointNumber": 1,
     "examinationTypeSc": 25, "parameterSc": 1233, "unitSc": 19, "loggerId": "...",
     "transactionBased": false,
     "measurements": [{"measurementDateTime": "2023-09-21T14:35Z", "result": 123.4,
                       "reasonCodeSc": 5}]}

Corrections go to ``POST <api_url>/measurements/update`` (``results`` instead of
``measurements``, no parameter/unit/logger). The answer is 200 with ``successful``
(``timestamp``, ``action``) and ``failed`` (``timestamp``, ``isSuccess``, ``errorCode``,
``errorMessage``) lists, matched to our measurements by their minute. The token comes from the
IdP by OAuth2 client credentials (:mod:`gateway.uplinks.vanda.auth`).

Choices where the document is silent or contradicts itself, written down:

* **Corrections** are a route option, ``mode = "update"``: the series routed so carries corrected
  results for measurements already created (e.g. ``well3.level.corrected`` next to
  ``well3.level``) and goes through the same queue, retries and dead letters. A result the
  service already holds is answered ``ignored`` and counts as delivered.
* **Request grouping**: the body is per station, measurement point, examination type (and
  logger, parameter, unit, mode), so ``group_key`` is that tuple. Two routes may not share
  station, measurement point, examination type and mode: the service keys a measurement by them
  and the minute, so they would overwrite each other.
* **Examination types, bounds, reasons, rounding and time format**: see
  :mod:`gateway.uplinks.vanda.tables` (all nine types of the table; "10.000" cm is ten thousand;
  the reason table lost its columns so any reason 0-17 is accepted locally; half away from zero;
  UTC minute, truncated). Out-of-range results are dead-lettered locally by ``check``.
* **Minimum interval**: each route's ``min_interval_s`` defaults to the examination type's
  ``measurementIntervalMin`` and may not be lower; it must be whole minutes (the shared
  downsampling aligns windows on it, and the service has minute resolution).
* **Same minute twice in a batch** (only possible without downsampling): the earliest reading
  of the minute is sent; the others share its outcome, as the service would answer ``ignored``
  for them one request later.
* **Answers**: ``timestamp`` is read as the item's ``measurementDateTime`` (the document's example
  shows the transaction time, which would make the lists useless). An answer that cannot be
  matched item by item falls back to: nothing failed -> all delivered; something failed -> the
  dispatcher bisects. Items the answer leaves out, and a 200 we cannot read, are sent again later
  (safe: the service ignores a measurement it already has). With ``transaction_based = true``,
  failed items with ``isSuccess = false`` are dead-lettered and the rest (rolled back, but
  valid) are handed back as transient with ``retry_after = 0`` so they go again at once; when the
  answer does not say which item broke the transaction, the dispatcher bisects.
* **Credentials**: the client id and the secret are both secret references (never logged, masked
  out of any status text); they go to the token endpoint as form fields (``client_auth =
  "post"``, the default) or HTTP Basic, with scope ``openid``. The token is reused until 60 s (at
  most half its lifetime) before ``expires_in`` runs out.
* **Auth**: 401 from the API refreshes the token once and repeats the request; a second 401, a
  403 or an IdP refusal is ``auth`` (data kept; the token is dropped so the next try fetches one).
* **Station**: exactly one of ``station_id`` and ``operator_station_id``; the body's ``station``
  carries only that key (the document's example shows both, its text says "either ... or").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import httpx
import structlog

from gateway.configbase import Secret
from gateway.errors import AuthError, PermanentError, TransientError
from gateway.models import StoredReading
from gateway.probe import ProbeReport
from gateway.uplinks import http
from gateway.uplinks.base import Outcome, SendResult
from gateway.uplinks.vanda.answer import read_answer
from gateway.uplinks.vanda.auth import TokenSource
from gateway.uplinks.vanda.config import (
    VandaConfig,
    VandaRoute,
)
from gateway.uplinks.vanda.tables import (
    EXAMINATION_TYPES,
    compare_tables,
    format_minute,
    minute_of,
    parse_examination_types,
    range_problem,
    round_result,
)

log = structlog.get_logger(__name__)


class VandaUplink(http.HttpPlugin[VandaRoute]):
    """The Vanda plugin: measurements out, per-measurement outcome back (module docstring)."""

    def __init__(
        self,
        cfg: VandaConfig,
        client_id: Secret,
        client_secret: Secret,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (monotonic seconds) times token expiry; tests pass a manual clock."""
        super().__init__(cfg, cfg.routes)
        self.cfg = cfg
        self.tokens = TokenSource(
            cfg.token_url,
            client_id,
            client_secret,
            scope=cfg.scope,
            client_auth=cfg.client_auth,
            margin_s=cfg.token_refresh_margin_s,
            clock=clock,
            name=cfg.name,
        )

    # -- check-config --probe ----------------------------------------------------------------

    async def probe(self) -> ProbeReport:
        """How the service's examination-type table differs from the built-in one, and which
        routes it refuses (informational lines; a failure to fetch the table raises)."""
        lines = await self.examination_type_differences()
        return ProbeReport(tuple(lines or ["examination types match the built-in table"]))

    async def examination_type_differences(self) -> list[str]:
        """Fetch the service's ``GET /config/examination-types`` and list how it differs from
        the built-in table, then which configured routes the service's table refuses. An empty
        list means no difference. Raises AuthError, TransientError or PermanentError (an
        unreadable table)."""
        client = self._http()
        token = await self.tokens.get(client)
        try:
            resp = await client.get(
                self.cfg.api("config/examination-types"),
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise TransientError(f"examination types: {type(exc).__name__}") from exc
        if resp.status_code in (401, 403):
            raise AuthError(f"examination types: HTTP {resp.status_code}")
        if resp.status_code != 200:
            raise TransientError(self.tokens.scrub(f"examination types: {http.reason_text(resp)}"))
        try:
            service = parse_examination_types(resp.json())
        except ValueError as exc:
            raise PermanentError(str(exc)) from None
        lines = compare_tables(EXAMINATION_TYPES, service)
        for i, r in enumerate(self.cfg.routes):
            theirs = service.get(r.examination_type_sc)
            where = f"routes[{i}] ({r.series})"
            if theirs is None:
                lines.append(f"{where}: examination type {r.examination_type_sc} is not offered")
                continue
            if r.reason_code_sc not in theirs.reason_codes:
                lines.append(
                    f"{where}: reason code {r.reason_code_sc} is not accepted for "
                    f"examination type {theirs.sc} (the service takes "
                    f"{sorted(theirs.reason_codes)})"
                )
            if r.min_interval_s < theirs.interval_min * 60:
                lines.append(
                    f"{where}: min_interval_s {r.min_interval_s:g} is below the service's "
                    f"minimum interval of {theirs.interval_min} minutes"
                )
        return lines

    # -- the plugin contract ---------------------------------------------------------------------

    def check(self, item: StoredReading) -> str | None:
        v = item.value
        if isinstance(v, bool) or not isinstance(v, int | float):
            return f"Vanda takes numeric results only, got {type(v).__name__} {str(v)[:40]!r}"
        exam = self._routes[item.series].examination
        try:
            result = round_result(v, exam.decimals)
        except ValueError as exc:
            return str(exc)
        return range_problem(exam, result)

    def group_key(self, item: StoredReading) -> Hashable:
        return self._routes[item.series].header_key()

    def item_size(self, item: StoredReading) -> int:
        # {"measurementDateTime":"2023-09-21T14:34Z","result":-1234.567,"reasonCodeSc":17},
        return 96

    def body(self, route: VandaRoute, batch: Sequence[StoredReading]) -> dict[str, Any]:
        """The request body for ``batch`` (one route's readings, distinct minutes)."""
        exam = route.examination
        items = [
            {
                "measurementDateTime": format_minute(it.ts),
                "result": round_result(it.value, exam.decimals),  # type: ignore[arg-type]
                "reasonCodeSc": route.reason_code_sc,
            }
            for it in batch
        ]
        head: dict[str, Any] = {
            "station": route.station(),
            "measurementPointNumber": route.measurement_point_number,
            "examinationTypeSc": exam.sc,
        }
        if route.mode == "update":
            return {**head, "transactionBased": self.cfg.transaction_based, "results": items}
        head |= {"parameterSc": exam.parameter_sc, "unitSc": exam.unit_sc}
        if route.logger_id is not None:
            head["loggerId"] = route.logger_id
        return {**head, "transactionBased": self.cfg.transaction_based, "measurements": items}

    async def send(self, batch: Sequence[StoredReading]) -> SendResult:
        route = self._routes[batch[0].series]
        # One measurement per minute and request: followers share the first one's outcome.
        firsts: dict[int, StoredReading] = {}
        followers: dict[int, list[int]] = {}
        for it in sorted(batch, key=lambda i: (i.ts, i.id)):
            first = firsts.setdefault(minute_of(it.ts), it)
            if first is not it:
                followers.setdefault(first.id, []).append(it.id)
        unique = list(firsts.values())
        if followers:
            log.debug(
                "vanda_same_minute_merged",
                uplink=self.name,
                series=route.series,
                readings=sum(map(len, followers.values())),
            )
        path = "measurements/update" if route.mode == "update" else "measurements"
        result = await self._post(self.cfg.api(path), self.body(route, unique), unique)
        return _spread(result, followers) if followers else result

    async def _post(
        self, url: str, body: dict[str, Any], batch: Sequence[StoredReading]
    ) -> SendResult:
        content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        for attempt in (1, 2):
            try:
                token = await self.tokens.get(self._http())
            except AuthError as exc:
                return SendResult.failed(Outcome.AUTH, str(exc))
            except TransientError as exc:
                # A token endpoint that could not be reached: the short schedule, as for the API.
                cause = exc.__cause__
                return SendResult.failed(
                    Outcome.TRANSIENT,
                    str(exc),
                    retry_after=exc.retry_after,
                    unreachable=cause is not None and http.unreachable(cause),
                )
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json; charset=utf-8",
            }
            try:
                resp = await self._http().post(url, content=content, headers=headers)
            except httpx.HTTPError as exc:
                return http.transport_failure(exc)
            if resp.status_code == 401 and attempt == 1:
                # Expired early or revoked: one fresh token, then the answer stands.
                log.info("vanda_token_refused", uplink=self.name, action="refreshing")
                self.tokens.invalidate(token)
                continue
            break
        if resp.status_code in (401, 403):
            self.tokens.invalidate(token)
        if not 200 <= resp.status_code < 300:
            failed = http.classify(resp)
            f = failed.failure
            assert f is not None
            return SendResult.failed(
                f.outcome, self.tokens.scrub(f.message), retry_after=f.retry_after, status=f.status
            )
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        return read_answer(answer, batch, transactional=self.cfg.transaction_based, name=self.name)


def _spread(result: SendResult, followers: Mapping[int, list[int]]) -> SendResult:
    """Give the readings merged into another of their minute that one's outcome."""
    delivered = list(result.delivered)
    rejected = dict(result.rejected)
    done = set(result.delivered)
    for first, others in followers.items():
        if first in result.rejected:
            rejected.update(dict.fromkeys(others, result.rejected[first]))
        elif first in done:
            delivered.extend(others)
    return SendResult(delivered, rejected, result.failure, result.moved_to)
