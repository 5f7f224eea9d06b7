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
in :class:`Secret` (whose repr and str are masked), registered with the log redaction net and bound
to their reference (``SecretRef.secret()``, where the registries get them). How much is resolved is
the caller's choice (:data:`SecretMode`): ``fieldgate run`` resolves everything; ``check-config``
outside the unit leaves systemd credentials to the service (a note, not an error; ``--strict``
resolves them too); ``queue`` and ``dead-letters`` read only the store and resolve nothing.

Environment variables ``FIELDGATE_<SECTION>__<KEY>`` override the file. Each is checked against
the models: an unknown section or key is an error naming the variable, and so is a bad value
(``FIELDGATE_HEALTH__PORT=abc -> ...``, not a line of the file it replaced).

Problems name both places where two things collide (a repeated source or uplink name gives the
line of each), and a missing or unknown ``type`` lists the types there are.

Each plugin family keeps its config model in its own folder's ``config.py`` (e.g.
``gateway/uplinks/vanda/config.py``); the ``type`` field is the discriminator and the unions below
list the types. Those modules import no transport library, so loading a config imports only
pydantic: a test proves ``import gateway.config`` loads none of httpx, aiomqtt, pymodbus, serial.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, get_args

from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

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
    mask_secrets,
    world_readable,
)
from gateway.console import auth_problems
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
    "SecretMode",
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
        first: dict[str, int] = {}
        repeats: list[tuple[int, int]] = []  # (index of a repeat, index of the first)
        for i, item in enumerate(items):
            if item.name in first:
                repeats.append((i, first[item.name]))
            else:
                first[item.name] = i
        if repeats:
            names = ", ".join(sorted({items[i].name for i, _ in repeats}))
            # The loader shows each repeat with both lines (_problem); the ctx says where.
            raise PydanticCustomError(
                "duplicate_name",
                "names must be unique, repeated: {names}",
                {"names": names, "repeats": repeats},
            )
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


#: How much of the secrets a load resolves (``load_config(..., secrets=)``):
#:
#: * ``"all"``: every reference must resolve (``fieldgate run``, ``check-uplink``,
#:   ``check-config --strict``). A reference that cannot is a config error naming its key.
#: * ``"available"``: what this process can resolve (``check-config``). A systemd credential
#:   while ``$CREDENTIALS_DIRECTORY`` is unset (outside the unit, which alone sets it) is left
#:   to the service and listed in :attr:`LoadedConfig.notes`; env, file and plain values must
#:   resolve as with ``"all"``.
#: * ``"none"``: nothing is resolved (``queue``, ``dead-letters``: they read only the store).
#:
#: A reference left unresolved stays unbound: its :meth:`SecretRef.secret` raises LookupError
#: naming the place, so no plugin can be built from it by mistake.
SecretMode = Literal["all", "available", "none"]


class LoadedConfig:
    """A validated config plus what was resolved while loading it."""

    def __init__(
        self,
        settings: Settings,
        path: Path | None,
        secrets: Mapping[str, Secret],
        warnings: list[str],
        notes: list[str] | None = None,
    ) -> None:
        self.settings = settings
        self.path = path
        #: Resolved secrets keyed by TOML path (``uplinks[0].token``).
        self.secrets = dict(secrets)
        self.warnings = warnings
        #: References left for the service to resolve (``secrets="available"``), one line each.
        self.notes = list(notes or [])

    def secret(self, path: str) -> Secret:
        return self.secrets[path]


