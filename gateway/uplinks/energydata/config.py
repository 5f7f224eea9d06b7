"""Energydata.dk uplink: its config model (pure: imports no transport library)."""

from __future__ import annotations

import hashlib
import math
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from gateway.configbase import NAME_PATTERN, RouteBase, SecretRef, Strict, UplinkConfigBase
from gateway.routes import WILDCARD, RouteTable, fill, is_pattern, sample, template_problem

pass


_PART = r"[A-Za-z0-9_.\-]+"
#: The document: "The topic prefix is one string of alphanumerics" (its examples use hyphens).
PREFIX_PATTERN = rf"^{_PART}$"
#: "the suffix can be several alphanumeric strings separated by /".
SUFFIX_PATTERN = rf"^{_PART}(/{_PART})*$"
#: Most values in one multi-value message by default (keeps a message far below any packet limit).
MULTI_MAX_VALUES = 250

Datatype = Literal["double", "integer", "string"]


class EnergydataDataset(Strict):
    """A dataset: its topic prefix and how its readings are published."""

    name: str = Field(pattern=NAME_PATTERN)
    prefix: str = Field(pattern=PREFIX_PATTERN, max_length=200)
    #: "multi": readings sharing a timestamp go in one message on the prefix; "single": one
    #: message per reading on prefix/suffix.
    messages: Literal["multi", "single"] = "multi"


class EnergydataRoute(RouteBase):
    """``series`` -> a datastream: dataset, topic suffix and (for the batch import) its id.

    A pattern route (``series = "u*.r*"``, gateway/routes.py) is a template for many datastreams:
    its ``suffix`` names each one with ``{1}``, ``{2}``... (what each ``*`` matched) or
    ``{series}``, e.g. ``suffix = "unit{1}/reg{2}"``, and must use every capture (or ``{series}``)
    so that two series never share a topic. Its datastreams go to the batch import by topic, so
    it takes no ``datastream`` id.
    """

    dataset: str = Field(min_length=1)
    suffix: str = Field(min_length=1, max_length=200)
    #: The datastream id, used as the CSV column header; without it the full topic is used.
    datastream: int | None = Field(default=None, ge=1)
    datatype: Datatype = "double"

    @model_validator(mode="after")
    def _suffix_shape(self) -> EnergydataRoute:
        stars = self.series.count(WILDCARD)
        problem = template_problem(self.suffix, self.series)
        if problem is not None:
            raise ValueError(f"suffix {self.suffix!r}: {problem}")
        if not re.match(SUFFIX_PATTERN, sample(self.suffix, self.series)):
            raise ValueError(
                f"suffix {self.suffix!r}: one or more parts of A-Z a-z 0-9 _ . - separated by /"
            )
        if stars:
            used = set(re.findall(r"\{(\w+)\}", self.suffix))
            if "series" not in used and not {str(i) for i in range(1, stars + 1)} <= used:
                raise ValueError(
                    f"suffix {self.suffix!r} must use {{series}} or every capture "
                    f"{{1}}..{{{stars}}} of {self.series!r}, or two series would "
                    "share one topic"
                )
            if self.datastream is not None:
                raise ValueError(
                    "a series pattern covers many datastreams: no datastream id "
                    "(its readings are imported by topic)"
                )
        return self


class BackfillConfig(Strict):
    """``[uplinks.backfill]``: send the oldest part of a large or old backlog by batch import."""

    #: The API base; the import endpoints are ``<url>/import...``.
    url: str = Field(default="https://admin.energydata.dk/api/v1", pattern=r"^https?://")
    #: A "batch import data" token; default: the uplink's MQTT token.
    token: SecretRef | None = None
    verify_tls: bool = True
    ca_file: Path | None = None
    older_than_s: float = Field(default=3600.0, gt=0)
    larger_than: int = Field(default=5000, ge=1)
    live_s: float = Field(default=300.0, ge=0)
    min_readings: int = Field(default=500, ge=1)
    #: Per HTTP request.
    timeout_s: float = Field(default=60.0, gt=0)
    #: Longest pause between status polls (they start at 0.1 s and double).
    poll_s: float = Field(default=5.0, gt=0)
    #: Longest wait for validation, and again for ingestion, before giving up (transient).
    max_wait_s: float = Field(default=600.0, gt=0)

    def budget_s(self) -> float:
        """Longest one import may take: two waits plus its requests."""
        return 2 * self.max_wait_s + 8 * self.timeout_s


