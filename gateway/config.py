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

Each plugin family keeps its config model in its own folder's ``config.py`` (e.g.
``gateway/uplinks/vanda/config.py``); the ``type`` field is the discriminator and the unions below
list the types. Those modules import no transport library, so loading a config imports only
pydantic: a test proves ``import gateway.config`` loads none of httpx, aiomqtt, pymodbus, serial.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gateway.configbase import (  # re-exported: the config API in one place
    KNOWN_SECRETS,
    NAME_PATTERN,
    ClockConfig,
    HealthConfig,
    LogConfig,
    PositionConfig,
    RouteBase,
    Secret,
    SecretRef,
    SourceConfigBase,
    StoreConfig,
    Strict,
    UplinkConfigBase,
    world_readable,
)
from gateway.errors import ConfigError
from gateway.routes import compile_pattern, is_pattern
from gateway.sources.modbus.config import PROFILE_BASE_DIR, ModbusSourceConfig
from gateway.sources.serial.config import NmeaConfig, Sdi12Config, SerialLinesConfig
from gateway.sources.synthetic.config import SyntheticSeries, SyntheticSourceConfig
from gateway.uplinks.datacooee.config import DatacooeeConfig
from gateway.uplinks.energydata.config import EnergydataConfig
from gateway.uplinks.nilu.config import NiluConfig
from gateway.uplinks.qatium.config import QatiumConfig
from gateway.uplinks.vanda.config import VandaConfig

__all__ = [
    "KNOWN_SECRETS",
    "NAME_PATTERN",
    "ClockConfig",
    "HealthConfig",
    "LoadedConfig",
    "LogConfig",
    "PositionConfig",
    "RouteBase",
    "Secret",
    "SecretRef",
    "Settings",
    "SourceConfig",
    "SourceConfigBase",
    "StoreConfig",
    "Strict",
    "SyntheticSeries",
    "SyntheticSourceConfig",
    "UplinkConfig",
    "UplinkConfigBase",
    "load_config",
    "load_config_text",
    "locate",
    "world_readable",
]

DEFAULT_CONFIG_PATH = Path("/etc/fieldgate/fieldgate.toml")
EX_CONFIG = 78


#: The registry of source types: one config model per plugin, dispatched on ``type``.
SourceConfig = Annotated[
    SyntheticSourceConfig | SerialLinesConfig | NmeaConfig | Sdi12Config | ModbusSourceConfig,
    Field(discriminator="type"),
]
#: The registry of uplink types.
UplinkConfig = Annotated[
    QatiumConfig | NiluConfig | VandaConfig | EnergydataConfig | DatacooeeConfig,
    Field(discriminator="type"),
]


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
    clock: ClockConfig = Field(default_factory=ClockConfig)
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
    except RecursionError:  # tomllib recurses once per nesting level
        raise ConfigError([("", "TOML nesting too deep")], where) from None
    # Relative device-profile paths resolve against the config file's directory.
    token = PROFILE_BASE_DIR.set(path.parent if path is not None else None)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError([_problem(err, data, text) for err in exc.errors()], where) from None
    finally:
        PROFILE_BASE_DIR.reset(token)

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
            ref.bind(out[tpath])
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
    gps = {s.name for s in settings.sources if isinstance(s, NmeaConfig)}
    for si, src in enumerate(settings.sources):
        if src.position_from is not None and src.position_from not in gps:
            tpath = f"sources[{si}].position_from"
            problems.append(
                (
                    _with_line(tpath, text),
                    f'no GPS (type = "nmea") source named {src.position_from!r}',
                )
            )
    produced = settings.produced_series()
    if produced is None:
        return problems
    for ui, u in enumerate(settings.uplinks):
        for ri, series in enumerate(u.routed_series()):
            if is_pattern(series):
                rx = compile_pattern(series)
                if not any(rx.match(s) for s in produced):
                    warnings.append(
                        f"uplinks[{ui}].routes[{ri}].series: the pattern {series!r} matches no "
                        "series a configured source declares (it will take any that appears)"
                    )
            elif series not in produced:
                warnings.append(
                    f"uplinks[{ui}].routes[{ri}].series: no configured source declares "
                    f"series {series!r} (it will be sent if a source produces it)"
                )
        for tpath, msg in u.series_problems(produced):
            problems.append((_with_line(f"uplinks[{ui}].{tpath}", text), msg))
    return problems


def _problem(err: Mapping[str, Any], data: Mapping[str, Any], text: str) -> tuple[str, str]:
    loc = list(err.get("loc", ()))
    parts: list[str] = []
    node: Any = data
    for part in loc:
        # Discriminated unions add the tag (the ``type`` value) to the location: drop it.
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(f".{part}" if parts else str(part))
        if isinstance(node, dict):
            node = node.get(part)
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
