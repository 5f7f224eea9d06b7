"""What ``fieldgate check-config --probe`` asks of a plugin, shared by sources and uplinks.

A plugin that can check its device or service without storing anything implements
:class:`Probes` (Modbus sources read every device once; Vanda compares the service's
examination-type table with the built-in one). ``check-config --probe`` builds each plugin
through its registry and asks those that implement it; the others have nothing to probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ProbeFailure:
    """A device or service the probe could not use as configured: ``name`` is the device (or
    the uplink), ``reason`` why (cannot connect, no answer, an exception or malformed reply, a
    refused field)."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class ProbeReport:
    """What a probe found: the report ``lines`` for a person, and each device that failed.

    ``failures`` is the verdict (``check-config --probe`` exits non-zero when it is not empty);
    the lines only describe, and are never parsed.
    """

    lines: tuple[str, ...]
    failures: tuple[ProbeFailure, ...] = ()


@runtime_checkable
class Probes(Protocol):
    """A plugin that can check its device or service once, storing nothing.

    Never raises for device or network faults (they are reported as failures); may raise a
    :class:`gateway.errors.FieldgateError` when it cannot probe at all. The caller still closes
    the plugin (``aclose``) afterwards.
    """

    async def probe(self) -> ProbeReport: ...
