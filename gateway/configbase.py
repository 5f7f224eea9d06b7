"""Config building blocks shared by the core and every plugin.

Plugins subclass :class:`SourceConfigBase`, :class:`UplinkConfigBase` and :class:`RouteBase`
from here; :mod:`gateway.config` gathers them into the discriminated unions and loads files.
(Two modules so that a plugin module imported on its own does not import itself in a cycle.)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from gateway.routes import is_pattern

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors; models are frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------------
# Secrets


class Secret:
    """A resolved secret value. ``str()``/``repr()`` never show it; ``reveal()`` does."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({self.origin})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


#: Every secret value resolved in this process; gateway.logs masks them in every log event.
KNOWN_SECRETS: set[str] = set()


class SecretRef(Strict):
    """Where a secret lives. Exactly one of credential, file, env or value."""

    credential: str | None = None
    file: Path | None = None
    env: str | None = None
    value: str | None = Field(default=None, repr=False)
    plain_text: bool = False
    #: The value, once the config loader resolved it (:meth:`bind`); never part of the model's
    #: fields, repr or dump.
    _resolved: Secret | None = PrivateAttr(default=None)
    #: Why the loader left it unresolved (:meth:`defer`), for the error :meth:`secret` raises.
    _deferred: str | None = PrivateAttr(default=None)

    def bind(self, secret: Secret) -> None:
        """Keep the value the loader resolved, for the plugin built from this config."""
        self._resolved = secret
        self._deferred = None

    def defer(self, reason: str) -> None:
        """Leave the value unresolved on purpose (a command that needs no secret, or a systemd
        credential checked outside the service); ``reason`` names the place, never a value."""
        self._resolved = None
        self._deferred = reason

    def secret(self) -> Secret:
        """The resolved value. Plugins get their secrets here (gateway/*/registry.py).

        Raises LookupError naming the place (never a value) when the loader did not resolve it.
        """
        if self._resolved is None:
            why = self._deferred or "it was not resolved when the config was loaded"
            raise LookupError(f"secret {self.where()} is not available: {why}")
        return self._resolved

    def where(self) -> str:
        """Where the value lives (never the value)."""
        if self.credential is not None:
            return f"credential {self.credential!r}"
        if self.file is not None:
            return f"file {self.file}"
        if self.env is not None:
            return f"env {self.env}"
        return "plain text in config"

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        given = [k for k in ("credential", "file", "env", "value") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of credential, file, env or value")
        if self.value is not None and not self.plain_text:
            raise ValueError(
                "a secret in plain text needs plain_text = true; prefer credential, file or env"
            )
        return self

    def resolve(self) -> Secret:
        """Read the secret now. Raises ValueError naming the place (never the value)."""
        if self.value is not None:
            return _register(Secret(self.value, "plain text in config"))
        if self.env is not None:
            v = os.environ.get(self.env)
            if not v:
                raise ValueError(f"environment variable {self.env} is not set or empty")
            return _register(Secret(v, f"env {self.env}"))
        if self.credential is not None:
            base = os.environ.get("CREDENTIALS_DIRECTORY")
            if not base:
                raise ValueError(
                    f"credential {self.credential!r} needs $CREDENTIALS_DIRECTORY "
                    "(systemd LoadCredential=); outside systemd use file or env"
                )
            path = Path(base) / self.credential
        else:
            assert self.file is not None
            path = self.file
        try:
            v = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise ValueError(f"secret file {path} does not exist") from None
        except OSError as exc:
            raise ValueError(f"secret file {path} cannot be read: {exc.strerror}") from None
        if not v:
            raise ValueError(f"secret file {path} is empty")
        return _register(Secret(v, f"file {path}"))


def _register(secret: Secret) -> Secret:
    if len(secret.reveal()) >= 4:  # masking 1-3 character strings would mangle every log line
        KNOWN_SECRETS.add(secret.reveal())
    return secret


def mask_secrets(text: str) -> str:
    """``text`` with every resolved secret replaced by ``***``: for text that came from outside
    (a service's error body may echo the credential it refused) before it is shown or stored."""
    for s in KNOWN_SECRETS:
        if s in text:
            text = text.replace(s, "***")
    return text


def world_readable(path: Path) -> bool:
    """True when other users may read ``path`` (the gateway warns about secrets kept so)."""
    try:
        return bool(path.stat().st_mode & stat.S_IROTH)
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# Core sections


class StoreConfig(Strict):
    """``[store]``: the SQLite store-and-forward queue."""

    path: Path = Field(
        default_factory=lambda: (
            Path(os.environ.get("STATE_DIRECTORY", "/var/lib/fieldgate")) / "fieldgate.db"
        )
    )
    #: Disk quota for the database (bytes in use by pages); the oldest readings are evicted past it.
    quota_bytes: int = Field(default=1 << 30, ge=1 << 20)
    #: Readings older than this (by timestamp) are evicted even when the quota is not reached.
    retention_days: float = Field(default=30.0, gt=0)
    #: Group commit: a batch is committed after this long or this many rows, whichever is first.
    commit_interval_ms: int = Field(default=250, ge=1, le=10_000)
    commit_max_rows: int = Field(default=20_000, ge=1, le=1_000_000)
    #: Readings held in memory awaiting commit before sources are made to wait.
    buffer_max_rows: int = Field(default=200_000, ge=1000)
    #: SQLite synchronous level in WAL mode. "full" fsyncs every (grouped) commit, so a captured
    #: reading survives a power cut; "normal" may lose the last commits on power loss, never
    #: corrupting the file. See README "Durability".
    synchronous: Literal["full", "normal"] = "full"


class HealthConfig(Strict):
    """``[health]``: the local HTTP endpoint (/health, /status, /metrics)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    #: An uplink with backlog and no delivery for this long makes /health answer 503.
    stuck_after_s: float = Field(default=3600.0, gt=0)
    #: Bearer token for the web console, /status, /history and /metrics; required when ``host``
    #: is not loopback (gateway/console: the config is refused without it).
    console_token: SecretRef | None = None


class ClockConfig(Strict):
    """``[clock]``: how the gateway decides that the system clock can be trusted (gateway/clock.py).

    "probe" trusts the clock once systemd-timesyncd's flag file exists or the kernel's NTP state
    (adjtimex) says synchronised. "always" trusts it from the start: a box with a battery-backed
    RTC or a clock the kernel does not report on. Either way a clock before 2020 is not trusted.
    """

    trust: Literal["probe", "always"] = "probe"
    #: A change of wall minus monotonic time larger than this between two looks is a step.
    step_threshold_s: float = Field(default=2.0, ge=0.05, le=3600)
    #: How often the clock task looks at the clock and the sync state.
    check_interval_s: float = Field(default=1.0, ge=0.01, le=60)
    #: A timestamp more than this far ahead of the synchronised clock is rejected (counted, never
    #: stored, never moving its series). 1 day: above any logger drift or time-zone mistake
    #: (UTC+14 at most), so only broken times (9999, a wrong year or month) are lost, and a bad
    #: time inside the bound holds its series back by at most this long. While the clock is not
    #: synchronised it also tells a source's own time from the system clock's (gateway/clock.py).
    max_future_s: float = Field(default=86_400.0, ge=60, le=3650 * 86_400)
    #: A timestamp older than this (by the system clock) is rejected. 365 days: a logger replaying
    #: weeks or months of memory after an outage is kept (well above [store] retention_days'
    #: default of 30, so the store's retention, not this, decides what old data is kept), a dead
    #: logger clock (1970, 2000-01-01) is not.
    max_age_days: float = Field(default=365.0, ge=7, le=36_500)

    @model_validator(mode="after")
    def _future_above_step(self) -> ClockConfig:
        # A backward step smaller than step_threshold_s is not seen: the gateway's own stamps
        # taken just before it are that much ahead of the clock, and must never be rejected.
        if self.max_future_s <= self.step_threshold_s:
            raise ValueError("max_future_s must be larger than step_threshold_s")
        return self


class LogConfig(Strict):
    """``[log]``: structlog output. "auto" is key=value on a terminal, JSON lines otherwise."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


# ----------------------------------------------------------------------------------------------
# Sources


class PositionConfig(Strict):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    alt: float | None = None


class SourceConfigBase(Strict):
    """Fields every ``[[sources]]`` entry has. Plugins subclass it with ``type: Literal[...]``."""

    name: str = Field(pattern=NAME_PATTERN)
    enabled: bool = True
    #: Fixed position attached to every reading of this source.
    position: PositionConfig | None = None
    #: Name of a GPS source whose latest fix is attached to this source's readings (overrides
    #: ``position`` while there is a fix).
    position_from: str | None = None
    #: When the store commits this source's readings. "grouped": with whatever else arrives
    #: within ``[store] commit_interval_ms`` (few, large writes: an SD card lasts longer).
    #: "prompt": at once, for devices that never resend (serial sources default to it): a kill
    #: then loses only what is still in transit.
    commit: Literal["prompt", "grouped"] = "grouped"

    #: The plugin attaches ``position`` to its readings itself (the app does not).
    stamps_own_position: ClassVar[bool] = False

    def series_names(self) -> Iterable[str] | None:
        """The series this source produces, when known from config (None: found at run time)."""
        return None


class RouteBase(Strict):
    """One series sent to one uplink; plugins add the service's identifiers for it.

    ``min_interval_s`` (shared machinery, gateway/uplinks/downsample.py): at most one value per
    window of that many seconds, windows aligned to multiples of it in UTC; the value is the
    window's ``downsample`` aggregate and carries the window's start as its timestamp. 0 sends
    every reading as it is.
    """

    #: A series name, or a pattern where each ``*`` matches any run of characters (plugins that
    #: allow it; gateway/routes.py has the precedence rules).
    series: str = Field(min_length=1, max_length=200)
    min_interval_s: float = Field(default=0.0, ge=0)
    downsample: Literal["last", "mean", "min", "max"] = "last"


class UplinkConfigBase(Strict):
    """Fields every ``[[uplinks]]`` entry has: the shared delivery machinery's knobs.

    Defaults are conservative; each plugin overrides the ones its service documents.
    """

    name: str = Field(pattern=NAME_PATTERN)
    enabled: bool = True
    #: "live_first": after an outage the newest readings go first and the backlog drains behind
    #: them with what quota remains. "oldest_first": strictly in capture order.
    order: Literal["live_first", "oldest_first"] = "live_first"
    batch_max_items: int = Field(default=1000, ge=1, le=1_000_000)
    batch_max_bytes: int = Field(default=1 << 20, ge=256)
    #: At most this many requests in any window of ``rate_limit_period_s`` (0: unlimited).
    rate_limit_requests: int = Field(default=60, ge=0)
    rate_limit_period_s: float = Field(default=60.0, gt=0)
    #: "even": requests at least ``rate_limit_period_s / rate_limit_requests`` apart, each
    #: carrying what became pending meanwhile (steady delivery); "burst": only the window, so a
    #: minute's quota may go in its first seconds and then nothing until the window moves.
    pacing: Literal["even", "burst"] = "even"
    #: Routes with ``min_interval_s``: how long a window with no later reading in hand stays
    #: open after its end by the wall clock and after the series' last capture (None: one
    #: window, at most 300 s). Shorter sends the last window of a stopped source sooner; a
    #: reading arriving after its window was sent is dead-lettered, so not shorter than the
    #: source's poll interval plus its delay.
    window_grace_s: float | None = Field(default=None, ge=0, le=86_400)
    #: Batches in flight at once.
    concurrency: int = Field(default=1, ge=1, le=64)
    timeout_s: float = Field(default=30.0, gt=0)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    #: Cap for retries after the service could not be reached (connection refused, reset or
    #: dropped, DNS, timeout): the delay doubles from ``backoff_initial_s`` up to this (at most
    #: ``backoff_max_s``), jittered, never below half of ``backoff_initial_s``, so a link that
    #: comes back is used again within seconds. ``backoff_max_s`` caps the retries after the
    #: service answered and refused (5xx, 429, MQTT CONNACK refusals, a certificate that does not
    #: verify); refused credentials wait ``auth_retry_s`` (gateway/backoff.py RetrySchedule).
    reconnect_max_s: float = Field(default=5.0, gt=0)
    #: After credentials are refused, wait this long before trying again.
    auth_retry_s: float = Field(default=600.0, gt=0)
    #: Hold readings stamped while the system clock was unsynchronised until their timestamps are
    #: repaired at sync (gateway/clock.py). True suits every service that stores the time it is
    #: sent (all five plugins); false sends them at once, flagged, with the time the clock showed.
    #: Either way a timestamp before 2020 is never sent.
    hold_unsynced: bool = True

    route_model: ClassVar[type[RouteBase]] = RouteBase
    #: Whether routes may name series patterns (``series = "pump*.flow"``, gateway/routes.py):
    #: only plugins whose identifiers can be templated per series (Energydata's topic suffix).
    route_patterns: ClassVar[bool] = False

    #: Which series go to this uplink and how (each plugin narrows the route model).
    routes: Sequence[RouteBase] = ()

    @model_validator(mode="after")
    def _unique_series(self) -> UplinkConfigBase:
        routes = self.routes
        seen: set[str] = set()
        dups = sorted({r.series for r in routes if r.series in seen or seen.add(r.series)})  # type: ignore[func-returns-value]
        if dups:
            raise ValueError(f"series routed twice to this uplink: {', '.join(dups)}")
        if not self.route_patterns:
            patterns = [r.series for r in routes if is_pattern(r.series)]
            if patterns:
                raise ValueError(
                    f"series patterns ({', '.join(patterns[:3])}) are not supported by this "
                    "uplink: each route names one series (patterns: energydata routes)"
                )
        return self

    @model_validator(mode="after")
    def _backoff_order(self) -> UplinkConfigBase:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ValueError(
                f"backoff_initial_s ({self.backoff_initial_s:g} s) is above backoff_max_s "
                f"({self.backoff_max_s:g} s): the first retry would wait longer than the "
                "longest; lower backoff_initial_s or raise backoff_max_s"
            )
        return self

    def routed_series(self) -> list[str]:
        """The routes' ``series``: names and patterns (the store's routing takes both)."""
        return [r.series for r in self.routes]

    def series_problems(self, produced: Iterable[str]) -> list[tuple[str, str]]:
        """(TOML path under this uplink, message) for what routing the series the sources
        declare would get wrong; plugins with pattern routes check what the patterns make."""
        return []
