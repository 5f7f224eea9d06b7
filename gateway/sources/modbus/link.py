"""One Modbus connection (a TCP peer or an RS-485 bus) over pymodbus, errors translated here.

This is the only module of the Modbus source that touches pymodbus, and it imports it lazily
(inside :meth:`ModbusLink.connect`) so loading the config stays light. A read returns its outcome
as data; only a lost connection is an exception::

    LinkDown (TransientError)    the connection is gone or was never up: close, back off, reconnect

    ReadOk        the values, and ``ts`` taken when the response arrived
    ReadRefused   the device answered with a Modbus exception response (``code``)
    ReadFailed    no usable answer: timeout, crc_error, malformed, tid_out_of_step, protocol_error

pymodbus' own retries and reconnect loop are switched off (``retries=0``, ``reconnect_delay=0``):
the caller owns timeouts (``asyncio.timeout`` per request), backoff and reconnects. Two faults
pymodbus swallows are detected from the raw frames (``trace_packet``): a TCP response carrying
another transaction id (pymodbus skips it and the request times out; :attr:`needs_reset` asks the
caller to drop and reopen the connection), and an RTU frame with a bad CRC (pymodbus drops it
silently; the timeout that follows is reported as ``crc_error``).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

from pymodbus import FramerType
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException

from gateway.errors import TransientError
from gateway.sources.base import now_ms
from gateway.sources.modbus.decode import Table, rtu_frame_problem

FailKind = Literal["timeout", "crc_error", "malformed", "tid_out_of_step", "protocol_error"]

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}
_FUNCTION_CODES: dict[str, int] = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}


class LinkDown(TransientError):
    """The connection is not usable; ``reason`` says why (for status and logs)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ReadOk:
    values: list[int] | list[bool]
    ts: int


@dataclass(frozen=True, slots=True)
class ReadRefused:
    code: int

    @property
    def message(self) -> str:
        return f"exception {self.code} ({EXCEPTION_NAMES.get(self.code, 'unknown')})"


@dataclass(frozen=True, slots=True)
class ReadFailed:
    kind: FailKind
    message: str


ReadResult = ReadOk | ReadRefused | ReadFailed


@dataclass(frozen=True, slots=True)
class LinkParams:
    """How to reach one bus or peer. ``host``/``port`` for TCP kinds, ``serial_port`` for rtu."""

    transport: Literal["tcp", "rtu", "rtu_over_tcp"]
    host: str | None = None
    port: int = 502
    serial_port: str | None = None
    baudrate: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    local_echo: bool = False
    connect_timeout_s: float = 5.0
    #: Longest per-request timeout any device on this link uses (pymodbus' own is set above it).
    max_timeout_s: float = 1.0
    inter_frame_delay_s: float = 0.0


