"""NILU sensors uplink: its config model (pure: imports no transport library)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from gateway.configbase import RouteBase, SecretRef, Strict, UplinkConfigBase
from gateway.uplinks.nilu import packets as pk

pass


class NiluSensor(Strict):
    """``[[uplinks.sensors]]``: one NILU sensor as configured at NILU (GET /api/sensors/{id})."""

    id: int = Field(ge=1)
    #: The sensor's ``resolution`` in seconds: no two packets closer than this.
    resolution_s: int = Field(ge=1, le=86_400)
    #: True for a sensor configured at NILU with ``location: {}`` (position in each request).
    gps: bool = False
    #: Altitude sent for a GPS fix that has none (e.g. a boat: 0). None: such readings are
    #: dead-lettered rather than sent with an invented altitude.
    altitude_if_unknown_m: float | None = None
    #: The attribute NILU's Timestamp mapping targets (its ``target-path`` without the ``/``).
    timestamp_field: str = Field(pattern=pk.AVRO_NAME)
    #: The StringEpochTime converter's ``input-format``; leave out for epoch seconds.
    timestamp_format: str | None = Field(default=None, min_length=1, max_length=64)
    #: The converter's ``timezone`` (IANA name); only with ``timestamp_format``.
    timestamp_timezone: str | None = None

    @field_validator("timestamp_format")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is not None:
            pk.parse_pattern(v)
        return v

    @field_validator("timestamp_timezone")
    @classmethod
    def _zone(cls, v: str | None) -> str | None:
        if v is not None:
            zone(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> NiluSensor:
        if self.timestamp_timezone is not None and self.timestamp_format is None:
            raise ValueError("timestamp_timezone needs timestamp_format (epoch seconds are UTC)")
        if self.altitude_if_unknown_m is not None and not self.gps:
            raise ValueError("altitude_if_unknown_m applies to GPS sensors only (gps = true)")
        return self


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ValueError when unknown."""
    if not pk.valid_zone_name(name):
        raise ValueError(f"time zone {name!r} is not an IANA name like 'Europe/Oslo'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (is the tz database installed?)") from None


class NiluRoute(RouteBase):
    """``series`` -> one parameter of one configured sensor."""

    sensor: int = Field(ge=1)
    parameter: str = Field(pattern=pk.AVRO_NAME)
    #: The value ``fieldgate check-uplink`` sends in its push-test packet.
    sample: float | int | bool | str = 0


class NiluConfig(UplinkConfigBase):
    """``[[uplinks]] type = "nilu"``."""

    type: Literal["nilu"]
    url: str = Field(default="https://sensors.nilu.no", pattern=r"^https?://")
    token: SecretRef
    verify_tls: bool = True
    ca_file: Path | None = None
    #: A disabled sensor's readings are kept and offered again after this many seconds.
    disabled_retry_s: float = Field(default=900.0, gt=0, le=3600)
    sensors: list[NiluSensor] = Field(min_length=1)
    routes: list[NiluRoute] = Field(min_length=1)

    order: Literal["live_first", "oldest_first"] = "oldest_first"
    rate_limit_requests: int = Field(default=120, ge=0)
    rate_limit_period_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _interval_from_resolution(cls, data: Any) -> Any:
        """Routes without ``min_interval_s`` take their sensor's resolution."""
        if not isinstance(data, dict):
            return data
        sensors, routes = data.get("sensors"), data.get("routes")
        if not isinstance(sensors, list) or not isinstance(routes, list):
            return data
        res: dict[object, float] = {}
        for s in sensors:
            sid, r = (
                (s.get("id"), s.get("resolution_s"))
                if isinstance(s, dict)
                else (getattr(s, "id", None), getattr(s, "resolution_s", None))
            )
            if isinstance(r, int | float) and not isinstance(r, bool) and isinstance(sid, int):
                res[sid] = float(r)
        out: list[object] = []
        for route in routes:
            r = route
            sensor = r.get("sensor") if isinstance(r, dict) else None
            if (
                isinstance(r, dict)
                and "min_interval_s" not in r
                and isinstance(sensor, int)
                and sensor in res
            ):
                r = {**r, "min_interval_s": res[r["sensor"]]}
            elif (
                isinstance(r, NiluRoute)
                and "min_interval_s" not in r.model_fields_set
                and r.sensor in res
            ):
                r = r.model_copy(update={"min_interval_s": res[r.sensor]})
            out.append(r)
        return {**data, "routes": out}

    @model_validator(mode="after")
    def _cross_check(self) -> NiluConfig:
        ids = [s.id for s in self.sensors]
        dups = sorted({i for i in ids if ids.count(i) > 1})
        if dups:
            raise ValueError(f"sensor ids configured twice: {', '.join(map(str, dups))}")
        by_id = {s.id: s for s in self.sensors}
        params: dict[int, list[NiluRoute]] = {}
        for r in self.routes:
            s = by_id.get(r.sensor)
            if s is None:
                raise ValueError(
                    f"route {r.series!r} names sensor {r.sensor}, which is not in "
                    "[[uplinks.sensors]]"
                )
            if r.parameter == s.timestamp_field:
                raise ValueError(
                    f"route {r.series!r}: parameter {r.parameter!r} is sensor "
                    f"{s.id}'s timestamp attribute"
                )
            if r.min_interval_s < s.resolution_s:
                raise ValueError(
                    f"route {r.series!r}: min_interval_s {r.min_interval_s:g} is "
                    f"below sensor {s.id}'s resolution of {s.resolution_s} s"
                )
            params.setdefault(s.id, []).append(r)
        for sid, rs in params.items():
            names = [r.parameter for r in rs]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(
                    f"sensor {sid}: parameter routed from two series: {', '.join(twice)}"
                )
            if len({r.min_interval_s for r in rs}) > 1:
                raise ValueError(
                    f"sensor {sid}: its routes need one min_interval_s (they share "
                    "packets), got " + ", ".join(f"{r.min_interval_s:g}" for r in rs)
                )
            if len(rs) > self.batch_max_items:
                raise ValueError(
                    f"batch_max_items {self.batch_max_items} is below sensor "
                    f"{sid}'s {len(rs)} parameters (a packet would be split)"
                )
        unrouted = sorted(set(by_id) - set(params))
        if unrouted:
            raise ValueError(f"sensors without routes: {', '.join(map(str, unrouted))}")
        return self

    def sensor(self, sensor_id: int) -> NiluSensor:
        return next(s for s in self.sensors if s.id == sensor_id)
