"""What sending to one NILU sensor needs, prepared once from its config (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from zoneinfo import ZoneInfo

from gateway.uplinks.nilu import packets as pk
from gateway.uplinks.nilu.config import NiluSensor, zone


@dataclass(slots=True)
class SensorPlan:
    """What sending to one sensor needs, prepared once: pattern, zone and current endpoint."""

    cfg: NiluSensor
    tokens: tuple[pk.Token, ...] | None
    zone: ZoneInfo
    endpoint: str
    parameters: frozenset[str]

    @classmethod
    def of(cls, cfg: NiluSensor, base_url: str, parameters: frozenset[str]) -> SensorPlan:
        tokens = pk.parse_pattern(cfg.timestamp_format) if cfg.timestamp_format else None
        return cls(
            cfg,
            tokens,
            zone(cfg.timestamp_timezone or "UTC"),
            pk.default_endpoint(base_url, cfg.id, cfg.gps),
            parameters,
        )

    def timestamp(self, ts_ms: int) -> int | str:
        return pk.timestamp_value(ts_ms, self.tokens, self.zone)