class EnergydataConfig(UplinkConfigBase):
    """``[[uplinks]] type = "energydata"``."""

    type: Literal["energydata"]
    host: str = Field(default="mqtts.energydata.dk", min_length=1)
    #: Default 8883 with TLS, 1883 without.
    port: int | None = Field(default=None, ge=1, le=65535)
    tls: bool = True
    ca_file: Path | None = None
    token: SecretRef
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    keepalive_s: int = Field(default=60, ge=5, le=65535)
    #: Most unacknowledged publishes at once; well under the broker's 1000-message queue.
    window: int = Field(default=100, ge=1, le=1000)
    #: Most values in one multi-value message.
    multi_max_values: int = Field(default=MULTI_MAX_VALUES, ge=2, le=5000)
    ack_timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=15.0, gt=0)
    datasets: list[EnergydataDataset] = Field(min_length=1)
    routes: list[EnergydataRoute] = Field(min_length=1)
    backfill: BackfillConfig | None = None

    # The shared machinery's knobs, set so the window stays full: a few large batches in flight
    # (one of them may be a backfill import), no request rate limit (the window paces MQTT), and
    # a send guard long enough for an import (MQTT phases have their own timeouts).
    rate_limit_requests: int = Field(default=0, ge=0)
    concurrency: int = Field(default=3, ge=1, le=64)
    batch_max_items: int = Field(default=20_000, ge=1, le=1_000_000)
    batch_max_bytes: int = Field(default=64 << 20, ge=256)
    timeout_s: float = Field(default=1200.0, gt=0)
    backoff_max_s: float = Field(default=120.0, gt=0)

    route_model = EnergydataRoute
    route_patterns = True

    @model_validator(mode="after")
    def _consistent(self) -> EnergydataConfig:
        names = [d.name for d in self.datasets]
        prefixes = [d.prefix for d in self.datasets]
        for what, values in (("dataset names", names), ("dataset prefixes", prefixes)):
            dups = sorted({v for v in values if values.count(v) > 1})
            if dups:
                raise ValueError(f"{what} must be unique, repeated: {', '.join(dups)}")
        by_name = dict(zip(names, self.datasets, strict=True))
        topics: dict[str, str] = {}
        ids: dict[int, str] = {}
        for r in self.routes:
            if r.dataset not in by_name:
                raise ValueError(
                    f"route {r.series!r}: no dataset named {r.dataset!r} "
                    f"(known: {', '.join(names)})"
                )
            if is_pattern(r.series):
                continue  # its topics are known per series (checked against sources at load)
            topic = f"{by_name[r.dataset].prefix}/{r.suffix}"
            if topic in topics:
                raise ValueError(
                    f"routes {topics[topic]!r} and {r.series!r} both publish to topic {topic!r}"
                )
            topics[topic] = r.series
            if r.datastream is not None:
                if r.datastream in ids:
                    raise ValueError(
                        f"routes {ids[r.datastream]!r} and {r.series!r} share "
                        f"datastream {r.datastream}"
                    )
                ids[r.datastream] = r.series
        if self.backfill is not None and 2 * self.backfill.budget_s() > 3 * self.timeout_s:
            # The dispatcher cuts a send at 3 x timeout_s; a send may wait for one import
            # already running and then run its own.
            need = math.ceil(2 * self.backfill.budget_s() / 3)
            raise ValueError(
                f"timeout_s must be at least {need} with this backfill "
                "(2 x (2 x max_wait_s + 8 x timeout_s) <= 3 x timeout_s)"
            )
        return self

    def series_problems(self, produced: Iterable[str]) -> list[tuple[str, str]]:
        """Pattern routes: a topic two series would share, or a suffix that is no topic."""
        if not any(is_pattern(r.series) for r in self.routes):
            return []
        table = RouteTable(self.routes)
        index = {id(r): i for i, r in enumerate(self.routes)}
        wire = WireTable(table, {d.name: d for d in self.datasets})
        topics: dict[str, str] = {}
        out: list[tuple[str, str]] = []
        for series in sorted(produced):
            m = table.match(series)
            if m is None:
                continue
            where = f"routes[{index[id(m[0])]}].suffix"
            prefix, _, suffix, _, problem = wire[series]
            if problem is not None:
                out.append((where, problem))
                continue
            topic = f"{prefix}/{suffix}"
            other = topics.setdefault(topic, series)
            if other != series:
                out.append(
                    (where, f"series {other!r} and {series!r} both publish to topic {topic!r}")
                )
        return out[:20]

    def resolved_port(self) -> int:
        return self.port if self.port is not None else (8883 if self.tls else 1883)

    def resolved_client_id(self) -> str:
        if self.client_id:
            return self.client_id
        try:
            machine = Path("/etc/machine-id").read_text(encoding="ascii").strip()
        except OSError:
            machine = ""
        seed = f"{machine or socket.gethostname()}:{self.name}"
        return "fg" + hashlib.sha256(seed.encode()).hexdigest()[:20]


