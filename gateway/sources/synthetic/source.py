"""A generator of plausible readings (sine, random walk, sawtooth, square, counter, constant).

For the demo and benchmarks: it goes through exactly the path a real source uses (one batch of
readings per tick handed to ``emit``). Ticks are deadline-based, so a slow emit does not drift
the schedule; missed ticks are skipped, not bunched.
"""

from __future__ import annotations

import asyncio
import math
import random
import time

import structlog

from gateway.models import Position, Reading
from gateway.sources.base import Emit, SourceStats, now_ms
from gateway.sources.synthetic.config import SyntheticSeries, SyntheticSourceConfig

log = structlog.get_logger(__name__)


class SyntheticSource:
    def __init__(self, cfg: SyntheticSourceConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self.stats = SourceStats()
        self._rng = random.Random(cfg.seed)
        self._names: list[tuple[str, SyntheticSeries]] = []
        for s in cfg.series:
            if cfg.replicas == 1:
                self._names.append((s.name, s))
            else:
                self._names.extend((f"{s.name}.{i}", s) for i in range(1, cfg.replicas + 1))
        self._walk: dict[str, float] = {}
        self._count = 0
        p = cfg.position
        self._position = Position(p.lat, p.lon, p.alt) if p else None

    def _value(self, name: str, s: SyntheticSeries, t: float) -> float | int:
        span = s.max - s.min
        phase = (t % s.period_s) / s.period_s
        if s.waveform == "sine":
            v = s.min + span * (0.5 + 0.5 * math.sin(2 * math.pi * phase))
        elif s.waveform == "sawtooth":
            v = s.min + span * phase
        elif s.waveform == "square":
            v = s.max if phase < 0.5 else s.min
        elif s.waveform == "counter":
            return self._count
        elif s.waveform == "constant":
            v = s.min
        else:
            cur = self._walk.get(name, s.min + span / 2)
            cur += self._rng.uniform(-1, 1) * s.step * span
            cur = min(s.max, max(s.min, cur))
            self._walk[name] = cur
            v = cur
        return round(v, s.decimals) if s.decimals is not None else v

    def sample(self) -> list[Reading]:
        ts = now_ms()
        t = ts / 1000
        self._count += 1
        pos = self._position
        return [Reading(name, ts, self._value(name, s, t), pos) for name, s in self._names]

    async def run(self, emit: Emit) -> None:
        interval = self.cfg.interval_s
        next_tick = time.monotonic()
        while True:
            batch = self.sample()
            await emit(batch)
            self.stats.ok(len(batch))
            next_tick += interval
            now = time.monotonic()
            if next_tick < now:  # fell behind: skip the missed ticks
                next_tick = now + interval - ((now - next_tick) % interval)
            await asyncio.sleep(next_tick - now)

    async def aclose(self) -> None:
        return None
