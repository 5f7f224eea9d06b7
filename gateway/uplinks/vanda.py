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
IdP by OAuth2 client credentials (:mod:`gateway.uplinks.vanda_auth`).

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
  :mod:`gateway.uplinks.vanda_tables` (all nine types of the table; "10.000" cm is ten thousand;
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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.configbase import RouteBase, Secret, SecretRef, UplinkConfigBase
from gateway.errors import AuthError, PermanentError, TransientError
from gateway.models import StoredReading
from gateway.uplinks import http
from gateway.uplinks.base import Outcome, SendResult
from gateway.uplinks.vanda_answer import read_answer
from gateway.uplinks.vanda_auth import TokenSource
from gateway.uplinks.vanda_tables import (
    EXAMINATION_TYPES,
    MAX_MEASUREMENTS_PER_REQUEST,
    REASON_CODES,
    USABLE_REASON_CODES,
    ExaminationType,
    compare_tables,
    format_minute,
    minute_of,
    parse_examination_types,
    range_problem,
    round_result,
)

if TYPE_CHECKING:
    import httpx

log = structlog.get_logger(__name__)


class VandaRoute(RouteBase):
    """``series`` -> the station, measurement point and examination it is a measurement of."""

    #: Exactly one of the Vanda station number and the operator's own station reference.
    station_id: str | None = Field(default=None, min_length=1, max_length=64)
    operator_station_id: str | None = Field(default=None, min_length=1, max_length=64)
    measurement_point_number: Literal[1, 2]
    examination_type_sc: int
    #: Optional: taken from the examination type when left out, checked when given.
    parameter_sc: int | None = Field(default=None, validate_default=True)
    unit_sc: int | None = Field(default=None, validate_default=True)
    reason_code_sc: int
    logger_id: str | None = Field(default=None, min_length=1, max_length=100)
    #: "create": POST /measurements; "update": corrected results, POST /measurements/update.
    mode: Literal["create", "update"] = "create"

    @model_validator(mode="before")
    @classmethod
    def _default_interval(cls, data: Any) -> Any:
        # The shared downsampling reads min_interval_s; without it the service refuses readings
        # closer than its minimum interval, so the default is that interval.
        if isinstance(data, dict) and "min_interval_s" not in data:
            sc = data.get("examination_type_sc")
            exam = EXAMINATION_TYPES.get(sc) if isinstance(sc, int) else None
            if exam is not None:
                return {**data, "min_interval_s": exam.interval_min * 60}
        return data

    @field_validator("examination_type_sc")
    @classmethod
    def _known_type(cls, sc: int) -> int:
        if sc not in EXAMINATION_TYPES:
            known = ", ".join(f"{t.sc} ({t.name})" for t in EXAMINATION_TYPES.values())
            raise ValueError(f"unknown examination type {sc} (the Hydro API takes: {known})")
        return sc

    @field_validator("parameter_sc", "unit_sc")
    @classmethod
    def _matches_type(cls, v: int | None, info: ValidationInfo) -> int | None:
        exam = EXAMINATION_TYPES.get(info.data.get("examination_type_sc"))  # type: ignore[arg-type]
        if v is None or exam is None:  # default, or the type is invalid and reported on its own
            return v
        want, label = (
            (exam.parameter_sc, f"parameter {exam.parameter_sc} ({exam.parameter})")
            if info.field_name == "parameter_sc"
            else (exam.unit_sc, f"unit {exam.unit_sc} ({exam.unit})")
        )
        if v != want:
            raise ValueError(
                f"examination type {exam.sc} ({exam.name}) takes {label} only, "
                f"not {v} (the document's examination/parameter/unit table)"
            )
        return v

    @field_validator("reason_code_sc")
    @classmethod
    def _reason(cls, code: int, info: ValidationInfo) -> int:
        exam = EXAMINATION_TYPES.get(info.data.get("examination_type_sc"))  # type: ignore[arg-type]
        allowed = exam.reason_codes if exam is not None else USABLE_REASON_CODES
        if code not in allowed:
            name = REASON_CODES.get(code)
            what = f"{code} ({name})" if name else str(code)
            raise ValueError(
                f"reason code {what} is not valid here (SC1188 codes 0-17; 18 is "
                "marked for no examination type)"
            )
        return code

    @model_validator(mode="after")
    def _station_and_interval(self) -> VandaRoute:
        if (self.station_id is None) == (self.operator_station_id is None):
            raise ValueError("give exactly one of station_id and operator_station_id")
        exam = self.examination
        least = exam.interval_min * 60
        if self.min_interval_s < least:
            raise ValueError(
                f"min_interval_s = {self.min_interval_s:g} is below the minimum interval of "
                f"examination type {exam.sc} ({exam.name}): {exam.interval_min} minutes; use "
                f"at least {least} (or leave it out)"
            )
        if self.min_interval_s % 60:
            raise ValueError(
                f"min_interval_s = {self.min_interval_s:g} must be whole minutes "
                "(Vanda has minute resolution)"
            )
        return self

    @property
    def examination(self) -> ExaminationType:
        return EXAMINATION_TYPES[self.examination_type_sc]

    def station(self) -> dict[str, str]:
        if self.station_id is not None:
            return {"id": self.station_id}
        assert self.operator_station_id is not None
        return {"operatorStationId": self.operator_station_id}

    def header_key(self) -> tuple[Hashable, ...]:
        """What requests of this route share (the body's fields outside the item list)."""
        return (
            self.station_id,
            self.operator_station_id,
            self.measurement_point_number,
            self.examination_type_sc,
            self.logger_id,
            self.mode,
        )


class VandaConfig(UplinkConfigBase):
    """``[[uplinks]] type = "vanda"``."""

    type: Literal["vanda"]
    #: The Hydro API base, e.g. ``https://vandah.miljoeportal.dk/api`` (PROD).
    api_url: str = Field(pattern=r"^https?://")
    #: The IdP's token endpoint, e.g. ``https://log-in.miljoeportal.dk/runtime/oauth2/token.idp``.
    token_url: str = Field(pattern=r"^https?://")
    client_id: SecretRef
    client_secret: SecretRef
    scope: str = "openid"
    #: How the client authenticates at the token endpoint: form fields or HTTP Basic.
    client_auth: Literal["post", "basic"] = "post"
    #: Refresh a token this long before it expires (at most half its lifetime).
    token_refresh_margin_s: float = Field(default=60.0, ge=0)
    #: Commit each request all-or-nothing (true) or item by item (false, the default).
    transaction_based: bool = False
    verify_tls: bool = True
    ca_file: Path | None = None
    routes: list[VandaRoute] = Field(min_length=1)

    batch_max_items: int = Field(default=1000, ge=1, le=MAX_MEASUREMENTS_PER_REQUEST)

    route_model = VandaRoute

    @model_validator(mode="after")
    def _one_route_per_measurement_key(self) -> VandaConfig:
        seen: dict[tuple[Hashable, ...], str] = {}
        for r in self.routes:
            key = (
                r.station_id,
                r.operator_station_id,
                r.measurement_point_number,
                r.examination_type_sc,
                r.mode,
            )
            if key in seen:
                raise ValueError(
                    f"series {seen[key]!r} and {r.series!r} go to the same station, measurement "
                    f"point and examination type ({r.mode}): Vanda keeps one measurement per "
                    "minute there, so they would overwrite each other"
                )
            seen[key] = r.series
        return self

    def api(self, path: str) -> str:
        return f"{self.api_url.rstrip('/')}/{path.lstrip('/')}"


class VandaUplink:
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
        self.name = cfg.name
        self.cfg = cfg
        self._routes = {r.series: r for r in cfg.routes}
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
        self._client = http.LazyClient(
            cfg.timeout_s, verify=cfg.verify_tls, ca_file=cfg.ca_file
        )

    @property
    def routes(self) -> Mapping[str, VandaRoute]:
        return self._routes

    def _http(self) -> httpx.AsyncClient:
        return self._client.get()

    async def aclose(self) -> None:
        await self._client.aclose()

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
        import httpx

        content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        for attempt in (1, 2):
            try:
                token = await self.tokens.get(self._http())
            except AuthError as exc:
                return SendResult.failed(Outcome.AUTH, str(exc))
            except TransientError as exc:
                return SendResult.failed(Outcome.TRANSIENT, str(exc), retry_after=exc.retry_after)
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


# ----------------------------------------------------------------------------------------------
# check-config --probe


async def probe_examination_types(
    cfg: VandaConfig, client_id: Secret, client_secret: Secret
) -> list[str]:
    """Fetch the service's ``GET /config/examination-types`` and list how it differs from the
    built-in table, then which configured routes the service's table refuses. An empty list
    means no difference. Raises AuthError, TransientError or PermanentError (unreadable table).
    """
    import httpx

    tokens = TokenSource(
        cfg.token_url,
        client_id,
        client_secret,
        scope=cfg.scope,
        client_auth=cfg.client_auth,
        name=cfg.name,
    )
    async with http.make_client(
        cfg.timeout_s, verify=cfg.verify_tls, ca_file=cfg.ca_file
    ) as client:
        token = await tokens.get(client)
        try:
            resp = await client.get(
                cfg.api("config/examination-types"),
                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise TransientError(f"examination types: {type(exc).__name__}") from exc
    if resp.status_code in (401, 403):
        raise AuthError(f"examination types: HTTP {resp.status_code}")
    if resp.status_code != 200:
        raise TransientError(tokens.scrub(f"examination types: {http.reason_text(resp)}"))
    try:
        service = parse_examination_types(resp.json())
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    lines = compare_tables(EXAMINATION_TYPES, service)
    for i, r in enumerate(cfg.routes):
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
