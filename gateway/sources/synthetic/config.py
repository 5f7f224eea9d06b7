"""Synthetic source (the demo's simulated devices): its config model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from gateway.configbase import SourceConfigBase, Strict


class SyntheticSeries(Strict):
    name: str = Field(min_length=1, max_length=200)
    waveform: Literal["sine", "random_walk", "sawtooth", "counter", "constant", "square"] = "sine"
    min: float = 0.0
    max: float = 1.0
    period_s: float = Field(default=600.0, gt=0)
    #: Largest step of a random walk, as a fraction of (max - min).
    step: float = Field(default=0.02, gt=0, le=1)
    decimals: int | None = Field(default=3, ge=0, le=12)

    @model_validator(mode="after")
    def _range(self) -> SyntheticSeries:
        if self.max < self.min:
            raise ValueError("max must not be below min")
        return self


class SyntheticSourceConfig(SourceConfigBase):
    """A generator of plausible values, for the demo and benchmarks."""

    stamps_own_position: ClassVar[bool] = True

    type: Literal["synthetic"]
    interval_s: float = Field(default=1.0, gt=0)
    series: list[SyntheticSeries] = Field(min_length=1)
    #: Replicate every series N times (name suffixed ``.1`` .. ``.N``), for load tests.
    replicas: int = Field(default=1, ge=1, le=100_000)
    seed: int | None = None

    def series_names(self) -> Iterable[str]:
        for s in self.series:
            if self.replicas == 1:
                yield s.name
            else:
                for i in range(1, self.replicas + 1):
                    yield f"{s.name}.{i}"


# ----------------------------------------------------------------------------------------------
# Uplinks
