"""Energydata.dk uplink (shared/seeds/001_cde586ca57cf75ff.txt): MQTT live, batch import backfill.

Wire contract, MQTT (document section 3): MQTT 3.1.1 over TLS (``mqtts.energydata.dk:8883``), the
token as username (no password, as in the document's examples), QoS 1. A datastream's topic is
``<dataset prefix>/<suffix>``. Single-value message on that topic::

    {"timestamp": 1521797973469, "value": 14.47}

Multi-value message on the bare prefix, grouping readings of one dataset that share a timestamp::

    {"timestamp": 1521797973469, "value": {"my/topic/suffix1": 14.47, "my/topic/suffix2": 34}}

Backpressure (3.6): the broker queues at most 1000 messages per client and drops what overflows,
so at most ``window`` publishes are unacknowledged at any time (default 100), shared by every
concurrent send; a reading is delivered only once its PUBACK arrived. See
:mod:`gateway.uplinks.energydata_mqtt` for the connection, the window and how a not-authorised
disconnect is recognised.

Backfill (section 4): with ``[uplinks.backfill]`` configured, the oldest part of a large or old
backlog goes through the batch import API instead (CSV, create, upload URL, PUT, validate, ingest;
:mod:`gateway.uplinks.energydata_import`) while newer readings of the same batch are published
over MQTT at the same time. Within one ``send``:

* candidates: readings older than ``live_s`` on numeric datastreams (text never goes by CSV: an
  empty cell of a string column imports an empty string, so a sparse row would invent values);
* the candidates older than ``older_than_s`` go by import, or all candidates once the batch holds
  at least ``larger_than`` of them (the batch is that large only when the backlog is);
* fewer than ``min_readings`` readings never make an import (MQTT is cheaper for a handful).

Choices where the document is silent, written down:

* **Values** by the route's ``datatype`` ("double" default, "integer", "string"): booleans go as
  1/0 on numeric datastreams; an integer datastream takes whole numbers only; text on a numeric
  datastream, NaN and infinities are dead-lettered locally with the reason. A string datastream
  takes the value's text (booleans as ``true``/``false``).
* **Multi-value** is the default where it applies (two or more readings of one dataset with the
  same timestamp); a message that would carry one value goes in the single-value form. A
  multi-value message carries at most ``multi_max_values`` values (default 250, about 6 KB:
  a 125-register logger's poll in one message, far below any packet limit) and never one suffix
  twice (a duplicate reading goes in the next message).
* **Client id**: ``client_id`` or, by default, ``fg`` + 20 hex digits of a hash of the machine id
  (``/etc/machine-id``, else the host name) and the uplink name: stable across restarts, unique
  across a fleet (two clients with one id would keep disconnecting each other).
* **TLS**: on by default, verifying the broker's certificate and host name against the system CA
  store, or only against ``ca_file`` when given. ``tls = false`` (plain TCP) is for local brokers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import socket
import time
from collections.abc import Awaitable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import structlog
from pydantic import Field, model_validator

from gateway.configbase import NAME_PATTERN, RouteBase, Secret, SecretRef, Strict, UplinkConfigBase
from gateway.models import StoredReading, Value
from gateway.routes import WILDCARD, RouteTable, fill, is_pattern, sample, template_problem
from gateway.uplinks.base import Failure, Outcome, SendResult, Settle

if TYPE_CHECKING:
    from gateway.uplinks.energydata_import import ImportBatcher
    from gateway.uplinks.energydata_mqtt import WindowedPublisher

log = structlog.get_logger(__name__)

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
            raise ValueError(f"suffix {self.suffix!r}: one or more parts of A-Z a-z 0-9 _ . - "
                             "separated by /")
        if stars:
            used = set(re.findall(r"\{(\w+)\}", self.suffix))
            if "series" not in used and not {str(i) for i in range(1, stars + 1)} <= used:
                raise ValueError(f"suffix {self.suffix!r} must use {{series}} or every capture "
                                 f"{{1}}..{{{stars}}} of {self.series!r}, or two series would "
                                 "share one topic")
            if self.datastream is not None:
                raise ValueError("a series pattern covers many datastreams: no datastream id "
                                 "(its readings are imported by topic)")
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
                raise ValueError(f"route {r.series!r}: no dataset named {r.dataset!r} "
                                 f"(known: {', '.join(names)})")
            if is_pattern(r.series):
                continue  # its topics are known per series (checked against sources at load)
            topic = f"{by_name[r.dataset].prefix}/{r.suffix}"
            if topic in topics:
                raise ValueError(f"routes {topics[topic]!r} and {r.series!r} both publish to "
                                 f"topic {topic!r}")
            topics[topic] = r.series
            if r.datastream is not None:
                if r.datastream in ids:
                    raise ValueError(f"routes {ids[r.datastream]!r} and {r.series!r} share "
                                     f"datastream {r.datastream}")
                ids[r.datastream] = r.series
        if self.backfill is not None and 2 * self.backfill.budget_s() > 3 * self.timeout_s:
            # The dispatcher cuts a send at 3 x timeout_s; a send may wait for one import
            # already running and then run its own.
            need = math.ceil(2 * self.backfill.budget_s() / 3)
            raise ValueError(f"timeout_s must be at least {need} with this backfill "
                             "(2 x (2 x max_wait_s + 8 x timeout_s) <= 3 x timeout_s)")
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
                out.append((where, f"series {other!r} and {series!r} both publish to topic "
                                   f"{topic!r}"))
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


# ----------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publish and the readings it carries (delivered together on its PUBACK)."""

    topic: str
    payload: bytes
    ids: tuple[int, ...]


