"""Configuration: one TOML file validated into pydantic(-settings) models.

Every error is reported as ``toml.path -> message`` (with ``(line N)`` where the key can be found
in the file), all of them at once, so ``fieldgate check-config`` shows the whole list and
``fieldgate run`` exits 78 (EX_CONFIG; the systemd unit does not restart on it).

Secrets are never plain strings in the file unless the user insists. A secret field takes an
inline table naming where the value lives::

    token = { credential = "qatium" }      # $CREDENTIALS_DIRECTORY/qatium (systemd LoadCredential)
    token = { file = "/etc/fieldgate/qatium.token" }
    token = { env = "QATIUM_TOKEN" }
    token = { value = "...", plain_text = true }   # discouraged: a warning is logged

Values are resolved when the file is loaded (a missing file or variable is a config error), wrapped
in :class:`Secret` (whose repr and str are masked) and registered with the log redaction net.

Plugins (sources, uplinks) declare their own config models in their own modules; the ``type``
field is the discriminator and the unions below are the registry. Plugin modules keep their heavy
imports (httpx, pymodbus, pyserial, aiomqtt) out of module level so that loading the config imports
only pydantic.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("/etc/fieldgate/fieldgate.toml")
EX_CONFIG = 78

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, values are not coerced loosely."""

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
        default_factory=lambda: Path(os.environ.get("STATE_DIRECTORY", "/var/lib/fieldgate"))
        / "fieldgate.db"
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

    def series_names(self) -> Iterable[str] | None:
        """The series this source produces, when known from config (None: discovered at run time)."""
        return None


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


SourceConfig = Annotated[SyntheticSourceConfig, Field(discriminator="type")]


# ----------------------------------------------------------------------------------------------
# Uplinks


class RouteBase(Strict):
    """One series sent to one uplink; plugins add the service's identifiers for it."""

    series: str = Field(min_length=1, max_length=200)


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
    #: Batches in flight at once.
    concurrency: int = Field(default=1, ge=1, le=64)
    timeout_s: float = Field(default=30.0, gt=0)
    backoff_initial_s: float = Field(default=1.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    #: After credentials are refused, wait this long before trying again.
    auth_retry_s: float = Field(default=600.0, gt=0)

    route_model: ClassVar[type[RouteBase]] = RouteBase

    @model_validator(mode="after")
    def _unique_series(self) -> UplinkConfigBase:
        routes: list[RouteBase] = getattr(self, "routes", [])
        seen: set[str] = set()
        dups = sorted({r.series for r in routes if r.series in seen or seen.add(r.series)})  # type: ignore[func-returns-value]
        if dups:
            raise ValueError(f"series routed twice to this uplink: {', '.join(dups)}")
        return self

    def routed_series(self) -> list[str]:
        return [r.series for r in getattr(self, "routes", [])]


def _uplink_union() -> Any:
    # Imported here so that a plugin module may import config.py for its base classes.
    from gateway.uplinks.qatium import QatiumConfig

    return Annotated[QatiumConfig, Field(discriminator="type")]


UplinkConfig = _uplink_union()


# ----------------------------------------------------------------------------------------------
# The whole file


class Settings(BaseSettings):
    """The whole configuration. Environment variables ``FIELDGATE_<SECTION>__<KEY>`` override
    scalar values of the file (e.g. ``FIELDGATE_HEALTH__PORT=9000``)."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="FIELDGATE_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    store: StoreConfig = Field(default_factory=StoreConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    sources: list[SourceConfig] = Field(default_factory=list)
    uplinks: list[UplinkConfig] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment overrides the file; no .env or secrets-dir magic (secrets are explicit refs).
        return (env_settings, init_settings)

    @field_validator("sources", "uplinks")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        names = [i.name for i in items]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"names must be unique, repeated: {', '.join(dups)}")
        return items

    def uplink(self, name: str) -> Any:
        for u in self.uplinks:
            if u.name == name:
                return u
        known = ", ".join(u.name for u in self.uplinks) or "none configured"
        raise ConfigError([("uplinks", f"no uplink named {name!r} (known: {known})")])

    def produced_series(self) -> set[str] | None:
        """All series the sources declare, or None when some source discovers them at run time."""
        out: set[str] = set()
        for s in self.sources:
            names = s.series_names()
            if names is None:
                return None
            out.update(names)
        return out


# ----------------------------------------------------------------------------------------------
# Loading and error reporting


class LoadedConfig:
    """A validated config plus what was resolved while loading it."""

    def __init__(
        self,
        settings: Settings,
        path: Path | None,
        secrets: Mapping[str, Secret],
        warnings: list[str],
    ) -> None:
        self.settings = settings
        self.path = path
        #: Resolved secrets keyed by TOML path (``uplinks[0].token``).
        self.secrets = dict(secrets)
        self.warnings = warnings

    def secret(self, path: str) -> Secret:
        return self.secrets[path]


def load_config(path: Path | str) -> LoadedConfig:
    """Read, parse and validate a TOML file. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", f"config file {path} does not exist")], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"config file {path} cannot be read: {exc}")], str(path)) from None
    return load_config_text(text, path)


def load_config_text(text: str, path: Path | None = None) -> LoadedConfig:
    where = str(path) if path else "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"TOML syntax error: {exc}")], where) from None
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        problems = [_problem(err, data, text) for err in exc.errors()]
        raise ConfigError(problems, where) from None

    problems: list[tuple[str, str]] = []
    warnings: list[str] = []
    secrets = _resolve_secrets(settings, text, problems, warnings)
    problems.extend(_cross_checks(settings, text, warnings))
    if problems:
        raise ConfigError(problems, where)
    if path is not None and secrets and world_readable(path) and _has_plain_secret(settings):
        warnings.append(f"{path} holds a plain-text secret and is readable by other users")
    return LoadedConfig(settings, path, secrets, warnings)


def _walk_secret_refs(obj: Any, prefix: str) -> Iterable[tuple[str, SecretRef]]:
    if isinstance(obj, SecretRef):
        yield prefix, obj
    elif isinstance(obj, BaseModel):
        for name in type(obj).model_fields:
            yield from _walk_secret_refs(getattr(obj, name), f"{prefix}.{name}" if prefix else name)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _walk_secret_refs(v, f"{prefix}[{i}]")


def _has_plain_secret(settings: Settings) -> bool:
    return any(ref.value is not None for _, ref in _walk_secret_refs(settings, ""))


def _resolve_secrets(
    settings: Settings, text: str, problems: list[tuple[str, str]], warnings: list[str]
) -> dict[str, Secret]:
    out: dict[str, Secret] = {}
    for tpath, ref in _walk_secret_refs(settings, ""):
        try:
            out[tpath] = ref.resolve()
        except ValueError as exc:
            problems.append((_with_line(tpath, text), str(exc)))
            continue
        if ref.value is not None:
            warnings.append(f"{tpath}: secret kept in plain text in the config file")
        elif ref.file is not None and world_readable(ref.file):
            warnings.append(f"{tpath}: secret file {ref.file} is readable by other users")
    return out


def _cross_checks(settings: Settings, text: str, warnings: list[str]) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    source_names = {s.name for s in settings.sources}
    for si, src in enumerate(settings.sources):
        if src.position_from is not None and src.position_from not in source_names:
            tpath = f"sources[{si}].position_from"
            problems.append((_with_line(tpath, text), f"no source named {src.position_from!r}"))
    produced = settings.produced_series()
    for ui, u in enumerate(settings.uplinks):
        for ri, series in enumerate(u.routed_series()):
            if produced is not None and series not in produced:
                warnings.append(
                    f"uplinks[{ui}].routes[{ri}].series: no configured source declares "
                    f"series {series!r} (it will be sent if a source produces it)"
                )
    return problems


def _problem(err: Mapping[str, Any], data: Mapping[str, Any], text: str) -> tuple[str, str]:
    loc = list(err.get("loc", ()))
    parts: list[str] = []
    node: Any = data
    for part in loc:
        # Discriminated unions add the tag (the ``type`` value) to the location: drop it.
        if isinstance(part, str) and isinstance(node, dict) and part not in node:
            if node.get("type") == part:
                continue
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(f".{part}" if parts else str(part))
        if isinstance(node, dict):
            node = node.get(part)  # type: ignore[call-overload]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    tpath = "".join(parts)
    msg = str(err.get("msg", "invalid"))
    kind = err.get("type")
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        msg = f"unknown type {ctx.get('tag')!r} (known: {ctx.get('expected_tags')})"
    msg = msg.removeprefix("Value error, ")
    return _with_line(tpath, text), msg


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"']+(?:\s*\.\s*[A-Za-z0-9_\-\"']+)*)\s*=")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _with_line(tpath: str, text: str) -> str:
    line = locate(text, tpath)
    return f"{tpath} (line {line})" if line else tpath