def load_config(path: Path | str, *, secrets: SecretMode = "all") -> LoadedConfig:
    """Read, parse and validate a TOML file. Raises ConfigError listing every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([("", f"config file {path} does not exist")], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([("", f"config file {path} cannot be read: {exc}")], str(path)) from None
    return load_config_text(text, path, secrets=secrets)


def load_config_text(
    text: str, path: Path | None = None, *, secrets: SecretMode = "all"
) -> LoadedConfig:
    where = str(path) if path else "<config>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("", f"TOML syntax error: {exc}")], where) from None
    except RecursionError:  # tomllib recurses once per nesting level
        raise ConfigError([("", "TOML nesting too deep")], where) from None
    overrides = _env_overrides(data, os.environ)
    env_problems = [(o.shown, o.problem) for o in overrides if o.problem is not None]
    # Relative device-profile paths resolve against the config file's directory.
    token = PROFILE_BASE_DIR.set(path.parent if path is not None else None)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        found = [p for err in exc.errors() for p in _problem(err, data, text, overrides)]
        raise ConfigError(env_problems + found, where) from None
    except SettingsError as exc:  # an override pydantic-settings could not even decode
        raise ConfigError(env_problems or [("", f"environment overrides: {exc}")], where) from None
    finally:
        PROFILE_BASE_DIR.reset(token)

    problems: list[tuple[str, str]] = list(env_problems)
    warnings: list[str] = []
    notes: list[str] = []
    resolved = _resolve_secrets(
        settings, text, mode=secrets, problems=problems, warnings=warnings, notes=notes
    )
    problems.extend(_cross_checks(settings, text, warnings))
    if problems:
        raise ConfigError(problems, where)
    if path is not None and world_readable(path) and _has_plain_secret(settings):
        warnings.append(f"{path} holds a plain-text secret and is readable by other users")
    return LoadedConfig(settings, path, resolved, warnings, notes)


# ----------------------------------------------------------------------------------------------
# Environment overrides

ENV_PREFIX = "FIELDGATE_"


class _Override(NamedTuple):
    """One ``FIELDGATE_*`` variable that overrides (or tries to override) a config value."""

    var: str
    value: str
    #: The config path it sets, as pydantic-settings reads it (lower case), e.g. (health, port).
    path: tuple[str, ...]
    #: Why it is not a valid override (None: it is one).
    problem: str | None = None

    @property
    def shown(self) -> str:
        value = mask_secrets(self.value)
        return f"{self.var}={value if len(value) <= 40 else value[:37] + '...'}"


def _env_overrides(data: Mapping[str, Any], environ: Mapping[str, str]) -> list[_Override]:
    """Every ``FIELDGATE_<SECTION>__<KEY>`` variable, checked against the config's models.

    A variable with ``__`` in its name, or named after a section (a whole section as JSON), is
    an override and must name a key that exists. A single ``_`` after a section's name is the
    usual typo for ``__`` and is reported. Other ``FIELDGATE_*`` variables (``FIELDGATE_CONFIG``,
    a secret's ``{ env = ... }``) are not overrides and are left alone, like pydantic-settings
    does.
    """
    referenced = set(_env_secret_names(data))
    sections = Settings.model_fields
    out: list[_Override] = []
    for var, value in sorted(environ.items()):
        if not var.upper().startswith(ENV_PREFIX) or var in referenced:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        parts = tuple(rest.split("__"))
        if len(parts) == 1 and rest not in sections:
            typo = next((s for s in sections if rest.startswith(f"{s}_")), None)
            if typo is not None:
                key = rest[len(typo) + 1 :].upper()
                out.append(
                    _Override(
                        var,
                        value,
                        parts,
                        "not an override: a section and its key are separated by two "
                        f"underscores ({ENV_PREFIX}{typo.upper()}__{key})",
                    )
                )
            continue
        out.append(_Override(var, value, parts, _override_problem(parts, value)))
    return out


def _override_problem(parts: tuple[str, ...], value: str) -> str | None:
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = "the config" if i == 0 else f"[{'.'.join(parts[:i])}]"
            return f"unknown override: {where} has no key {part!r} (known: {', '.join(fields)})"
        ann = fields[part].annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if i < len(parts) - 1 and sub is None:
            return f"unknown override: {'.'.join(parts[: i + 1])} has no keys of its own"
        if sub is not None:
            model = sub
    ann = model.model_fields[parts[-1]].annotation if len(parts) > 1 else None
    complex_ = len(parts) == 1 or (isinstance(ann, type) and issubclass(ann, BaseModel))
    if complex_:
        try:
            json.loads(value)
        except ValueError:
            return (
                f"not JSON: {'.'.join(parts)} as a whole is given as JSON; one key as "
                f"{ENV_PREFIX}{parts[0].upper()}__<KEY>"
            )
    return None


def _env_secret_names(obj: Any) -> Iterable[str]:
    """The variables the file's ``{ env = "..." }`` secret references name."""
    if isinstance(obj, dict):
        if isinstance(obj.get("env"), str):
            yield obj["env"]
        for v in obj.values():
            yield from _env_secret_names(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _env_secret_names(v)


# ----------------------------------------------------------------------------------------------
# Secrets and cross-checks


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
    settings: Settings,
    text: str,
    *,
    mode: SecretMode,
    problems: list[tuple[str, str]],
    warnings: list[str],
    notes: list[str],
) -> dict[str, Secret]:
    out: dict[str, Secret] = {}
    for tpath, ref in _walk_secret_refs(settings, ""):
        if ref.value is not None:
            warnings.append(f"{tpath}: secret kept in plain text in the config file")
        if mode == "none":
            ref.defer(f"{tpath} is not resolved by a command that reads only the store")
            continue
        if (
            mode == "available"
            and ref.credential is not None
            and not os.environ.get("CREDENTIALS_DIRECTORY")
        ):
            note = (
                f"{tpath}: systemd credential {ref.credential!r} is resolved by the service "
                "(LoadCredential=)"
            )
            notes.append(note)
            ref.defer(f"{note}; $CREDENTIALS_DIRECTORY is not set in this process")
            continue
        try:
            out[tpath] = ref.resolve()
            ref.bind(out[tpath])
        except ValueError as exc:
            problems.append((_with_line(tpath, text), str(exc)))
            continue
        if ref.file is not None and world_readable(ref.file):
            warnings.append(f"{tpath}: secret file {ref.file} is readable by other users")
    return out


def _cross_checks(settings: Settings, text: str, warnings: list[str]) -> list[tuple[str, str]]:
    # The health endpoint (and its web console) beyond loopback only with a console token.
    problems = [(_with_line(p, text), m) for p, m in auth_problems(settings.health)]
    if not any(s.enabled for s in settings.sources):
        none = "no enabled sources" if settings.sources else "no sources"
        warnings.append(f"{none}: the gateway will only deliver what the store already holds")
    if not any(u.enabled for u in settings.uplinks):
        none = "no enabled uplinks" if settings.uplinks else "no uplinks"
        warnings.append(
            f"{none}: the store keeps every reading (capture only, up to [store] quota_bytes "
            "and retention_days); an uplink configured later starts with what is captured "
            "from then on"
        )
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


def _problem(
    err: Mapping[str, Any], data: Mapping[str, Any], text: str, overrides: list[_Override]
) -> list[tuple[str, str]]:
    """(path with line, message) for one pydantic error; an error in a value that came from the
    environment names the variable instead of a line of the file."""
    loc = list(err.get("loc", ()))
    path: list[str | int] = []
    node: Any = data
    for part in loc:
        # Discriminated unions add the tag (the ``type`` value) to the location: drop it.
        if isinstance(node, dict) and part not in node and node.get("type") == part:
            continue
        path.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    tpath = _dotted(path)
    msg = str(err.get("msg", "invalid"))
    kind = err.get("type")
    ctx: Mapping[str, Any] = err.get("ctx") or {}
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        # A plugin's own tagged unions (a serial parser's ``kind``) have their own tags.
        plugin = len(path) == 2 and path[0] in ("sources", "uplinks")
        tag = "type" if plugin else str(ctx.get("discriminator", "'type'")).strip("'")
        known = (
            _known_types(tpath) if plugin else str(ctx.get("expected_tags", "")).replace("'", "")
        )
        if kind == "union_tag_invalid":
            msg = f"unknown {tag} {ctx.get('tag')!r} (known: {known})"
        else:
            msg = f"{tag} is missing: give one of {known}" if known else f"{tag} is missing"
            if isinstance(node, dict):
                tpath = f"{tpath}.{tag}"
    msg = msg.removeprefix("Value error, ")

    key = tuple(path)
    for o in overrides:
        if o.problem is not None and (key[: len(o.path)] == o.path or o.path[: len(key)] == key):
            return []  # what a bad override broke: reported with the variable already
    for o in overrides:
        if key[: len(o.path)] == o.path:
            inner = _dotted(path[len(o.path) :])
            return [(o.shown, f"{_dotted(path)}: {msg}" if inner else msg)]
    # A check of a whole table (its keys against each other) names the keys it compares.
    inside = [o.shown for o in overrides if o.path[: len(key)] == key and o.path[-1] in msg]
    if inside:
        msg = f"{msg} (with {', '.join(inside)} from the environment)"
    if kind == "duplicate_name":
        return [
            (
                _with_line(f"{tpath}[{again}].name", text),
                f"{_name_at(node, again)!r} is also the name of "
                f"{tpath}[{first}]{_line_note(f'{tpath}[{first}].name', text)}",
            )
            for again, first in ctx.get("repeats", ())
        ]
    return [(_with_line(tpath, text), msg)]


def _name_at(items: Any, i: int) -> Any:
    return items[i].get("name") if isinstance(items, list) and isinstance(items[i], dict) else "?"


def _dotted(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _known_types(tpath: str) -> str:
    """The ``type`` values of the sources' or uplinks' union, for an error at ``tpath``."""
    union = UplinkConfig if tpath.startswith("uplinks") else SourceConfig
    models = get_args(get_args(union)[0])
    return ", ".join(str(get_args(m.model_fields["type"].annotation)[0]) for m in models)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"']+(?:\s*\.\s*[A-Za-z0-9_\-\"']+)*)\s*=")
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _with_line(tpath: str, text: str) -> str:
    return f"{tpath}{_line_note(tpath, text)}"


def _line_note(tpath: str, text: str) -> str:
    line = locate(text, tpath)
    return f" (line {line})" if line else ""


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
