"""ASCII line loggers (``type = "serial_lines"``): one record per line, interpreted by the
line format of gateway/sources/serial/parsers.py and stamped on arrival (or by the logger's
own timestamp)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.models import Reading
from gateway.sources.base import Emit, SourceStats, now_ms
from gateway.sources.serial.config import (
    SerialLinesConfig,
)
from gateway.sources.serial.parsers import (
    LineInterpreter,
    LineRejected,
    decode_line,
)
from gateway.sources.serial.port import (
    FaultLog,
    LineChannel,
    LineFramer,
    PortLink,
    PortLost,
    SerialPort,
)

if TYPE_CHECKING:
    pass


# ----------------------------------------------------------------------------------------------
# The line-logger source


class SerialLinesSource:
    """Reads a line logger; one batch of readings per chunk of complete lines."""

    def __init__(self, cfg: SerialLinesConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.stats = SourceStats()
        self._faults = FaultLog(cfg.name, self.stats)
        self._interp = LineInterpreter(cfg, f"{cfg.name}.")
        self._link = PortLink(cfg, self.stats, self._faults)
        self.stats.detail["lines"] = 0

    async def run(self, emit: Emit) -> None:
        """Read until cancelled (or until ``aclose``); port faults are handled inside."""
        await self._link.run(lambda port: self._session(port, emit))

    async def aclose(self) -> None:
        self._link.close()

    async def _session(self, port: SerialPort, emit: Emit) -> None:
        cfg = self.cfg
        framer = LineFramer(
            cfg.terminator.encode(cfg.encoding),
            cfg.max_line_bytes,
            cfg.partial_line_timeout_s,
        )
        channel = LineChannel(port, framer, self._faults)
        try:
            while True:
                try:
                    async with asyncio.timeout(cfg.silence_reopen_s):
                        lines = await channel.read_lines()
                except TimeoutError:
                    raise PortLost(port.path, f"silent for {cfg.silence_reopen_s} s") from None
                batch, good = self._readings(lines, now_ms())
                if batch:
                    await emit(batch)
                if good:
                    self.stats.ok(len(batch))
        except PortLost:
            channel.lost()
            raise

    def _readings(self, lines: list[bytes], arrival_ms: int) -> tuple[list[Reading], int]:
        """Readings of the good lines, and how many lines were good (ignored ones count)."""
        out: list[Reading] = []
        good = 0
        for raw in lines:
            self.stats.detail["lines"] += 1
            try:
                text = decode_line(raw, self.cfg.encoding)
                ignored = self._interp.ignored(text)
                readings = [] if ignored else self._interp.interpret(text, arrival_ms)
            except LineRejected as exc:
                self._faults.rejected(exc.kind, str(exc), line=repr(raw[:80]))
                continue
            self._faults.good()
            good += 1
            out.extend(readings)
        return out, good
