"""Vanda Hydro API uplink: its config model (pure: imports no transport library)."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gateway.configbase import RouteBase, SecretRef, UplinkConfigBase
from gateway.uplinks.vanda.tables import (
    EXAMINATION_TYPES,
    MAX_MEASUREMENTS_PER_REQUEST,
    REASON_CODES,
    USABLE_REASON_CODES,
    ExaminationType,
)

pass


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