def wire_value(value: Value, datatype: Datatype) -> int | float | str:
    """The JSON value for a datastream of ``datatype`` (call :func:`value_problem` first)."""
    if datatype == "string":
        if isinstance(value, str):
            return value
        return json.dumps(value)  # true/false, 12, 1.5
    if isinstance(value, bool):
        return int(value)
    if datatype == "integer" and isinstance(value, float):
        return int(value)
    assert not isinstance(value, str)
    return value


def value_problem(value: Value | None, datatype: Datatype) -> str | None:
    """Why ``value`` cannot go to a datastream of ``datatype``, or None."""
    if value is None:
        return "missing value"
    if isinstance(value, float) and not math.isfinite(value):
        return f"value {value!r} is not a finite number"
    if datatype == "string":
        return None
    if isinstance(value, str):
        return f"datastream type is {datatype}, got text {value[:40]!r}"
    if datatype == "integer" and isinstance(value, float) and not value.is_integer():
        return f"datastream type is integer, got {value!r}"
    return None


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _payload(ts: int, value: object) -> bytes:
    return _JSON.encode({"timestamp": ts, "value": value}).encode()


def _group_message(prefix: str, ts: int, suffixes: list[str],
                   values: list[int | float | str], ids: list[int]) -> Message:
    """One message of a dataset's readings sharing ``ts`` (distinct suffixes)."""
    if len(ids) == 1:
        # One value: the single-value form on the datastream's own topic.
        return Message(f"{prefix}/{suffixes[0]}", _payload(ts, values[0]), (ids[0],))
    return Message(prefix, _payload(ts, dict(zip(suffixes, values, strict=True))), tuple(ids))


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

    def __init__(self, routes: RouteTable[EnergydataRoute],
                 datasets: Mapping[str, EnergydataDataset]) -> None:
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
            problem = (f"series {series!r} makes topic suffix {suffix!r} from {r.suffix!r}: "
                       "not alphanumeric parts separated by /")
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


