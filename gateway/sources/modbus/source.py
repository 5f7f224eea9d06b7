"""The Modbus source: polls register maps over TCP, RTU (RS-485) and RTU-over-TCP.

Config models live in :mod:`gateway.sources.modbus.config` and are re-exported here; the pure
codec and read planner in :mod:`gateway.sources.modbus.decode`; the pymodbus boundary in
:mod:`gateway.sources.modbus.link`. Importing this module does not import pymodbus.

What a caller may rely on:

* ``run`` owns one task per connection (``modbus:<source>:<connection>``) inside a TaskGroup.
  Devices on one connection (one RS-485 bus, one TCP peer) are polled one transaction at a time
  under the connection's lock, with the inter-frame gap kept; connections poll in parallel.
* Each device is polled on deadline-based ticks (``interval_s``; a late poll skips the missed
  ticks, it never bursts). All devices are read at start; from the second poll on, the devices
  of one connection are spread evenly over their interval (device k of n shifted by k/n of it),
  so the link, the store and the uplinks see a steady flow rather than one burst per interval.
  Its fields are read in as few requests as the limits allow; the plan is logged
  (``modbus_plan``). A request whose fields are all plain uint16 registers (no scale, offset or
  deadband) skips decoding: the register is the value.
* A reading's ``ts`` is taken when its response arrived; scale and offset are applied; values
  that are not finite are counted in ``stats.rejected`` and never emitted; nothing is emitted for
  a request that got no valid answer. Fields with a deadband are reported on change (and every
  ``heartbeat_s``).
* Readings carry no position: the app's ``positioned_emit`` adds the fixed ``position`` or the
  ``position_from`` GPS fix.
* Faults are counted per device in ``stats.detail["devices"]``. A device that fails
  ``degraded_after`` polls in a row is polled every ``degraded_interval_s`` (state ``degraded``)
  until it answers. A timeout ends the device's cycle, so a dead unit costs one timeout per poll.
  A request refused with an exception response is split until the refusing field is found; that
  field is marked failing (``failing_fields``), re-tried alone every ``failing_retry_s``, and the
  rest of the map keeps polling.
* A lost connection (or a TCP peer whose transaction ids fall out of step, or one that stops
  answering entirely) is closed and reopened with capped, jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from pathlib import Path
from typing import Any

import structlog

from gateway.backoff import Backoff
from gateway.errors import ConfigError
from gateway.models import Reading, ReadingBatch, Value, value_problem
from gateway.probe import ProbeFailure, ProbeReport
from gateway.sources.base import Emit, SourceStats
from gateway.sources.modbus.config import (
    PROFILE_BASE_DIR,
    FieldTemplate,
    ModbusDeviceConfig,
    ModbusFieldConfig,
    ModbusProfile,
    ModbusSourceConfig,
    load_profile,
    resolve_profile_path,
)
from gateway.sources.modbus.decode import (
    BIT_TABLES,
    ReadRequest,
    Span,
    Table,
    plan_reads,
    words_to_bytes,
)
from gateway.sources.modbus.link import (
    EXCEPTION_NAMES,
    LinkDown,
    LinkParams,
    ModbusLink,
    ReadFailed,
    ReadOk,
    ReadRefused,
)

__all__ = [
    "PROFILE_BASE_DIR",
    "ModbusDeviceConfig",
    "ModbusFieldConfig",
    "ModbusProfile",
    "ModbusSource",
    "ModbusSourceConfig",
    "load_profile",
    "resolve_profile_path",
]

log = structlog.get_logger(__name__)

#: Exception responses that blame the request (an address or function), not the device: the
#: request is split to find the field responsible. Busy, acknowledge and gateway errors are not.
SPLIT_CODES = frozenset({1, 2, 3, 4})
#: Failures after which the rest of a device's cycle is skipped (the bus is better spent on others).
_ABORTING = frozenset({"timeout", "tid_out_of_step"})


@dataclass(slots=True)
class _FieldState:
    """What the source remembers of one field of one device. Most fields need none of it, so it
    exists only for a field that was reported with a deadband, failed, or had a value rejected
    (``_Device.field_states``)."""

    last_value: Value | None = None
    last_ts: int = 0
    failing_code: int | None = None
    retry_at: float = 0.0
    problem: str | None = None
    problem_logged: bool = False

    def wants(self, f: FieldTemplate, value: Value, ts: int) -> bool:
        """Report-by-exception: should this value of ``f`` be emitted?"""
        db = f.deadband
        last = self.last_value
        if db is None or last is None:
            return True
        if f.heartbeat_s is not None and ts - self.last_ts >= f.heartbeat_s * 1000:
            return True
        numeric = not isinstance(value, bool | str) and not isinstance(last, bool | str)
        if numeric:
            return abs(float(value) - float(last)) > db if db > 0 else value != last
        return value != last


@dataclass(slots=True)
class _Device:
    cfg: ModbusDeviceConfig
    #: The register map (shared with every device of the same profile) and, per field, the
    #: series it reports as (this device's own names).
    fields: tuple[FieldTemplate, ...]
    series: tuple[str, ...]
    timeout: float
    limits: dict[str, int]
    detail: dict[str, Any]
    #: Plans shared by the devices of one source with the same map and limits (never mutated).
    plans: dict[tuple[object, ...], list[ReadRequest]]
    state: str = "starting"
    next_due: float = 0.0
    #: Fraction of its interval this device's polls are shifted by after the first one, so the
    #: devices of one connection are spread over the interval instead of polled in one burst.
    stagger: float = 0.0
    consecutive_failures: int = 0
    loud: bool = False
    plan: list[ReadRequest] = field(default_factory=list)
    breaks: dict[Table, set[int]] = field(default_factory=dict)
    #: Per request (its field indexes): its series and how to pick their values when every
    #: field of it is a plain uint16 (no byte swap, scale, offset or deadband), whose value is
    #: the register itself; None when a field needs decoding. Filled on first use, cleared by
    #: replan().
    plain: dict[tuple[int, ...], _Plain | None] = field(default_factory=dict)
    #: Per field index, for the few fields that need it: see _FieldState.
    field_states: dict[int, _FieldState] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def interval(self) -> float:
        if self.state == "degraded":
            return max(self.cfg.degraded_interval_s, self.cfg.interval_s)
        return self.cfg.interval_s

    def field_state(self, i: int) -> _FieldState:
        st = self.field_states.get(i)
        if st is None:
            st = self.field_states[i] = _FieldState()
        return st

    def failing(self) -> list[int]:
        """The failing fields, in map order."""
        return sorted(i for i, st in self.field_states.items() if st.failing_code is not None)

    def replan(self, source: str) -> None:
        self.plain.clear()
        failing = self.failing()
        # Without learned breaks or failing fields the plan depends on the map and the limits
        # only: devices of one profile share it.
        key = None
        if not failing and not self.breaks:
            key = (self.fields, self.cfg.coalesce, *self.limits.values())
        plan = self.plans.get(key) if key is not None else None
        if plan is None:
            plan = self._plan(failing)
            if key is not None:
                self.plans[key] = plan
        self.plan = plan
        self.detail["requests_per_poll"] = len(self.plan)
        self.detail["failing_fields"] = sorted(self.series[i] for i in failing)
        log.info(
            "modbus_plan",
            source=source,
            device=self.name,
            fields=len(self.fields),
            requests=len(self.plan),
            failing=len(failing),
            plan=[r.describe() for r in self.plan],
        )

    def _plan(self, failing: list[int]) -> list[ReadRequest]:
        spans = [Span(f.table, f.address, f.count) for f in self.fields]
        # No read may span a failing field: break right after it (fields before it end there).
        breaks = {t: set(b) for t, b in self.breaks.items()}
        for i in failing:
            breaks.setdefault(spans[i].table, set()).add(spans[i].end)
        return plan_reads(
            spans,
            max_gap=self.limits["max_gap"],
            max_bit_gap=self.limits["max_bit_gap"],
            max_registers=self.limits["max_registers"],
            max_bits=self.limits["max_bits"],
            breaks=breaks,
            skip=failing,
            coalesce=self.cfg.coalesce,
        )

    def count(self, key: str, n: int = 1) -> None:
        self.detail[key] = self.detail.get(key, 0) + n


@dataclass(slots=True)
class _Conn:
    link: ModbusLink
    devices: list[_Device]
    backoff: Backoff
    detail: dict[str, Any]
    silent: int = 0
    loud: bool = False


@dataclass(frozen=True, slots=True)
class _Plain:
    """A request whose fields are all plain uint16 registers: their series, and how to pick
    their values out of the registers read (a slice when they are contiguous, the usual case)."""

    series: tuple[str, ...]
    pick: Callable[[Sequence[Any]], Sequence[Any]]


#: ``values[lo:lo + n]`` per (lo, n), shared by every request that picks that slice.
_SLICES: dict[tuple[int, int], Callable[[Sequence[Any]], Sequence[Any]]] = {}


def _plain_pairs(dev: _Device, idxs: Sequence[int], base: int) -> _Plain | None:
    fields = dev.fields
    ats: list[int] = []
    for i in idxs:
        f = fields[i]
        if not f.plain:
            return None
        ats.append(f.address - base)
    # One request for the whole map (the usual case) shares the device's own series tuple.
    whole = len(idxs) == len(fields) and all(i == k for k, i in enumerate(idxs))
    series = dev.series if whole else tuple(dev.series[i] for i in idxs)
    lo, n = ats[0], len(ats)
    if ats == list(range(lo, lo + n)):
        pick = _SLICES.get((lo, n))
        if pick is None:
            pick = _SLICES[lo, n] = itemgetter(slice(lo, lo + n))
        return _Plain(series, pick)
    if n == 1:
        return _Plain(series, lambda values: [values[lo]])
    getter = itemgetter(*ats)
    return _Plain(series, lambda values: list(getter(values)))


def _one_batch(parts: list[ReadingBatch]) -> Sequence[Reading]:
    """A cycle's readings as one emit: its one batch (one request, the usual case), the batches
    of one instant joined, or readings one by one when its requests answered at different
    instants."""
    if len(parts) == 1:
        return parts[0]
    ts, q = parts[0].ts, parts[0].quality
    if all(p.ts == ts and p.quality == q for p in parts):
        series = tuple(chain.from_iterable(p.series for p in parts))
        return ReadingBatch(series, ts, list(chain.from_iterable(p.values for p in parts)), q)
    return list(chain.from_iterable(parts))


def _inter_frame_s(cfg: ModbusSourceConfig) -> float:
    if cfg.inter_frame_delay_ms is not None:
        return cfg.inter_frame_delay_ms / 1000
    if cfg.transport != "rtu":
        return 0.0
    # 3.5 character times of 11 bits; the spec fixes 1.75 ms above 19200 baud.
    return max(3.5 * 11 / cfg.baudrate, 0.00175)


class ModbusSource:
    """A Source polling every device of one ``type = "modbus"`` config entry (see module doc)."""

    def __init__(self, cfg: ModbusSourceConfig, base_dir: Path) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.stats = SourceStats()
        self._closed = False
        devices_detail: dict[str, Any] = {}
        conns_detail: dict[str, Any] = {}
        self.stats.detail.update(devices=devices_detail, connections=conns_detail)
        self._conns: list[_Conn] = []
        self._plans: dict[tuple[object, ...], list[ReadRequest]] = {}
        by_label: dict[str, list[ModbusDeviceConfig]] = {}
        for d in cfg.devices:
            by_label.setdefault(cfg.connection_label(d), []).append(d)
        for label, devs in by_label.items():
            first = devs[0]
            timeouts = [d.timeout_s or cfg.timeout_s for d in devs]
            params = LinkParams(
                transport=cfg.transport,
                host=first.host or cfg.host,
                port=first.port or cfg.port,
                serial_port=first.serial_port or cfg.serial_port,
                baudrate=cfg.baudrate,
                parity=cfg.parity,
                stopbits=cfg.stopbits,
                bytesize=cfg.bytesize,
                local_echo=cfg.local_echo,
                connect_timeout_s=cfg.connect_timeout_s,
                max_timeout_s=max(timeouts),
                inter_frame_delay_s=_inter_frame_s(cfg),
            )
            cdetail: dict[str, Any] = {
                "state": "starting",
                "connects": 0,
                "connect_failures": 0,
                "disconnects": 0,
                "tid_resyncs": 0,
                "last_error": None,
            }
            conns_detail[label] = cdetail
            built = [self._build_device(d, label, base_dir, devices_detail) for d in devs]
            backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
            self._conns.append(_Conn(ModbusLink(label, params), built, backoff, cdetail))

    def _build_device(
        self, d: ModbusDeviceConfig, label: str, base_dir: Path, detail: dict[str, Any]
    ) -> _Device:
        try:
            fmap = d.field_map(base_dir)
        except ValueError as exc:
            raise ConfigError([(f"sources.{self.name}.devices.{d.name}", str(exc))]) from None
        prof = d.profile_model
        cfg = self.cfg

        def pick(dev_v: int | None, prof_v: int | None, src_v: int) -> int:
            return dev_v if dev_v is not None else prof_v if prof_v is not None else src_v

        limits = {
            "max_gap": pick(d.max_gap, prof.max_gap if prof else None, cfg.max_gap),
            "max_bit_gap": pick(d.max_bit_gap, None, cfg.max_bit_gap),
            "max_registers": pick(
                d.max_registers, prof.max_registers if prof else None, cfg.max_registers
            ),
            "max_bits": pick(d.max_bits, prof.max_bits if prof else None, cfg.max_bits),
        }
        ddetail: dict[str, Any] = {
            "unit": d.unit,
            "connection": label,
            "state": "starting",
            "interval_s": d.interval_s,
            "polls": 0,
            "failed_polls": 0,
            "requests": 0,
            "readings": 0,
            "timeouts": 0,
            "exceptions": {},
            "malformed": 0,
            "crc_errors": 0,
            "protocol_errors": 0,
            "connect_failures": 0,
            "rejected": 0,
            "last_ok": None,
            "last_error": None,
        }
        detail[d.name] = ddetail
        timeout = d.timeout_s or cfg.timeout_s
        dev = _Device(d, fmap.fields, fmap.series, timeout, limits, ddetail, self._plans)
        dev.replan(self.name)
        return dev

    # ------------------------------------------------------------------------------------------
    # Running

    async def run(self, emit: Emit) -> None:
        """Poll until cancelled. Raises only on a bug (the supervisor restarts the source)."""
        if self._closed:
            raise RuntimeError(f"modbus source {self.name} is closed")
        self.stats.state = "starting"
        try:
            async with asyncio.TaskGroup() as tg:
                for conn in self._conns:
                    tg.create_task(
                        self._run_conn(conn, emit), name=f"modbus:{self.name}:{conn.link.label}"
                    )
        finally:
            self._close_links()

    async def aclose(self) -> None:
        """Close every connection; ``run`` may not be called again. Idempotent, never blocks."""
        self._closed = True
        self._close_links()

    def _close_links(self) -> None:
        for conn in self._conns:
            conn.link.close()
            conn.detail["state"] = "closed"

    async def _run_conn(self, conn: _Conn, emit: Emit) -> None:
        now = time.monotonic()
        # The devices by when they are due next: (next_due, position, device).
        due: list[tuple[float, int, _Device]] = []
        for i, dev in enumerate(conn.devices):
            # Every device is read at once at start; from the second poll on they are spread
            # evenly over the interval (a steady load on the link and on the store, not a burst).
            dev.next_due = now
            dev.stagger = i / len(conn.devices)
            due.append((now, i, dev))
        heapq.heapify(due)
        while True:
            if not conn.link.connected and not await self._connect(conn):
                await asyncio.sleep(conn.backoff.next())
                continue
            _, pos, dev = due[0]
            delay = dev.next_due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            before = dev.state, self.stats.state
            try:
                async with conn.link.lock:
                    readings, lost = await self._poll(conn, dev)
            finally:
                self._schedule(dev)
                heapq.heapreplace(due, (dev.next_due, pos, dev))
            if readings:  # answers that arrived before a lost link are still good
                await emit(readings)
                self.stats.ok(len(readings))
            if (dev.state, self.stats.state) != before or before[1] != "ok":
                # All was well and this device is unchanged: the source's state cannot have
                # changed (link changes update it where they happen). Spares a scan of every
                # device after every poll.
                self._update_state()
            if lost is not None:
                self._link_lost(conn, lost)
                await asyncio.sleep(conn.backoff.next())
            elif conn.link.needs_reset:
                conn.detail["tid_resyncs"] += 1
                self._link_lost(conn, "transaction ids out of step")
            elif conn.silent >= len(conn.devices) + 2 and conn.link.params.transport != "rtu":
                # Nothing on this TCP peer answers any more: a half-open socket looks like this.
                self._link_lost(conn, f"no answer to {conn.silent} requests in a row")

    async def _connect(self, conn: _Conn) -> bool:
        conn.detail["state"] = "connecting"
        reason = await conn.link.connect()
        if reason is None:
            conn.detail["connects"] += 1
            conn.detail["state"] = "connected"
            conn.silent = 0
            if conn.loud:
                log.info("modbus_connected", source=self.name, connection=conn.link.label)
                conn.loud = False
            return True
        conn.detail.update(state="backoff", last_error=reason)
        conn.detail["connect_failures"] += 1
        for dev in conn.devices:
            dev.count("connect_failures")
            dev.detail["state"] = "disconnected"
        self.stats.error(f"{conn.link.label}: {reason}")
        self._update_state()
        event = "modbus_connect_failed"
        if not conn.loud:
            log.warning(event, source=self.name, connection=conn.link.label, error=reason)
            conn.loud = True
        else:
            log.debug(event, source=self.name, connection=conn.link.label, error=reason)
        return False

    def _link_lost(self, conn: _Conn, reason: str) -> None:
        conn.link.close()
        conn.detail["disconnects"] += 1
        conn.detail.update(state="backoff", last_error=reason)
        for dev in conn.devices:
            dev.detail["state"] = "disconnected"
        self.stats.error(f"{conn.link.label}: {reason}")
        self._update_state()
        log.warning(
            "modbus_disconnected", source=self.name, connection=conn.link.label, error=reason
        )
        conn.loud = True

    def _schedule(self, dev: _Device) -> None:
        now = time.monotonic()
        interval = dev.interval
        if dev.stagger:
            dev.next_due += dev.stagger * interval
            dev.stagger = 0.0
        if dev.next_due + interval <= now:
            # Late (slow bus, reconnect): keep the phase, skip the missed ticks, never burst.
            dev.next_due += math.ceil((now - dev.next_due) / interval) * interval
        else:
            dev.next_due += interval

    def _update_state(self) -> None:
        up = [c.link.connected for c in self._conns]
        devs = [d for c in self._conns for d in c.devices]
        if not any(up):
            self.stats.state = "disconnected"
        elif not all(up) or any(d.state == "degraded" for d in devs):
            self.stats.state = "degraded"
        elif all(d.state == "starting" for d in devs):
            self.stats.state = "starting"
        else:
            self.stats.state = "ok"

    # ------------------------------------------------------------------------------------------
    # One device, one cycle

    async def _poll(
        self, conn: _Conn, dev: _Device, *, probe: bool = False
    ) -> tuple[Sequence[Reading], str | None]:
        """One cycle of ``dev`` (the caller holds the link lock): the readings, and why the link
        was lost if it was (the device is then not blamed; its cycle just ends)."""
        out: list[ReadingBatch] = []
        lost: str | None = None
        try:
            await self._cycle(conn, dev, out, probe)
        except LinkDown as exc:
            lost = exc.reason
        return (_one_batch(out) if out else ()), lost

    async def _cycle(self, conn: _Conn, dev: _Device, out: list[ReadingBatch], probe: bool) -> None:
        answered = False
        failure: str | None = None
        replan = False
        for req in list(dev.plan):
            res = await self._read(conn, dev, req.table, req.address, req.count)
            if isinstance(res, ReadOk):
                answered = True
                self._decode(dev, req.fields, req.address, res, out, probe=probe)
                continue
            if isinstance(res, ReadRefused):
                answered = True
                if res.code not in SPLIT_CODES:
                    failure = res.message  # busy / gateway trouble: the whole device, not a field
                    break
                replan = True
                err = await self._isolate(conn, dev, list(req.fields), res.code, out, probe=probe)
                if err is not None:
                    failure = err
                    break
                continue
            failure = res.message
            if res.kind == "malformed":
                answered = True  # a well-formed frame, if a useless one: the unit is alive
            if res.kind in _ABORTING:
                break
        if failure is None:
            retried, failure = await self._retry_failing(conn, dev, out, probe=probe)
            answered = answered or retried
            replan = replan or retried
        if replan:
            dev.replan(self.name)
        self._finish(dev, answered, failure)

    async def _retry_failing(
        self, conn: _Conn, dev: _Device, out: list[ReadingBatch], *, probe: bool
    ) -> tuple[bool, str | None]:
        """Read each failing field whose retry is due on its own: (any answered, failure)."""
        now = time.monotonic()
        answered = False
        for i in dev.failing():
            st = dev.field_states[i]
            if st.retry_at > now and not probe:
                continue
            s = dev.fields[i]
            res = await self._read(conn, dev, s.table, s.address, s.count)
            if isinstance(res, ReadOk):
                answered = True
                st.failing_code = None
                log.info(
                    "modbus_field_recovered",
                    source=self.name,
                    device=dev.name,
                    series=dev.series[i],
                )
                self._decode(dev, (i,), s.address, res, out, probe=probe)
            elif isinstance(res, ReadRefused):
                answered = True
                st.failing_code = res.code
                st.retry_at = now + dev.cfg.failing_retry_s
            else:
                return answered, res.message
        return answered, None

    async def _read(
        self, conn: _Conn, dev: _Device, table: Table, address: int, count: int
    ) -> ReadOk | ReadRefused | ReadFailed:
        dev.count("requests")
        res = await conn.link.read(table, address, count, dev.cfg.unit, dev.timeout)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled while the answer arrived: pymodbus waits with asyncio.wait_for, which
            # on Python 3.11 then returns the answer and drops the cancellation (gh-86296).
            # Honour it, or the connection's task would poll on and shutdown would hang.
            raise asyncio.CancelledError
        if isinstance(res, ReadFailed):
            key = {"timeout": "timeouts", "crc_error": "crc_errors", "malformed": "malformed"}
            dev.count(key.get(res.kind, "protocol_errors"))
            conn.silent = conn.silent + 1 if res.kind == "timeout" else 0
        else:
            conn.silent = 0
            conn.backoff.reset()
            if isinstance(res, ReadRefused):
                name = EXCEPTION_NAMES.get(res.code, f"code {res.code}").replace(" ", "_")
                exc = dev.detail["exceptions"]
                exc[name] = exc.get(name, 0) + 1
        return res

    async def _isolate(
        self,
        conn: _Conn,
        dev: _Device,
        members: list[int],
        code: int,
        out: list[ReadingBatch],
        *,
        probe: bool,
    ) -> str | None:
        """Split a refused request to find the refusing fields; returns a failure that ended it."""
        if len(members) == 1:
            st = dev.field_state(members[0])
            st.failing_code = code
            st.retry_at = time.monotonic() + dev.cfg.failing_retry_s
            log.warning(
                "modbus_field_failing",
                source=self.name,
                device=dev.name,
                series=dev.series[members[0]],
                error=ReadRefused(code).message,
                retry_s=dev.cfg.failing_retry_s,
            )
            return None
        members = sorted(members, key=lambda i: (dev.fields[i].address, i))
        halves = (members[: len(members) // 2], members[len(members) // 2 :])
        both_ok = True
        for half in halves:
            specs = [dev.fields[i] for i in half]
            start = min(s.address for s in specs)
            end = max(s.end for s in specs)
            res = await self._read(conn, dev, specs[0].table, start, end - start)
            if isinstance(res, ReadOk):
                self._decode(dev, half, start, res, out, probe=probe)
                continue
            both_ok = False
            if isinstance(res, ReadRefused) and res.code in SPLIT_CODES:
                failure = await self._isolate(conn, dev, half, res.code, out, probe=probe)
                if failure is not None:
                    return failure
            else:
                return res.message
        if both_ok:
            # Each half reads fine alone: the device refuses the gap between them.
            right = dev.fields[halves[1][0]]
            dev.breaks.setdefault(right.table, set()).add(right.address)
        return None

    def _decode(
        self,
        dev: _Device,
        idxs: Sequence[int],
        base: int,
        res: ReadOk,
        out: list[ReadingBatch],
        *,
        probe: bool,
    ) -> None:
        # The hot path of a poll: one compiled decoder per field, no per-field slicing.
        ts = res.ts
        values = res.values
        fields = dev.fields
        states = dev.field_states
        key = tuple(idxs)
        if key in dev.plain:
            plain = dev.plain[key]
        else:
            plain = dev.plain[key] = _plain_pairs(dev, idxs, base)
        if plain is not None:
            # Registers that are their own values: no decoding, no checks (a uint16 is finite).
            out.append(ReadingBatch(plain.series, ts, plain.pick(values)))
            if states:
                for i in idxs:
                    if (st := states.get(i)) is not None:
                        st.problem = None
            dev.count("readings", len(plain.series))
            return
        bits = fields[idxs[0]].table in BIT_TABLES  # a request reads one table
        data = b"" if bits else words_to_bytes(values)
        series = dev.series
        names: list[str] = []
        kept: list[Value] = []
        for i in idxs:
            f = fields[i]
            at = f.address - base
            value: Value = bool(values[at]) if bits else f.decode(data, at)
            kind = type(value)
            if (kind is float and not math.isfinite(value)) or kind is str:  # type: ignore[arg-type]
                problem = value_problem(value)
                if problem is not None:
                    self._reject(dev, i, problem)
                    continue
            if f.deadband is None:
                if states and (st := states.get(i)) is not None:
                    st.problem = None
            else:
                st = dev.field_state(i)
                st.problem = None
                if not (probe or st.wants(f, value, ts)):
                    continue
                st.last_value, st.last_ts = value, ts
            names.append(series[i])
            kept.append(value)
        if names:
            out.append(ReadingBatch(tuple(names), ts, kept))
        dev.count("readings", len(names))

    def _reject(self, dev: _Device, i: int, problem: str) -> None:
        st = dev.field_state(i)
        st.problem = problem
        dev.count("rejected")
        self.stats.rejected += 1
        level = log.debug if st.problem_logged else log.warning
        level(
            "modbus_value_rejected",
            source=self.name,
            device=dev.name,
            series=dev.series[i],
            error=problem,
        )
        st.problem_logged = True

    def _finish(self, dev: _Device, answered: bool, failure: str | None) -> None:
        d = dev.detail
        d["polls"] += 1
        if answered:
            d["last_ok"] = time.time()
            if dev.state == "degraded":
                log.info("modbus_device_recovered", source=self.name, device=dev.name)
                dev.next_due = time.monotonic()  # back to full rate from now
            dev.state = "ok"
            dev.consecutive_failures = 0
        else:
            d["failed_polls"] += 1
            dev.consecutive_failures += 1
            if dev.state != "degraded" and dev.consecutive_failures >= dev.cfg.degraded_after:
                dev.state = "degraded"
                dev.next_due = time.monotonic()
                log.warning(
                    "modbus_device_degraded",
                    source=self.name,
                    device=dev.name,
                    failures=dev.consecutive_failures,
                    interval_s=dev.interval,
                )
        d["state"] = dev.state
        if failure is None:
            if dev.loud:
                log.info("modbus_device_ok", source=self.name, device=dev.name)
                dev.loud = False
            return
        d["last_error"] = failure
        self.stats.error(f"{dev.name}: {failure}")
        fields = {"source": self.name, "device": dev.name, "unit": dev.cfg.unit, "error": failure}
        if dev.loud:
            log.debug("modbus_poll_failed", **fields)
        else:
            log.warning("modbus_poll_failed", **fields)
            dev.loud = True

    # ------------------------------------------------------------------------------------------
    # check-config --probe

    async def probe(self) -> ProbeReport:
        """Read every device once (``check-config --probe``): report lines, and a
        :class:`~gateway.probe.ProbeFailure` for each device that could not be read as
        configured. Never raises for device or network faults (they are reported, and listed
        as failures); connections are probed in parallel. The caller closes the source."""
        ndev = sum(len(c.devices) for c in self._conns)
        header = f"modbus source {self.name}: {ndev} device(s) on {len(self._conns)} connection(s)"
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self._probe_conn(c), name=f"probe:{self.name}:{c.link.label}")
                for c in self._conns
            ]
        reports = [t.result() for t in tasks]
        return ProbeReport(
            (header, *(line for r in reports for line in r.lines)),
            tuple(f for r in reports for f in r.failures),
        )

    async def _probe_conn(self, conn: _Conn) -> ProbeReport:
        label = conn.link.label
        reason = await conn.link.connect()
        if reason is not None:
            why = f"cannot connect to {label}: {reason}"
            return ProbeReport(
                (f"  {label}: cannot connect: {reason}",),
                tuple(ProbeFailure(d.name, why) for d in conn.devices),
            )
        lines: list[str] = []
        failures: list[ProbeFailure] = []
        for i, dev in enumerate(conn.devices):
            where = f"{dev.name} (unit {dev.cfg.unit} on {label})"
            dev.detail["last_error"] = None  # from here on: what this one poll ran into
            async with conn.link.lock:
                readings, lost = await self._poll(conn, dev, probe=True)
            if lost is not None:
                lines.append(f"  {where}: connection lost: {lost}")
                failures.append(ProbeFailure(dev.name, f"connection lost: {lost}"))
                for rest in conn.devices[i + 1 :]:
                    lines.append(f"  {rest.name} (unit {rest.cfg.unit} on {label}): not probed")
                    failures.append(
                        ProbeFailure(rest.name, f"not probed: connection to {label} lost")
                    )
                break
            failure: str | None = dev.detail["last_error"]
            problems: list[str] = []
            if dev.state != "ok":
                status = f"no answer: {failure}"
                problems.append(failure or "no answer")
            elif failure is not None:
                # Answered, yet the poll failed: a malformed reply, a busy or gateway exception.
                status = f"answered, but {failure}"
                problems.append(failure)
            else:
                status = "answered"
            lines.append(
                f"  {where}: {status}; {len(dev.fields)} fields in {len(dev.plan)} requests"
            )
            lines.extend(f"    {r.series} = {r.value!r}" for r in readings)
            for k in sorted(dev.field_states):
                st, series = dev.field_states[k], dev.series[k]
                if st.failing_code is not None:
                    msg = ReadRefused(st.failing_code).message
                    lines.append(f"    {series}: refused ({msg})")
                    problems.append(f"{series} refused ({msg})")
                elif st.problem is not None:
                    # The device answered; the value is not one to store (NaN, bad text).
                    # Reported, not a failed probe: the running gateway counts it the same way.
                    lines.append(f"    {series}: rejected ({st.problem})")
            if problems:
                failures.append(ProbeFailure(dev.name, "; ".join(problems)))
        return ProbeReport(tuple(lines), tuple(failures))