class ModbusLink:
    """A pymodbus client plus the bookkeeping one bus needs.

    Callers serialise transactions with :attr:`lock` (one transaction on the wire at a time);
    :meth:`read` keeps the inter-frame gap itself. Not thread-safe; one event loop.
    """

    def __init__(self, label: str, params: LinkParams) -> None:
        self.label = label
        self.params = params
        self.lock = asyncio.Lock()
        #: Set when the peer answered out of step; the caller should close and reconnect.
        self.needs_reset = False
        self._client: ModbusBaseClient | None = None
        self._bus_free_at = 0.0
        self._sent_tid = -1
        self._tid_mismatch = False
        self._crc_error = False
        self._socket_framing = params.transport == "tcp"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.connected

    async def connect(self) -> str | None:
        """Open the connection. Returns None when up, else why not (never raises for I/O)."""
        self.close()
        # Imported here: pymodbus loads when polling starts, never when a config is validated.

        p = self.params
        # pymodbus times out above ours, so our asyncio.timeout always decides first.
        common: dict[str, Any] = {
            "name": self.label,
            "retries": 0,
            "reconnect_delay": 0,
            "timeout": max(p.connect_timeout_s, p.max_timeout_s) + 1.0,
            "trace_packet": self._trace_packet,
        }
        client: ModbusBaseClient
        if p.transport == "rtu":
            assert p.serial_port is not None
            client = AsyncModbusSerialClient(
                p.serial_port,
                framer=FramerType.RTU,
                baudrate=p.baudrate,
                parity=p.parity,
                stopbits=p.stopbits,
                bytesize=p.bytesize,
                handle_local_echo=p.local_echo,
                **common,
            )
        else:
            assert p.host is not None
            framer = FramerType.SOCKET if p.transport == "tcp" else FramerType.RTU
            client = AsyncModbusTcpClient(p.host, port=p.port, framer=framer, **common)
        self._client = client
        self.needs_reset = False
        self._sent_tid = -1
        try:
            async with asyncio.timeout(p.connect_timeout_s):
                up = await client.connect()
        except TimeoutError:
            up = False
        except (OSError, ValueError) as exc:  # pyserial refuses bad settings with ValueError
            self.close()
            return f"cannot open: {exc}"
        if up and client.connected:
            return None
        self.close()
        return await self._why_not()

    async def _why_not(self) -> str:
        """pymodbus reports a failed connect as False; find the reason for status and logs."""
        p = self.params
        if p.transport == "rtu":
            assert p.serial_port is not None
            # Local stat calls on a device node: they do not block the loop in any real sense.
            if not os.path.exists(p.serial_port):  # noqa: ASYNC240
                return f"{p.serial_port} does not exist (adapter unplugged?)"
            if not os.access(p.serial_port, os.R_OK | os.W_OK):
                return f"no permission on {p.serial_port} (is the user in group dialout?)"
            return f"cannot open {p.serial_port} (in use by another program?)"
        assert p.host is not None
        try:
            async with asyncio.timeout(p.connect_timeout_s):
                _reader, writer = await asyncio.open_connection(p.host, p.port)
        except TimeoutError:
            return f"connect to {p.host}:{p.port} timed out"
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            return f"connect to {p.host}:{p.port} failed: {why}"
        writer.close()
        return f"connect to {p.host}:{p.port} failed (the peer closed it)"

    def close(self) -> None:
        """Drop the connection (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def read(
        self, table: Table, address: int, count: int, unit: int, answer_timeout_s: float
    ) -> ReadResult:
        """One read transaction, at most ``answer_timeout_s`` waiting for the answer (each
        device has its own, so the link owns the timeout rather than the caller).

        Raises LinkDown when the connection is not up or is lost during the transaction.
        """
        client = self._client
        if client is None or not client.connected:
            raise LinkDown("not connected")
        wait = self._bus_free_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        method = {
            "coil": client.read_coils,
            "discrete": client.read_discrete_inputs,
            "holding": client.read_holding_registers,
            "input": client.read_input_registers,
        }[table]

        self._tid_mismatch = self._crc_error = False
        try:
            async with asyncio.timeout(answer_timeout_s):
                # Checked again right before the call: pymodbus would silently reconnect itself.
                if not client.connected:
                    raise LinkDown("connection lost")
                response = await method(address, count=count, device_id=unit)
        except TimeoutError:
            return self._after_timeout(client, answer_timeout_s)
        except ConnectionException as exc:
            raise LinkDown(f"connection lost: {exc}") from exc
        except ModbusException as exc:
            self._gap()
            if not client.connected:
                raise LinkDown(f"connection lost: {exc}") from exc
            return ReadFailed("protocol_error", f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            raise LinkDown(f"I/O error: {exc}") from exc
        ts = now_ms()
        self._gap()
        return _outcome(response, table, count, ts)

    def _after_timeout(self, client: ModbusBaseClient, timeout: float) -> ReadResult:
        self._gap()
        if not client.connected:
            raise LinkDown("connection lost while waiting for an answer")
        if self._tid_mismatch:
            self.needs_reset = True
            return ReadFailed("tid_out_of_step", "answer carried another transaction id")
        if self._crc_error:
            return ReadFailed("crc_error", "answer failed its CRC check")
        return ReadFailed("timeout", f"no answer within {timeout:g} s")

    def _gap(self) -> None:  # the bus is busy until the inter-frame silence has passed
        self._bus_free_at = time.monotonic() + self.params.inter_frame_delay_s

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        # pymodbus hands us each frame sent and the receive buffer on every arrival.
        if self._socket_framing:
            if len(data) >= 2:
                tid = int.from_bytes(data[:2], "big")
                if sending:
                    self._sent_tid = tid
                elif tid != self._sent_tid:
                    self._tid_mismatch = True
        elif not sending and rtu_frame_problem(data) == "crc":
            self._crc_error = True
        return data


def _outcome(response: Any, table: Table, count: int, ts: int) -> ReadResult:
    """Classify a decoded answer: refused, malformed (wrong function, too short) or the values."""
    if response.isError():
        return ReadRefused(int(getattr(response, "exception_code", 0)))
    if response.function_code != _FUNCTION_CODES[table]:
        return ReadFailed("malformed", f"answer has function code {response.function_code}")
    bits = table in ("coil", "discrete")
    values: list[int] | list[bool] = list(response.bits) if bits else list(response.registers)
    if len(values) < count:
        return ReadFailed("malformed", f"short reply: {len(values)} of {count} values")
    return ReadOk(values[:count], ts)
