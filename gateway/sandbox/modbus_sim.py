"""A Modbus device simulator on pymodbus' server: any register map, changing values, faults.

``ModbusSimulator`` serves one or more units (unit id -> list of fields: :class:`SimField`, or
anything laid out like one, e.g. the gateway's resolved field specs) over TCP,
RTU framing over TCP, or RTU over a pty pair made by socat (``serial_port`` is the end a gateway
opens, like ``/dev/ttyUSB0``). It is an async context manager::

    async with ModbusSimulator({1: specs}, transport="tcp") as sim:
        sim.host, sim.port            # tcp / rtu_over_tcp (port 0 picks a free port)
        sim.serial_port               # rtu

Values change with time (floats drift on a sine, integers count, bools toggle, strings are
fixed) unless pinned with ``set_value``, which takes the engineering value (scale and offset are
undone). Callers may rely on:

- a read touching an address no field of that table covers (outside [first field, last field
  end)) is answered with exception 2, as a real device does; gaps inside that range read 0;
- ``requests[unit]`` counts read requests addressed to the unit (answered or not),
  ``responses[unit]`` the answers sent for it (exception answers included), so tests can prove
  no reading was invented;
- faults: ``silence(unit)`` (the unit stops answering; so does every unknown unit id),
  ``fail_range(unit, table, start, end, code)`` (exception response for reads touching the
  range), ``corrupt_crc(n)`` (next n RTU answers get a wrong CRC), ``desync_tids(n)`` (next n TCP
  answers carry another transaction id), ``short_replies(n)`` (next n register answers lose
  their last register), ``stop()``/``start()`` (server gone and back on the same port or pty;
  ``stop(unplug=True)`` also removes the pty pair, like pulling the USB adapter);
- on exit the server is shut down, its request tasks awaited and socat reaped.

Register contents come from the simulator's own encoder (:mod:`gateway.sandbox.modbus_encode`,
written from the Modbus data encoding and the byte-order definitions), never from the gateway's
decoder: the only things shared with the gateway are its config model (to serve a device
profile) and the type-name spellings.

Command line (runs until interrupted, prints one JSON line with where it listens)::

    python -m gateway.sandbox.modbus_sim --device 1=hardware/profiles/sdm630.toml \\
        --device 2=synthetic:200 --transport tcp --port 5020
    python -m gateway.sandbox.modbus_sim --counters 1-200=125 --port 0   # benchmark units
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import structlog
from pymodbus import FramerType
from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer

from gateway.sandbox.modbus_encode import (
    BIT_TABLES,
    FLOAT_TYPES,
    INTEGER_TYPES,
    DataType,
    Order,
    RawValue,
    Table,
    encode_raw,
    registers_of,
    set_bit,
    unscaled,
)
from gateway.sources.modbus.config import ModbusDeviceConfig

log = structlog.get_logger(__name__)

SimTransport = Literal["tcp", "rtu", "rtu_over_tcp"]
_FC_TABLE: dict[int, Table] = {
    1: "coil",
    5: "coil",
    15: "coil",
    2: "discrete",
    3: "holding",
    6: "holding",
    16: "holding",
    22: "holding",
    23: "holding",
    4: "input",
}
_INT_RANGE = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


class FieldLayout(Protocol):
    """What the simulator needs to know of a field: where it is and how it is laid out (a
    :class:`SimField`, or the gateway's own field spec of the same map)."""

    @property
    def series(self) -> str: ...
    @property
    def table(self) -> Table: ...
    @property
    def address(self) -> int: ...
    @property
    def dtype(self) -> DataType: ...
    @property
    def order(self) -> Order: ...
    @property
    def bit(self) -> int | None: ...
    @property
    def length(self) -> int | None: ...
    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...


@dataclass(frozen=True, slots=True)
class SimField:
    """One value the simulated device holds; ``count`` registers (one bit in the coil and
    discrete tables) from ``address``, as :mod:`~gateway.sandbox.modbus_encode` lays it out."""

    series: str
    table: Table
    address: int
    dtype: DataType
    order: Order = "ABCD"
    bit: int | None = None
    length: int | None = None
    scale: float = 1.0
    offset: float = 0.0

    @classmethod
    def of(cls, f: FieldLayout) -> SimField:
        if isinstance(f, SimField):
            return f
        return cls(
            f.series, f.table, f.address, f.dtype, f.order, f.bit, f.length, f.scale, f.offset
        )

    @property
    def count(self) -> int:
        return 1 if self.table in BIT_TABLES else registers_of(self.dtype, self.length)

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass
class SimUnit:
    """One simulated device: its fields, register image and faults."""

    unit: int
    fields: list[SimField]
    silent: bool = False
    #: (table, start, end, exception code): reads touching [start, end) are refused.
    fault_ranges: list[tuple[Table, int, int, int]] = field(default_factory=list)
    pinned: dict[str, RawValue] = field(default_factory=dict)
    _image: dict[str, tuple[int, list[int]]] = field(default_factory=dict, init=False)
    _by_table: dict[str, list[tuple[int, SimField]]] = field(default_factory=dict, init=False)
    _t0: float = field(default_factory=time.monotonic, init=False)

    def __post_init__(self) -> None:
        for i, s in enumerate(self.fields):
            self._by_table.setdefault(s.table, []).append((i, s))
        for table, items in self._by_table.items():
            lo = min(s.address for _, s in items)
            hi = max(s.end for _, s in items)
            self._image[table] = (lo, [0] * (hi - lo))
            items.sort(key=lambda x: x[1].address)

    def spec(self, series: str) -> SimField:
        for s in self.fields:
            if s.series == series:
                return s
        raise KeyError(f"unit {self.unit} has no field {series!r}")

    def set_value(self, series: str, value: RawValue) -> None:
        """Pin ``series`` to the engineering ``value`` (what the gateway should report)."""
        s = self.spec(series)
        self.pinned[series] = unscaled(value, s.dtype, s.scale, s.offset)

    def unpin(self, series: str) -> None:
        self.pinned.pop(series, None)

    def _raw(self, i: int, s: SimField, t: float) -> RawValue:
        if s.series in self.pinned:
            return self.pinned[s.series]
        k = i + 1
        if s.dtype in FLOAT_TYPES:
            return 100.0 + k % 50 + 10.0 * math.sin(2 * math.pi * t / (10 + k % 7))
        if s.dtype in INTEGER_TYPES:
            return ((k * 37) % 1000 + int(t * 10)) % 30000
        if s.dtype == "string":
            return f"SIM{self.unit}-{k}".encode()[: s.length].decode(errors="ignore")
        return (int(t / (1 + k % 5)) + k) % 2 == 1

    def read(self, table: Table, address: int, count: int) -> list[int] | list[bool] | ExcCodes:
        """Answer a read (refreshing the values it covers) or the exception a device would send."""
        for ft, start, end, code in self.fault_ranges:
            if ft == table and address < end and start < address + count:
                return ExcCodes(code)
        if table not in self._image:
            return ExcCodes.ILLEGAL_ADDRESS
        lo, image = self._image[table]
        if address < lo or address + count > lo + len(image):
            return ExcCodes.ILLEGAL_ADDRESS
        t = time.monotonic() - self._t0
        touched = []
        for i, s in self._by_table[table]:
            if s.address >= address + count:
                break
            if s.end > address:
                touched.append((i, s))
        # Pinned values last: they win over a field sharing their registers (allow_overlap).
        touched.sort(key=lambda x: x[1].series in self.pinned)
        for i, s in touched:
            self._store(image, lo, s, self._raw(i, s, t))
        part = image[address - lo : address - lo + count]
        if table in BIT_TABLES:
            return [bool(v) for v in part]
        return part

    def write(
        self, table: Table, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        if table not in self._image:
            return ExcCodes.ILLEGAL_ADDRESS
        lo, image = self._image[table]
        if address < lo or address + len(values) > lo + len(image):
            return ExcCodes.ILLEGAL_ADDRESS
        image[address - lo : address - lo + len(values)] = [int(v) for v in values]
        return None

    @staticmethod
    def _store(image: list[int], lo: int, s: SimField, raw: RawValue) -> None:
        at = s.address - lo
        if s.table in BIT_TABLES:
            image[at] = 1 if raw else 0
        elif s.dtype == "bit":
            assert s.bit is not None
            image[at] = set_bit(image[at], s.bit, bool(raw))
        else:
            if s.dtype in INTEGER_TYPES and isinstance(raw, int) and not isinstance(raw, bool):
                lo_v, hi_v = _INT_RANGE[s.dtype]
                raw = min(max(raw, lo_v), hi_v)
            image[at : at + s.count] = encode_raw(s.dtype, raw, s.order, s.length)


class CounterUnit(SimUnit):
    """A unit for throughput benchmarks: ``n`` holding registers at 0..n-1, all uint16.

    Register 0 counts the reads that covered it (1 on the first poll), so every reading a
    gateway delivers can be traced to the poll that produced it; register i > 0 holds the fixed
    value ``(unit * 1000 + i) % 65536``. Reads cost a slice, not a per-field computation.
    """

    def __init__(self, unit: int, n: int) -> None:
        specs = [SimField(f"u{unit}.r{i}", "holding", i, "uint16") for i in range(n)]
        super().__init__(unit, specs)
        self._words = [(unit * 1000 + i) % 65536 for i in range(n)]
        self._words[0] = 0

    @property
    def polls(self) -> int:
        return self._words[0]

    def read(self, table: Table, address: int, count: int) -> list[int] | list[bool] | ExcCodes:
        if self.fault_ranges or table != "holding" or address + count > len(self._words):
            return super().read(table, address, count)
        if address == 0:
            self._words[0] = (self._words[0] + 1) % 65536
        return self._words[address : address + count]


class _Context(ModbusServerContext):
    """The datastore pymodbus' request PDUs call (``async_getValues``/``async_setValues``).

    pymodbus 3.x hands a ModbusServerContext flagged ``old_simulator`` straight to the requests;
    we use that seam (instead of SimDevice, marked experimental) to answer from SimUnit, refuse
    with any exception code, or stay silent (NoSuchIdException + ignore_missing_devices).
    """

    def __init__(self, sim: ModbusSimulator) -> None:
        # Not calling super().__init__: it builds, and warns about, a datastore we do not use.
        self.old_simulator = True
        self.simdevices = []
        self._sim = sim

    def _unit(self, device_id: int) -> SimUnit:
        unit = self._sim.units.get(device_id)
        if unit is None or unit.silent:
            raise NoSuchIdException(f"unit {device_id} does not answer")
        return unit

    async def async_getValues(  # pymodbus' name
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        self._sim.requests[device_id] += 1
        unit = self._unit(device_id)
        return unit.read(_FC_TABLE[func_code], address, count)

    async def async_setValues(  # pymodbus' name
        self, device_id: int, func_code: int, address: int, values: Sequence[int] | Sequence[bool]
    ) -> ExcCodes | None:
        return self._unit(device_id).write(_FC_TABLE[func_code], address, values)

    def device_ids(self) -> list[int]:
        return list(self._sim.units)


class ModbusSimulator:
    """Simulated Modbus devices behind one server; see the module docstring."""

    def __init__(
        self,
        devices: Mapping[int, Sequence[FieldLayout]],
        *,
        transport: SimTransport = "tcp",
        host: str = "127.0.0.1",
        port: int = 0,
        counters: Mapping[int, int] | None = None,
    ) -> None:
        self.units = {u: SimUnit(u, [SimField.of(f) for f in fs]) for u, fs in devices.items()}
        # Benchmark units (see CounterUnit): unit id -> number of registers.
        self.units.update({u: CounterUnit(u, n) for u, n in (counters or {}).items()})
        self.transport = transport
        self.host = host
        self.port = port
        self.serial_port = ""
        self.requests: Counter[int] = Counter()
        self.responses: Counter[int] = Counter()
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._context = _Context(self)
        self._socat: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._sim_end: Path | None = None
        self._corrupt = self._desync = self._short = 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start serving (again, on the same port or pty path)."""
        if self._server is not None:
            return
        hooks: dict[str, Any] = {
            "ignore_missing_devices": True,
            "trace_packet": self._trace_packet,
            "trace_pdu": self._trace_pdu,
        }
        server: ModbusTcpServer | ModbusSerialServer
        if self.transport == "rtu":
            await self._plug()
            assert self._sim_end is not None
            server = ModbusSerialServer(
                self._context, framer=FramerType.RTU, port=str(self._sim_end), **hooks
            )
        else:
            framer = FramerType.SOCKET if self.transport == "tcp" else FramerType.RTU
            server = ModbusTcpServer(
                self._context, framer=framer, address=(self.host, self.port), **hooks
            )
        await server.serve_forever(background=True)
        self._server = server
        if self.transport != "rtu" and self.port == 0:
            self.port = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.debug("modbus_sim_started", transport=self.transport, where=self.where)

    async def stop(self, *, unplug: bool = False) -> None:
        """Stop answering (client connections are closed); ``unplug`` also removes the pty pair."""
        server, self._server = self._server, None
        if server is not None:
            await server.shutdown()  # type: ignore[no-untyped-call]  # pymodbus: unannotated
        await self._drain()
        if unplug:
            await self._unplug()

    async def close(self) -> None:
        await self.stop(unplug=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def where(self) -> str:
        if self.transport == "rtu":
            return f"rtu {self.serial_port}"
        return f"{self.transport} {self.host}:{self.port}"

    async def _drain(self) -> None:
        # pymodbus runs each request as a task of its own; let those in flight finish.
        pending = [
            t
            for t in asyncio.all_tasks()
            if not t.done() and "ServerRequestHandler" in getattr(t.get_coro(), "__qualname__", "")
        ]
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    async def _plug(self) -> None:
        if self._socat is not None and self._socat.poll() is None:
            return
        if shutil.which("socat") is None:
            raise RuntimeError("the RTU simulator needs socat (apt install socat)")
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="fieldgate-modbus-sim-"))
        self._sim_end = self._tmp / "sim"
        gateway_end = self._tmp / "gateway"
        self.serial_port = str(gateway_end)
        # Popen, not asyncio's subprocesses: those start a child-watcher thread on Python 3.11,
        # and socat is up at once; its pty links are what we wait for, below.
        self._socat = subprocess.Popen(  # noqa: ASYNC220
            ["socat", f"pty,raw,echo=0,link={self._sim_end}", f"pty,raw,echo=0,link={gateway_end}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with asyncio.timeout(5):
            while not (self._sim_end.exists() and gateway_end.exists()):
                if self._socat.poll() is not None:
                    raise RuntimeError(f"socat exited with {self._socat.returncode}")
                await asyncio.sleep(0.01)  # another process makes the files: nothing to await

    async def _unplug(self) -> None:
        proc, self._socat = self._socat, None
        if proc is None:
            return
        proc.terminate()
        try:
            async with asyncio.timeout(5):
                # Reaping a child started with Popen: no event to wait on, so poll briefly.
                while proc.poll() is None:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            proc.kill()
            proc.wait()

    # -- values and faults ------------------------------------------------------------------------

    def unit(self, unit: int) -> SimUnit:
        return self.units[unit]

    def set_value(self, unit: int, series: str, value: RawValue) -> None:
        self.units[unit].set_value(series, value)

    def silence(self, unit: int, silent: bool = True) -> None:
        self.units[unit].silent = silent

    def fail_range(self, unit: int, table: Table, start: int, end: int, code: int = 2) -> None:
        self.units[unit].fault_ranges.append((table, start, end, code))

    def clear_faults(self) -> None:
        for u in self.units.values():
            u.silent = False
            u.fault_ranges.clear()
        self._corrupt = self._desync = self._short = 0

    def corrupt_crc(self, n: int = 1) -> None:
        self._corrupt += n

    def desync_tids(self, n: int = 1) -> None:
        self._desync += n

    def short_replies(self, n: int = 1) -> None:
        self._short += n

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if sending:
            self.responses[pdu.dev_id] += 1
            if self._short and pdu.registers:
                self._short -= 1
                pdu.registers = list(pdu.registers)[:-1]
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending or not data:
            return data
        if self._corrupt and self.transport != "tcp":
            self._corrupt -= 1
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        if self._desync and self.transport == "tcp":
            self._desync -= 1
            tid = (int.from_bytes(data[:2], "big") + 1000) % 65536
            return tid.to_bytes(2, "big") + data[2:]
        return data


# ----------------------------------------------------------------------------------------------
# Register maps for the simulator


def profile_specs(profile: str | Path, prefix: str, unit: int = 1) -> list[SimField]:
    """The fields of a hardware profile, with series ``<prefix>.<name>`` (read through the
    gateway's config model, as the gateway reads the same profile file)."""
    dev = ModbusDeviceConfig.model_validate({"name": prefix, "unit": unit, "profile": str(profile)})
    return [SimField.of(f.spec) for f in dev.resolved_fields()]


_SYNTH_CYCLE: tuple[tuple[Table, DataType], ...] = (
    ("holding", "float32"),
    ("holding", "uint16"),
    ("holding", "int32"),
    ("holding", "bit"),
    ("holding", "float32"),
    ("input", "int16"),
    ("input", "uint32"),
    ("input", "float64"),
    ("holding", "uint16"),
    ("coil", "bool"),
)


_SYNTH_ORDERS: tuple[Order, ...] = ("ABCD", "CDAB", "BADC", "DCBA")


def synthetic_specs(n: int, prefix: str = "synth") -> list[SimField]:
    """``n`` fields of mixed tables and types, with small gaps (coalescable) and every 25th
    field after a large gap (forcing a new request): a stand-in for a big PLC map."""
    out: list[SimField] = []
    nxt: dict[str, int] = {"coil": 0, "discrete": 0, "holding": 0, "input": 0}
    for i in range(n):
        table, dtype = _SYNTH_CYCLE[i % len(_SYNTH_CYCLE)]
        gap = 40 if i % 25 == 24 else (2 if i % 7 == 6 else 0)
        addr = nxt[table] + gap
        order = _SYNTH_ORDERS[i % len(_SYNTH_ORDERS)]
        if dtype == "bit":
            spec = SimField(f"{prefix}.f{i}", table, addr, "bit", bit=i % 16)
        else:
            spec = SimField(f"{prefix}.f{i}", table, addr, dtype, order=order)
        out.append(spec)
        nxt[table] = spec.end
    return out


def field_dicts(specs: Sequence[FieldLayout]) -> list[dict[str, Any]]:
    """Config ``fields`` entries that make the gateway read exactly ``specs``."""
    out = []
    for s in specs:
        d: dict[str, Any] = {
            "series": s.series,
            "table": s.table,
            "address": s.address,
            "type": s.dtype,
            "word_order": s.order,
        }
        if s.bit is not None:
            d["bit"] = s.bit
        if s.length is not None:
            d["length"] = s.length
        if s.scale != 1.0:
            d["scale"] = s.scale
        if s.offset != 0.0:
            d["offset"] = s.offset
        out.append(d)
    return out


# ----------------------------------------------------------------------------------------------
# Command line


def _parse_device(arg: str) -> tuple[int, list[SimField]]:
    unit_s, _, what = arg.partition("=")
    unit = int(unit_s)
    if what.startswith("synthetic:"):
        return unit, synthetic_specs(int(what.split(":", 1)[1]), prefix=f"unit{unit}")
    return unit, profile_specs(what, prefix=Path(what).stem, unit=unit)


def _parse_counters(arg: str) -> dict[int, int]:
    units, _, n = arg.partition("=")
    first, _, last = units.partition("-")
    return dict.fromkeys(range(int(first), int(last or first) + 1), int(n))


async def _serve(args: argparse.Namespace) -> None:
    devices = dict(_parse_device(a) for a in args.device or [])
    counters: dict[int, int] = {}
    for a in args.counters or []:
        counters.update(_parse_counters(a))
    if not devices and not counters:
        raise SystemExit("give at least one --device or --counters")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before the ready line: a parent may signal as soon as it has read it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with ModbusSimulator(
        devices, transport=args.transport, host=args.host, port=args.port, counters=counters
    ) as sim:
        ready = {
            "transport": sim.transport,
            "host": sim.host,
            "port": sim.port,
            "serial_port": sim.serial_port,
            "units": sorted(sim.units),
        }
        print(json.dumps(ready), flush=True)

        def hush() -> None:
            # SIGUSR1: every unit stops answering, then one line tells how many polls each
            # counter unit answered (a read already answered is counted; none is answered after).
            for u in sim.units.values():
                u.silent = True
            polls = {u: x.polls for u, x in sim.units.items() if isinstance(x, CounterUnit)}
            print(json.dumps({"polls": polls}), flush=True)

        loop.add_signal_handler(signal.SIGUSR1, hush)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m gateway.sandbox.modbus_sim", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--device",
        action="append",
        help="UNIT=PROFILE.toml or UNIT=synthetic:N (repeatable)",
    )
    ap.add_argument(
        "--counters",
        action="append",
        help="FIRST-LAST=N: benchmark units with N uint16 registers, register 0 counting polls",
    )
    ap.add_argument("--transport", choices=["tcp", "rtu", "rtu_over_tcp"], default="tcp")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5020, help="0 picks a free port")
    # stdout carries the one JSON line a parent process reads; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