def build_messages(
    batch: Sequence[StoredReading],
    routes: Mapping[str, EnergydataRoute] | RouteTable[EnergydataRoute],
    datasets: Mapping[str, EnergydataDataset],
    wire: WireTable | None = None,
    max_values: int = MULTI_MAX_VALUES,
) -> list[Message]:
    """The messages for ``batch`` in the order of their first reading (see module docstring).

    Every reading of ``batch`` is in exactly one message. Routes must exist for every series.
    ``wire`` is :func:`wire_table` of ``routes`` and ``datasets``, if the caller keeps one.
    """
    if wire is None:
        wire = wire_table(routes, datasets)
    singles: list[tuple[int, Message]] = []
    # Per (prefix, timestamp): the suffixes, values and ids of its readings, in batch order.
    groups: dict[tuple[str, int], tuple[list[str], list[int | float | str], list[int]]] = {}
    first: dict[tuple[str, int], int] = {}
    last: tuple[str, int] | None = None
    unused: tuple[list[str], list[int | float | str], list[int]] = ([], [], [])
    add_suffix, add_value, add_id = unused[0].append, unused[1].append, unused[2].append
    for pos, r in enumerate(batch):
        prefix, single, suffix, datatype, _ = wire[r.series]
        value = r.value
        kind = type(value)
        # Ints go as they are to any numeric datastream, floats to a double one; the rest (bools,
        # text, floats for integer datastreams, anything for string ones) is converted.
        if not ((kind is int and datatype != "string") or (kind is float and datatype == "double")):
            value = wire_value(value, datatype)
        ts = r.ts
        if single:
            singles.append((pos, Message(f"{prefix}/{suffix}", _payload(ts, value), (r.id,))))
            continue
        if last is None or ts != last[1] or prefix != last[0]:
            # A poll's readings come together: the group changes rarely within a batch.
            last = (prefix, ts)
            group = groups.get(last)
            if group is None:
                group = groups[last] = ([], [], [])
                first[last] = pos
            add_suffix, add_value, add_id = group[0].append, group[1].append, group[2].append
        add_suffix(suffix)
        add_value(value)
        add_id(r.id)
    out = singles
    for key, (suffixes, values, ids) in groups.items():
        prefix, ts = key
        at = first[key]
        if len(set(suffixes)) == len(suffixes):
            # No suffix twice (the usual case): consecutive slices of max_values.
            for lo in range(0, len(ids), max_values):
                hi = lo + max_values
                out.append((at, _group_message(prefix, ts, suffixes[lo:hi], values[lo:hi],
                                               ids[lo:hi])))
            continue
        pending = list(zip(suffixes, values, ids, strict=True))
        while pending:
            taken: dict[str, int | float | str] = {}
            taken_ids: list[int] = []
            later: list[tuple[str, int | float | str, int]] = []
            for suffix, value, rid in pending:
                if suffix in taken or len(taken) >= max_values:
                    later.append((suffix, value, rid))
                    continue
                taken[suffix] = value
                taken_ids.append(rid)
            out.append((at, _group_message(prefix, ts, list(taken), list(taken.values()),
                                           taken_ids)))
            pending = later
    out.sort(key=lambda pm: pm[0])  # stable: a group's messages keep their order
    return [m for _, m in out]


# ----------------------------------------------------------------------------------------------
# The plugin


_SEVERITY = {Outcome.AUTH: 0, Outcome.TRANSIENT: 1, Outcome.TOO_LARGE: 2, Outcome.REJECTED: 3}


def merge_results(results: Sequence[SendResult]) -> SendResult:
    """One result from the MQTT part and the import part of a batch.

    The remaining items share one failure, the most conservative one: auth keeps everything and
    pauses, transient keeps everything; only when nothing worse happened does too-large split or
    an unidentified rejection bisect.
    """
    delivered: list[int] = []
    rejected: dict[int, str] = {}
    failures: list[Failure] = []
    for r in results:
        delivered.extend(r.delivered)
        rejected.update(r.rejected)
        if r.failure is not None:
            failures.append(r.failure)
    failure = min(failures, key=lambda f: _SEVERITY.get(f.outcome, 1)) if failures else None
    return SendResult(delivered=delivered, rejected=rejected, failure=failure)


async def _settle_nothing(result: SendResult) -> None:
    return None