# Topics: what each routed series is published as (the route table applied to the wire).

#: What building a message needs of a reading's route and dataset, looked up once per reading:
#: (topic prefix, single-value messages?, suffix, datatype, problem). ``problem`` is why the
#: series cannot be published (a pattern's suffix filled with text that is no valid topic part),
#: else None.
WireEntry = tuple[str, bool, str, Datatype, str | None]


class WireTable(dict[str, WireEntry]):
    """series -> :data:`WireEntry`: exact routes up front, a pattern's series when first seen.

    Memory stays with the routes as configured: one entry per series actually published, not a
    route object per series.
    """

    def __init__(
        self, routes: RouteTable[EnergydataRoute], datasets: Mapping[str, EnergydataDataset]
    ) -> None:
        super().__init__()
        self._table = routes
        self._datasets = datasets
        for series, r in routes.exact.items():
            self[series] = self._entry(series, r, ())

    def __missing__(self, series: str) -> WireEntry:
        m = self._table.match(series)
        if m is None:
            raise KeyError(series)
        entry = self[series] = self._entry(series, *m)
        return entry

    def _entry(self, series: str, r: EnergydataRoute, captures: Sequence[str]) -> WireEntry:
        ds = self._datasets[r.dataset]
        suffix = fill(r.suffix, series, captures)
        problem = None
        if captures and (len(suffix) > 200 or not re.match(SUFFIX_PATTERN, suffix)):
            problem = (
                f"series {series!r} makes topic suffix {suffix!r} from {r.suffix!r}: "
                "not alphanumeric parts separated by /"
            )
        return (ds.prefix, ds.messages == "single", suffix, r.datatype, problem)

    def header(self, series: str) -> str:
        """The batch import's column header: the datastream id, else the full topic."""
        datastream = self._table[series].datastream
        prefix, _, suffix, _, _ = self[series]
        return str(datastream) if datastream is not None else f"{prefix}/{suffix}"


def wire_table(
    routes: Mapping[str, EnergydataRoute] | RouteTable[EnergydataRoute],
    datasets: Mapping[str, EnergydataDataset],
) -> WireTable:
    table = routes if isinstance(routes, RouteTable) else RouteTable(routes.values())
    return WireTable(table, datasets)
