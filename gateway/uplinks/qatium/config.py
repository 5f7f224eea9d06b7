"""Qatium Ingest uplink: its config model (pure: imports no transport library)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from gateway.configbase import RouteBase, SecretRef, UplinkConfigBase

pass


ENGINE_UNITS = frozenset(
    [
        "gpm",
        "cfs",
        "mgd",
        "imgd",
        "afd",
        "lps",
        "l/s",
        "lpm",
        "l/m",
        "mld",
        "cmh",
        "cmd",
        "mwc",
        "psi",
        "ft",
        "m",
    ]
)
FLOW_UNITS = frozenset(
    [
        "Ml/d",
        "cmd",
        "cmh",
        "l/m",
        "l/min",
        "l/s",
        "lpm",
        "lps",
        "m^3/d",
        "m^3/h",
        "mld",
        "Mgal/d",
        "Mgallon-imp/d",
        "acre ft/d",
        "afd",
        "cfs",
        "ft^3/s",
        "gal/min",
        "gpm",
        "imgd",
        "mgd",
    ]
)
#: metric -> units the service accepts (the document's validation table; see module docstring).
METRIC_UNITS: Mapping[str, frozenset[str]] = {
    "pressure": frozenset(["m", "mca", "mwc", "psi"]),
    "flow": FLOW_UNITS,
    "level": frozenset(["m", "m3", "m^3", "ft", "ft3", "ft^3"]),
    "status": frozenset([""]),
    "demand": FLOW_UNITS | ENGINE_UNITS,
    "setting": ENGINE_UNITS,
}

Metric = Literal["pressure", "flow", "level", "status", "demand", "setting"]


class QatiumRoute(RouteBase):
    """``series`` -> the Qatium asset id (case-sensitive), metric and unit."""

    asset: str = Field(min_length=1, max_length=200)
    metric: Metric
    unit: str = Field(default="", validate_default=True)

    @field_validator("unit")
    @classmethod
    def _unit_for_metric(cls, unit: str, info: ValidationInfo) -> str:
        metric = info.data.get("metric")
        if metric is None:  # the metric itself was invalid and is reported on its own
            return unit
        allowed = METRIC_UNITS[metric]
        if unit not in allowed:
            if metric == "status":
                raise ValueError("metric 'status' takes no unit: leave unit out")
            listed = ", ".join(sorted(allowed))
            raise ValueError(
                f"unit {unit!r} is not valid for metric {metric!r} (Qatium accepts: {listed})"
            )
        return unit


class QatiumConfig(UplinkConfigBase):
    """``[[uplinks]] type = "qatium"``."""

    type: Literal["qatium"]
    #: The ingest endpoint Qatium gives you (``https://<host>/ingest``).
    url: str = Field(pattern=r"^https?://")
    #: The job APIs' base (``GET <jobs_url>/<job_id>``, ``.../details``). Default
    #: (:meth:`resolved_jobs_url`): ``url`` with its last ``/ingest`` and what follows replaced by
    #: ``/jobs``, or ``url`` + ``/jobs`` when it has no ``/ingest``.
    jobs_url: str | None = Field(default=None, pattern=r"^https?://")
    token: SecretRef
    #: False accepts any certificate (test set-ups only); ``ca_file``: trust only that CA.
    verify_tls: bool = True
    ca_file: Path | None = None
    #: How often and how many times to ask the job status API about rows still pending.
    job_poll_s: float = Field(default=2.0, gt=0)
    job_poll_max: int = Field(default=5, ge=0, le=100)
    routes: list[QatiumRoute] = Field(min_length=1)

    rate_limit_requests: int = Field(default=20, ge=0)
    rate_limit_period_s: float = Field(default=60.0, gt=0)
    batch_max_items: int = Field(default=20_000, ge=1, le=1_000_000)
    batch_max_bytes: int = Field(default=8 << 20, ge=256, le=50_000_000)
    timeout_s: float = Field(default=60.0, gt=0)

    def resolved_jobs_url(self) -> str:
        if self.jobs_url:
            return self.jobs_url.rstrip("/")
        base, sep, _ = self.url.rstrip("/").rpartition("/ingest")
        return f"{base}/jobs" if sep else f"{self.url.rstrip('/')}/jobs"
