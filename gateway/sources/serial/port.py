"""Serial plumbing shared by the serial sources, and the line-logger source (``serial_lines``).

The plumbing: :class:`SerialPort` opens a device with pyserial (termios settings) and reads and
writes its file descriptor on the event loop; :class:`PortLink` keeps a port open, reopening it
with capped, jittered exponential backoff when the device vanishes (a USB adapter unplugged and
plugged back); :class:`LineFramer` cuts bytes into lines with a maximum length;
:class:`FaultLog` counts damaged input in :class:`~gateway.sources.base.SourceStats` and logs the
first fault of each kind in a burst loudly, repeats at debug, until a good line resets it.

Why not pyserial-asyncio-fast's transport: it opens the port in the default executor
(``run_in_executor(None, serial_for_url)``) and on close starts a fire-and-forget task that runs
``flush()`` (``tcdrain``, which can wait on a vanished adapter) and ``close()`` in executor
threads. Opening a tty with ``O_NONBLOCK`` does not block, so we open on the loop, read with
``add_reader`` (a hang-up wakes it: read returns EOF or EIO) and close synchronously, leaving no
thread and no task behind.

Errors::

    TransientError (gateway.errors)
     ├── PortUnavailable   the device cannot be opened now (absent, busy, permission)
     └── PortLost          an open device hung up, vanished, or went silent too long

Both are handled inside :meth:`PortLink.run` and never leave a source's ``run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import serial as pyserial
import structlog

from gateway.backoff import Backoff
from gateway.errors import TransientError
from gateway.sources.base import SourceStats
from gateway.sources.serial.config import (
    SerialConfigBase,
)

if TYPE_CHECKING:
    import serial as pyserial

log = structlog.get_logger(__name__)

#: An idle read checks this often that the device node is still the one we opened.
LIVENESS_S = 5.0
_READ_SIZE = 4096


class PortUnavailable(TransientError):
    """The device cannot be opened now."""

    def __init__(self, port: str, reason: str) -> None:
        super().__init__(f"{port}: {reason}")
        self.port = port
        self.reason = reason


class PortLost(TransientError):
    """An open device hung up, vanished or stayed silent past its limit."""

    def __init__(self, port: str, reason: str) -> None:
        super().__init__(f"{port}: {reason}")
        self.port = port
        self.reason = reason


class FaultLog:
    """Counts faults per kind in ``stats.detail["faults"]``; logs each kind once per burst.

    ``rejected`` is for damaged input (bumps ``stats.rejected``), ``error`` for port and device
    faults (bumps ``stats.errors``). ``good()`` ends the burst: the next fault is loud again.
    """

    def __init__(self, source: str, stats: SourceStats) -> None:
        self.source = source
        self.stats = stats
        self.counts: dict[str, int] = stats.detail.setdefault("faults", {})
        self._loud: set[str] = set()

    def rejected(self, kind: str, message: str, event: str = "input_rejected", **kw: Any) -> None:
        self.stats.rejected += 1
        self.stats.last_error = f"{kind}: {message}"
        self.stats.last_error_at = time.time()
        self._count(kind, message, event, kw)

    def error(self, kind: str, message: str, event: str = "device_fault", **kw: Any) -> None:
        self.stats.error(f"{kind}: {message}")
        self._count(kind, message, event, kw)

    def good(self) -> None:
        if self._loud:
            log.info("faults_cleared", source=self.source, kinds=sorted(self._loud))
            self._loud.clear()

    def _count(self, kind: str, message: str, event: str, kw: dict[str, Any]) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        loud = kind not in self._loud
        self._loud.add(kind)
        emit = log.warning if loud else log.debug
        emit(event, source=self.source, kind=kind, error=message, count=self.counts[kind], **kw)


@dataclass(frozen=True, slots=True)
class Discarded:
    """Bytes the framer threw away: an ``overlong`` line or a ``partial`` one cut off."""

    kind: Literal["overlong", "partial"]
    size: int


class LineFramer:
    """Cuts a byte stream into lines at ``terminator``; pure (the caller passes the clock).

    A line longer than ``max_len`` is reported once as overlong and skipped up to the next
    terminator. Bytes left unterminated for more than ``partial_timeout_s`` when new bytes
    arrive are a partial line (the logger restarted mid-line) and are dropped before the new
    bytes are framed, so two half lines are never spliced into one.
    """

    def __init__(
        self, terminator: bytes, max_len: int, partial_timeout_s: float | None = None
    ) -> None:
        if not terminator:
            raise ValueError("empty terminator")
        self.terminator = terminator
        self.max_len = max_len
        self.partial_timeout_s = partial_timeout_s
        self._buf = bytearray()
        self._skipping = False
        self._last = 0.0

    def feed(self, data: bytes, now: float) -> list[bytes | Discarded]:
        out: list[bytes | Discarded] = []
        if (
            self.partial_timeout_s is not None
            and (self._buf or self._skipping)
            and now - self._last > self.partial_timeout_s
        ):
            dropped = self.reset()
            if dropped is not None:
                out.append(dropped)
        self._last = now
        self._buf += data
        term, tlen = self.terminator, len(self.terminator)
        start = 0
        while (i := self._buf.find(term, start)) >= 0:
            line = bytes(self._buf[start:i])
            start = i + tlen
            if self._skipping:
                self._skipping = False  # the tail of an overlong line, already reported
            elif len(line) > self.max_len:
                out.append(Discarded("overlong", len(line)))
            else:
                out.append(line)
        del self._buf[:start]
        if len(self._buf) > self.max_len:
            if not self._skipping:
                out.append(Discarded("overlong", len(self._buf)))
                self._skipping = True
            # Keep a possible first half of a terminator split across reads.
            del self._buf[: len(self._buf) - (tlen - 1)]
        return out

    def reset(self) -> Discarded | None:
        """Forget buffered bytes (port lost or flushed); a pending line is reported as partial."""
        dropped = None if self._skipping or not self._buf else Discarded("partial", len(self._buf))
        self._buf.clear()
        self._skipping = False
        return dropped


class SerialPort:
    """One open serial device, read and written on the event loop (no threads).

    ``port`` is a device path (``/dev/ttyUSB0``, ``/dev/serial/by-id/...``), not a pyserial URL.
    One reader and one writer at a time (the source's own task). ``read`` raises
    :class:`PortLost` on hang-up, EOF or I/O error, and when the device node has vanished or been
    replaced (checked every :data:`LIVENESS_S` while idle), so a read may wait for data forever
    without missing an unplug. ``close`` is idempotent and never blocks.
    """

    def __init__(self, cfg: SerialConfigBase) -> None:
        self.cfg = cfg
        self.path = cfg.port
        self.bytes_in = 0
        self._ser: pyserial.Serial | None = None
        self._fd = -1
        self._rdev = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def open(self) -> None:
        cfg = self.cfg
        ser = pyserial.Serial()
        ser.port = cfg.port
        ser.baudrate = cfg.baudrate
        ser.bytesize = cfg.bytesize
        ser.parity = cfg.parity
        ser.stopbits = cfg.stopbits
        ser.xonxoff = cfg.xonxoff
        ser.rtscts = cfg.rtscts
        ser.timeout = 0
        try:
            ser.open()  # O_NONBLOCK open and tcsetattr: quick, safe on the loop
            self._fd = ser.fileno()
            # pyserial leaves VMIN=0, where an empty read returns b"" like a hang-up does; with
            # VMIN=1 an empty non-blocking read raises EAGAIN and b"" means the device is gone.
            attrs = termios.tcgetattr(self._fd)
            attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 1, 0
            termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
            self._rdev = os.fstat(self._fd).st_rdev
        except (pyserial.SerialException, OSError, ValueError, termios.error) as exc:
            ser.close()
            raise PortUnavailable(cfg.port, str(exc)) from exc
        self._ser = ser

    @property
    def is_open(self) -> bool:
        return self._ser is not None

    def _fileno(self) -> int:
        if self._ser is None:
            raise PortLost(self.path, "port is closed")
        return self._fd

    def still_present(self) -> bool:
        """True while the path still names the device we opened."""
        try:
            return os.stat(self.path).st_rdev == self._rdev
        except OSError:
            return False

    async def _wait(self, fd: int, *, writable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        (loop.add_writer if writable else loop.add_reader)(fd, wake)
        self._waiters.add(fut)
        try:
            await fut
        finally:
            self._waiters.discard(fut)
            if self._ser is not None:  # close() already unregistered a closed fd
                (loop.remove_writer if writable else loop.remove_reader)(fd)

    async def read(self) -> bytes:
        """Next bytes available (at least one); waits for data as long as the device is there.

        Callers wanting a limit wrap it in ``asyncio.timeout``; cancelling loses no data.
        """
        while True:
            fd = self._fileno()
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise PortLost(self.path, f"read failed: {exc.strerror}") from exc
            else:
                if not data:
                    raise PortLost(self.path, "device hung up")
                self.bytes_in += len(data)
                return data
            try:
                async with asyncio.timeout(LIVENESS_S):
                    await self._wait(fd, writable=False)
            except TimeoutError:
                if not self.still_present():
                    raise PortLost(self.path, "device node vanished") from None

    async def write(self, data: bytes) -> None:
        """Write all of ``data``; waits while the device does not take it (flow control), so
        callers put it under ``asyncio.timeout``."""
        view = memoryview(data)
        while view:
            fd = self._fileno()
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                raise PortLost(self.path, f"write failed: {exc.strerror}") from exc
            view = view[n:]
            if view:
                await self._wait(fd, writable=True)

    async def send_break(self, seconds: float) -> bool:
        """Hold the line in break for ``seconds`` (SDI-12 wake-up); False if the device can't."""
        ser = self._ser
        if ser is None:
            raise PortLost(self.path, "port is closed")
        try:
            ser.break_condition = True
        except (OSError, termios.error):
            return False  # a pty or an adapter without break support
        try:
            await asyncio.sleep(seconds)
        finally:
            if self._ser is ser:  # a break left on would jam the bus for every sensor
                with contextlib.suppress(OSError, termios.error):
                    ser.break_condition = False
        return True

    def reset_input(self) -> None:
        """Drop what the kernel holds unread (stale replies before a new command)."""
        if self._ser is not None:
            # A vanished device shows up on the next read as PortLost.
            with contextlib.suppress(OSError, termios.error):
                self._ser.reset_input_buffer()

    def close(self) -> None:
        ser, self._ser = self._ser, None
        if ser is None:
            return
        try:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
        except RuntimeError:
            pass  # closed outside a loop: nothing was registered by this thread
        for fut in self._waiters:  # a read or write waiting on this fd ends now
            if not fut.done():
                fut.set_exception(PortLost(self.path, "port closed"))
        # Drop unsent bytes so close() does not wait for a drain that never comes.
        with contextlib.suppress(OSError, termios.error):
            ser.reset_output_buffer()
        ser.close()


class PortLink:
    """Keeps one port open for a source: open, run a session, reopen after a loss.

    ``session(port)`` talks to the device until it raises :class:`PortLost`; the port is then
    closed and reopened after a backoff delay (reset once the device has sent a byte).
    Port faults are counted as errors: ``open_failed``, ``port_lost``. ``run`` returns only
    after ``close()`` (the source's ``aclose``); otherwise it runs until cancelled.
    """

    def __init__(self, cfg: SerialConfigBase, stats: SourceStats, faults: FaultLog) -> None:
        self.cfg, self.stats, self.faults = cfg, stats, faults
        self.port: SerialPort | None = None
        self.backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        self._closed = asyncio.Event()
        stats.detail.update(port=cfg.port, port_open=False, opens=0)

    async def run(
        self,
        session: Callable[[SerialPort], Awaitable[None]],
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        while not self._closed.is_set():
            port = SerialPort(self.cfg)
            try:
                port.open()
            except PortUnavailable as exc:
                self.stats.state = "port_unavailable"
                self.faults.error("open_failed", exc.reason, event="port_open_failed")
                await self._pause(self.backoff.next())
                continue
            self.port = port
            self.stats.detail["opens"] += 1
            self.stats.detail["port_open"] = True
            log.info("port_opened", source=self.faults.source, port=self.cfg.port)
            try:
                await session(port)
                raise PortLost(port.path, "session ended")  # sessions run until the port is lost
            except PortLost as exc:
                if not self._closed.is_set():
                    self.stats.state = "port_lost"
                    self.faults.error("port_lost", exc.reason, event="port_lost")
            finally:
                port.close()
                self.port = None
                self.stats.detail["port_open"] = False
            if on_lost is not None:
                on_lost()
            if port.bytes_in:
                self.backoff.reset()
            await self._pause(self.backoff.next())
        self.stats.state = "closed"

    async def _pause(self, delay: float) -> None:
        """Backoff delay, cut short by ``close()``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closed.wait()

    def close(self) -> None:
        """Close the port now and make ``run`` return instead of reopening. Idempotent."""
        self._closed.set()
        if self.port is not None:
            self.port.close()


class LineChannel:
    """Lines from a port: framing faults counted, lines handed out in arrival order."""

    def __init__(self, port: SerialPort, framer: LineFramer, faults: FaultLog) -> None:
        self.port, self.framer, self.faults = port, framer, faults
        self._pending: deque[bytes] = deque()

    async def read_lines(self) -> list[bytes]:
        """All complete lines available (at least one). Cancelling (a timeout) loses none."""
        while not self._pending:
            data = await self.port.read()
            for item in self.framer.feed(data, time.monotonic()):
                if isinstance(item, Discarded):
                    msg = f"{item.size} bytes dropped"
                    self.faults.rejected(item.kind, msg, port=self.port.path)
                else:
                    self._pending.append(item)
        lines = list(self._pending)
        self._pending.clear()
        return lines

    async def read_line(self) -> bytes:
        """The next complete line."""
        if not self._pending:
            self._pending.extend(await self.read_lines())
        return self._pending.popleft()

    def flush(self) -> None:
        """Forget everything received so far (before a command whose reply must be fresh)."""
        self._pending.clear()
        self.framer.reset()
        self.port.reset_input()

    def lost(self) -> None:
        """Count a line cut off by the port going away."""
        dropped = self.framer.reset()
        if dropped is not None:
            self.faults.rejected(dropped.kind, f"{dropped.size} bytes cut off", port=self.port.path)