def locate(text: str, tpath: str) -> int | None:
    """Best-effort line number of a TOML path like ``uplinks[0].routes[2].unit``.

    Tracks ``[table]`` and ``[[array]]`` headers and ``key =`` lines; returns the line of the
    deepest prefix of the path that could be found (None when not even the first part is).
    """
    want: list[str | int] = []
    for name, idx in _PATH_PART.findall(tpath):
        want.append(int(idx) if idx else name)
    if not want:
        return None
    counters: dict[tuple[str | int, ...], int] = {}
    table: tuple[str | int, ...] = ()
    best: tuple[int, int] = (0, 0)  # (matched length, line)

    def consider(path: tuple[str | int, ...], lineno: int) -> None:
        nonlocal best
        n = 0
        for a, b in zip(path, want, strict=False):
            if a != b:
                break
            n += 1
        if n == len(path) and n > best[0]:
            best = (n, lineno)

    for lineno, raw in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(raw)
        if m and not _KEY.match(raw):
            names: list[str | int] = [p.strip().strip("\"'") for p in m.group(2).split(".")]
            resolved: list[str | int] = []
            # Arrays of tables nest: [[uplinks.routes]] belongs to the latest [[uplinks]].
            for i, nm in enumerate(names):
                resolved.append(nm)
                key = tuple(resolved)
                if key in counters and (i < len(names) - 1 or m.group(1) != "[["):
                    resolved.append(counters[key])
            if m.group(1) == "[[":
                key = tuple(resolved)
                counters[key] = counters.get(key, -1) + 1
                resolved.append(counters[key])
                # A new array element forgets the counters of its own sub-arrays.
                for k in [k for k in counters if len(k) > len(key) and k[: len(key)] == key]:
                    del counters[k]
            table = tuple(resolved)
            consider(table, lineno)
            continue
        km = _KEY.match(raw)
        if km:
            keys = [p.strip().strip("\"'") for p in km.group(1).split(".")]
            consider((*table, *keys), lineno)
    return best[1] or None
