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
:mod:`gateway.uplinks.energydata.mqtt` for the connection, the window and how a not-authorised
disconnect is recognised.

Backfill (section 4): with ``[uplinks.backfill]`` configured, the oldest part of a large or old
backlog goes through the batch import API instead (CSV, create, upload URL, PUT, validate, ingest;
:mod:`gateway.uplinks.energydata.csvimport`) while newer readings of the same batch are published
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
import time
from collections.abc import Awaitable, Hashable, Sequence
from itertools import repeat
from operator import add, attrgetter, itemgetter

import structlog

from gateway.configbase import Secret
from gateway.models import StoredReading
from gateway.routes import RouteTable
from gateway.uplinks.base import SendResult, Settle
from gateway.uplinks.energydata.config import (
    EnergydataConfig,
    EnergydataRoute,
    WireTable,
)
from gateway.uplinks.energydata.csvimport import ImportBatcher
from gateway.uplinks.energydata.messages import build_messages, merge_results, value_problem
from gateway.uplinks.energydata.mqtt import WindowedPublisher

log = structlog.get_logger(__name__)
_SERIES = attrgetter("series")
_TS = attrgetter("ts")
_VALUE = attrgetter("value")
_SUFFIX = itemgetter(2)
_PROBLEM = itemgetter(4)


async def _settle_nothing(result: SendResult) -> None:
    return None


class EnergydataUplink:
    """The Energydata.dk plugin: one long-lived MQTT connection plus the optional backfill."""

    def __init__(
        self, cfg: EnergydataConfig, token: Secret, import_token: Secret | None = None
    ) -> None:
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
            self._publisher = WindowedPublisher(self.cfg, self._token)
        return self._publisher

    @property
    def importer(self) -> ImportBatcher | None:
        """The backfill side, or None when no ``[uplinks.backfill]`` is configured."""
        if self._importer is None and self.cfg.backfill is not None:
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

    # -- the same, a lease at a time (ChecksInBulk) ----------------------------------------------

    def check_all(self, items: Sequence[StoredReading]) -> dict[int, str]:
        # The usual lease: every series' route sound, every value an int, every timestamp after
        # 1970 (what ``check`` passes first). Checked column by column; anything else, per item.
        entries = map(self._wire.__getitem__, map(_SERIES, items))
        if (
            items
            and not any(map(_PROBLEM, entries))
            and set(map(type, map(_VALUE, items))) == {int}
            and min(map(_TS, items)) > 0
        ):
            return {}
        return {i.id: reason for i in items if (reason := self.check(i)) is not None}

    def sizes(self, items: Sequence[StoredReading]) -> list[int]:
        suffixes = map(_SUFFIX, map(self._wire.__getitem__, map(_SERIES, items)))
        return list(map(add, repeat(48), map(len, suffixes)))

    def group_keys(self, items: Sequence[StoredReading]) -> list[Hashable] | None:
        return None

    def split(
        self, batch: Sequence[StoredReading], now_ms: int | None = None
    ) -> tuple[list[StoredReading], list[StoredReading]]:
        """(for the batch import, for MQTT) per the module docstring's rules."""
        bf = self.cfg.backfill
        if bf is None:
            return [], list(batch)
        now = int(time.time() * 1000) if now_ms is None else now_ms
        live_before = now - int(bf.live_s * 1000)
        old_before = now - int(bf.older_than_s * 1000)
        wire = self._wire
        candidates = [r for r in batch if r.ts < live_before and wire[r.series][3] != "string"]
        chosen = (
            candidates
            if len(candidates) >= bf.larger_than
            else [r for r in candidates if r.ts < old_before]
        )
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
        log.info("energydata_backfill", uplink=self.name, readings=len(backfill), live=len(live))

        async def part(run: Awaitable[SendResult]) -> SendResult:
            result = await run
            if result.delivered or result.rejected:
                await settle(SendResult(delivered=result.delivered, rejected=result.rejected))
            return result

        # Both at once: the live part is published while the import runs.
        async with asyncio.TaskGroup() as tg:
            imp = tg.create_task(part(importer.submit(backfill)), name=f"uplink:{self.name}:import")
            pub = tg.create_task(part(self._publish(live)), name=f"uplink:{self.name}:publish")
        return merge_results([pub.result(), imp.result()])

    async def _publish(self, items: Sequence[StoredReading]) -> SendResult:
        if not items:
            return SendResult()
        messages = build_messages(
            items, self._routes, self._datasets, self._wire, self.cfg.multi_max_values
        )
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
