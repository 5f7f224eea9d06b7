"""The source registry: one case per source type, from its config model to its plugin.

``gateway.config`` lists the config models (the ``SourceConfig`` union); this module is the one
place that knows which plugin each model builds, so a new source type is one config model, one
plugin and one case here (mypy's ``assert_never`` fails the build if a case is missing).
Optional capabilities are protocols the plugin implements (``gateway.probe.Probes``).

Each case imports its plugin when it builds one: a gateway loads only the drivers its config
uses (pymodbus and pyserial together weigh several MiB of RSS on a Pi). Plugin modules import
their transport libraries at module level; only this registry defers them.
"""

from __future__ import annotations

from pathlib import Path
from typing import assert_never

from gateway.config import SourceConfig
from gateway.sources.base import Source
from gateway.sources.modbus.config import ModbusSourceConfig
from gateway.sources.position import PositionBoard
from gateway.sources.serial.config import NmeaConfig, Sdi12Config, SerialLinesConfig
from gateway.sources.synthetic.config import SyntheticSourceConfig


def build_source(cfg: SourceConfig, *, base_dir: Path, positions: PositionBoard) -> Source:
    """The plugin for ``cfg``. ``base_dir`` resolves relative paths (Modbus device profiles):
    the config file's directory. ``positions`` is where GPS sources publish their fix."""
    match cfg:
        case SyntheticSourceConfig():
            from gateway.sources.synthetic.source import SyntheticSource

            return SyntheticSource(cfg)
        case SerialLinesConfig():
            from gateway.sources.serial.lines import SerialLinesSource

            return SerialLinesSource(cfg)
        case NmeaConfig():
            from gateway.sources.serial.nmea import NmeaSource

            return NmeaSource(cfg, positions)
        case Sdi12Config():
            from gateway.sources.serial.sdi12 import Sdi12Source

            return Sdi12Source(cfg)
        case ModbusSourceConfig():
            from gateway.sources.modbus.source import ModbusSource

            return ModbusSource(cfg, base_dir)
        case _:
            assert_never(cfg)