class EnergydataUplink:
    """The Energydata.dk plugin: one long-lived MQTT connection plus the optional backfill."""

    def __init__(self, cfg: EnergydataConfig, token: Secret,
                 import_token: Secret | None = None) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._token = token
        self._import_token = import_token or token
        self._routes = RouteTable(cfg.routes)
        self._datasets = {d.name: d for d in cfg.datasets}
        self._wire = WireTable(self._routes, self._datasets)
        self._publisher: WindowedPublisher | None = None
        self._importer: ImportBatcher | None = None

    @property
    def routes(self) -> RouteTable[EnergydataRoute]:
        return self._routes

    @property
    def wire(self) -> WireTable:
        return self._wire

    @property
    def publisher(self) -> WindowedPublisher:
        """The MQTT side (created on first use; holds the connection and its counters)."""
        if self._publisher is None:
            from gateway.uplinks.energydata_mqtt import WindowedPublisher

            self._publisher = WindowedPublisher(self.cfg, self._token)
        return self._publisher

    @property
    def importer(self) -> ImportBatcher | None:
        """The backfill side, or None when no ``[uplinks.backfill]`` is configured."""
        if self._importer is None and self.cfg.backfill is not None:
            from gateway.uplinks.energydata_import import ImportBatcher

            self._importer = ImportBatcher(self.cfg, self._import_token)
        return self._importer

    async def aclose(self) -> None:
        publisher, self._publisher = self._publisher, None
        importer, self._importer = self._importer, None
        if publisher is not None:
            await publisher.aclose()
        if importer is not None:
            await importer.aclose()

    # -- the plugin contract ---------------------------------------------------------------------

    def check(self, item: StoredReading) -> str | None:
        w = self._wire[item.series]
        if w[4] is not None:
            return w[4]
        if type(item.value) is int and item.ts > 0:
            return None  # an int suits every datatype (a string datastream takes its text)
        if item.ts <= 0:
            return f"timestamp {item.ts} is not after 1970"
        return value_problem(item.value, w[3])

    def group_key(self, item: StoredReading) -> Hashable:
        return None  # a batch may mix datasets: every message names its own topic

    def item_size(self, item: StoredReading) -> int:
        return 48 + len(self._wire[item.series][2])

    def split(self, batch: Sequence[StoredReading], now_ms: int | None = None
              ) -> tuple[list[StoredReading], list[StoredReading]]:
        """(for the batch import, for MQTT) per the module docstring's rules."""
        bf = self.cfg.backfill
        if bf is None:
            return [], list(batch)
        now = int(time.time() * 1000) if now_ms is None else now_ms
        live_before = now - int(bf.live_s * 1000)
        old_before = now - int(bf.older_than_s * 1000)
        wire = self._wire
        candidates = [r for r in batch
                      if r.ts < live_before and wire[r.series][3] != "string"]
        chosen = (candidates if len(candidates) >= bf.larger_than
                  else [r for r in candidates if r.ts < old_before])
        if len(chosen) < bf.min_readings:
            return [], list(batch)
        picked = {r.id for r in chosen}
        return chosen, [r for r in batch if r.id not in picked]

    async def send(self, batch: Sequence[StoredReading]) -> SendResult:
        return await self.send_settling(batch, _settle_nothing)

    async def send_settling(self, batch: Sequence[StoredReading], settle: Settle) -> SendResult:
        """Publish the live part over MQTT while the backfill part is imported; each part's
        outcome is settled as soon as that part ends (:class:`~gateway.uplinks.base.SettlesEarly`),
        so readings PUBACKed during a long import are recorded at once, not after it."""
        backfill, live = self.split(batch)
        if not backfill:
            return await self._publish(live)
        importer = self.importer
        assert importer is not None
        log.info("energydata_backfill", uplink=self.name, readings=len(backfill),
                 live=len(live))

        async def part(run: Awaitable[SendResult]) -> SendResult:
            result = await run
            if result.delivered or result.rejected:
                await settle(SendResult(delivered=result.delivered, rejected=result.rejected))
            return result

        # Both at once: the live part is published while the import runs.
        async with asyncio.TaskGroup() as tg:
            imp = tg.create_task(part(importer.submit(backfill)),
                                 name=f"uplink:{self.name}:import")
            pub = tg.create_task(part(self._publish(live)), name=f"uplink:{self.name}:publish")
        return merge_results([pub.result(), imp.result()])

    async def _publish(self, items: Sequence[StoredReading]) -> SendResult:
        if not items:
            return SendResult()
        messages = build_messages(items, self._routes, self._datasets, self._wire,
                                  self.cfg.multi_max_values)
        acked, failure = await self.publisher.publish(messages)
        return SendResult(delivered=[i for m in acked for i in m.ids], failure=failure)

    def resume_now(self) -> None:
        """Try refused topics and a lost connection again at the next send (pair it with the
        runner's ``resume_now``: an operator's nudge after fixing the token's permissions)."""
        if self._publisher is not None:
            self._publisher.forgive()

    def status(self) -> dict[str, object]:
        """Counters for tests, benchmarks and /status (no secrets)."""
        out: dict[str, object] = {}
        if self._publisher is not None:
            out["mqtt"] = self._publisher.status()
        if self._importer is not None:
            out["backfill"] = self._importer.status()
        return out
