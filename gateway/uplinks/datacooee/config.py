"""Datacooee uplink: its config model (pure: imports no transport library)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import quote

from pydantic import Field, field_validator

from gateway.configbase import RouteBase, SecretRef, UplinkConfigBase

pass


PATH = "/api/external/v1/inputs/{input_pk}/inputdata/"


class DatacooeeRoute(RouteBase):
    """``series`` -> the Datacooee input id (``input_pk``, e.g. ``senxxxxxxxxxx``)."""

    # URL-safe characters only: the id is a path segment and must not be able to change the path.
    input_pk: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._~\-]+$")
    #: How a boolean reading is written: "number" -> "1"/"0", "text" -> "true"/"false".
    booleans: Literal["number", "text"] = "number"


class DatacooeeConfig(UplinkConfigBase):
    """``[[uplinks]] type = "datacooee"``."""

    type: Literal["datacooee"]
    #: The service's base URL, without the API path.
    url: str = Field(default="https://cloud.mydata.management", pattern=r"^https?://")
    #: The Organisation ID from Datacooee's settings (an identifier, sent as a header).
    organization_id: str = Field(min_length=1, max_length=500, pattern=r"^[\x21-\x7e]+$")
    #: The Organisation API Key.
    api_key: SecretRef
    verify_tls: bool = True
    ca_file: Path | None = None
    routes: list[DatacooeeRoute] = Field(min_length=1)

    # One reading per request (the API has no batch form); throughput comes from concurrency.
    batch_max_items: int = Field(default=1, ge=1)
    batch_max_bytes: int = Field(default=64 * 1024, ge=1024)
    rate_limit_requests: int = Field(default=60, ge=0)
    rate_limit_period_s: float = Field(default=60.0, gt=0)
    concurrency: int = Field(default=2, ge=1, le=16)
    timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("batch_max_items")
    @classmethod
    def _one_per_request(cls, v: int) -> int:
        if v != 1:
            raise ValueError(
                "Datacooee takes one reading per request: leave batch_max_items at 1 "
                "and raise concurrency or rate_limit_requests for more throughput"
            )
        return v

    def endpoint(self, input_pk: str) -> str:
        return self.url.rstrip("/") + PATH.format(input_pk=quote(input_pk, safe=""))
