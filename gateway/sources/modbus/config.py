"""Config models of the Modbus source, device profiles, and the cross-field checks.

Re-exported by :mod:`gateway.sources.modbus.source`; imports only pydantic and the stdlib so that
loading a config never imports pymodbus. A ``[[sources]]`` entry of ``type = "modbus"`` is one
transport (tcp, rtu, rtu_over_tcp) with one or more devices; devices sharing a host:port or a
serial port share one connection (one RS-485 bus), devices elsewhere get their own.

A device's register map is its profile's fields (``profile = "hardware/profiles/sdm630.toml"``)
plus its own ``fields``. Every field is resolved into a :class:`FieldSpec` at validation time;
the checks a device must pass (reported as one message naming each field by its TOML path):

* the type fits the table (coil/discrete hold single bits: only ``bool``);
* ``count``, when given, equals the registers the type spans; strings need ``length``;
  ``bit`` (0-15) goes with type ``bit`` and only with it;
* scale, offset and a non-zero deadband apply to numbers only; scale is finite and non-zero;
* no two fields overlap (bits of one register at different indexes do not), unless one of them
  says ``allow_overlap = true``; every series name is unique within the source.

Profile paths are resolved against, in order: the config file's directory (validation context
``{"base_dir": ...}`` or :data:`PROFILE_BASE_DIR`), the current directory, the repository root.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from gateway.configbase import NAME_PATTERN, SourceConfigBase, Strict
from gateway.sources.modbus.decode import (
    BIT_TABLES,
    NUMERIC_TYPES,
    DataType,
    FieldSpec,
    Order,
    Table,
    register_count,
)

Transport = Literal["tcp", "rtu", "rtu_over_tcp"]
FIELD_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$"

#: Directory relative profile paths are looked up in first, for validators that get no context
#: (``gateway.config.load_config`` should set it to the config file's directory while it validates).
PROFILE_BASE_DIR: ContextVar[Path | None] = ContextVar("modbus_profile_base_dir", default=None)
REPO_ROOT = Path(__file__).resolve().parents[3]


class ModbusFieldConfig(Strict):
    """One value of a register map: ``[[sources.devices.fields]]`` or a profile's ``[[fields]]``."""

    #: Short name; the series is ``<device prefix>.<name>`` unless ``series`` is given.
    name: str | None = Field(default=None, pattern=FIELD_NAME_PATTERN)
    series: str | None = Field(default=None, min_length=1, max_length=200)
    #: Default: the device's (or profile's) table, else holding.
    table: Table | None = None
    #: Protocol (PDU) address, 0-based, as sent on the wire: register 40001 is address 0.
    address: int = Field(ge=0, le=65535)
    #: Default: bool in the coil and discrete tables, uint16 in register tables.
    type: DataType | None = None
    #: Registers spanned; optional, checked against the type when given.
    count: int | None = Field(default=None, ge=1, le=125)
    #: Bytes of a string (two per register).
    length: int | None = Field(default=None, ge=1, le=250)
    #: Bit index of a ``bit`` field, 0 = least significant bit of the register.
    bit: int | None = Field(default=None, ge=0, le=15)
    #: Byte layout of a multi-byte value (README "Modbus: types, tables and byte orders");
    #: default: the device's, else (profile fields) the profile's, else ABCD.
    word_order: Order | None = None
    #: Numbers only: the value is ``raw * scale + offset``.
    scale: float = 1.0
    offset: float = 0.0
    #: Report by exception: None reports every poll; 0 reports changes; x reports moves > x.
    deadband: float | None = Field(default=None, ge=0)
    #: With a deadband, still report an unchanged value this often (default 300 s).
    heartbeat_s: float | None = Field(default=None, gt=0)
    #: May share registers with another field (otherwise overlapping fields are an error).
    allow_overlap: bool = False
    #: Documentation only (units travel with uplink routes, not readings).
    unit: str | None = None
    description: str | None = None


@dataclass(frozen=True, slots=True)
class ResolvedField:
    """A field with every default applied, plus its reporting options and where it came from."""

    spec: FieldSpec
    name: str
    deadband: float | None
    heartbeat_s: float | None
    allow_overlap: bool
    origin: str


class ModbusProfile(Strict):
    """A device type's register map, kept in ``hardware/profiles/*.toml``."""

    manufacturer: str | None = None
    model: str | None = None
    #: The public document the register table was taken from.
    source: str | None = None
    notes: str | None = None
    table: Table = "holding"
    word_order: Order = "ABCD"
    #: Device limits on one read (e.g. Eastron meters answer at most 80 registers).
    max_registers: int | None = Field(default=None, ge=1, le=125)
    max_bits: int | None = Field(default=None, ge=1, le=2000)
    max_gap: int | None = Field(default=None, ge=0, le=124)
    fields: list[ModbusFieldConfig] = Field(min_length=1)


_PROFILE_CACHE: dict[tuple[Path, str], ModbusProfile] = {}


def resolve_profile_path(ref: str, base_dir: Path | None) -> Path:
    """The profile file ``ref`` names. Raises ValueError listing the places looked in."""
    path = Path(ref).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [d / path for d in (base_dir, Path.cwd(), REPO_ROOT) if d is not None]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    tried = ", ".join(dict.fromkeys(str(c) for c in candidates))
    raise ValueError(f"profile {ref!r} not found (looked for {tried})")


def load_profile(path: Path) -> ModbusProfile:
    """Parse and validate a profile file (cached per content). Raises ValueError."""
    try:
        text = path.read_text(encoding="utf-8")
        key = (path, text)
        if key in _PROFILE_CACHE:
            return _PROFILE_CACHE[key]
        data = tomllib.loads(text)
    except OSError as exc:
        raise ValueError(f"profile {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"profile {path}: TOML syntax error: {exc}") from None
    try:
        profile = ModbusProfile.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"profile {path}: {_errors_text(exc)}") from None
    _PROFILE_CACHE[key] = profile
    return profile


def _errors_text(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc} -> {msg}" if loc else msg)
    return "; ".join(parts)


class ModbusDeviceConfig(Strict):
    """One Modbus unit (``[[sources.devices]]``)."""

    name: str = Field(pattern=NAME_PATTERN)
    #: Unit (slave) id; 1-247 on RTU, 0-255 over TCP (many TCP devices use 1 or 255).
    unit: int = Field(ge=0, le=255)
    interval_s: float = Field(default=5.0, ge=0.01, le=86_400)
    #: Answer timeout for this device; default: the source's timeout_s.
    timeout_s: float | None = Field(default=None, gt=0, le=60)
    profile: str | None = None
    #: Profile fields to keep (default all) and to drop, by name.
    include: list[str] | None = None
    exclude: list[str] = Field(default_factory=list)
    #: Series prefix for fields given by name; default: the device name.
    series_prefix: str | None = Field(default=None, min_length=1, max_length=100)
    table: Table | None = None
    word_order: Order | None = None
    #: Connection overrides: a device on another host / serial port gets its own connection.
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    serial_port: str | None = None
    #: Coalescing limits; default: profile, then source.
    max_gap: int | None = Field(default=None, ge=0, le=124)
    max_bit_gap: int | None = Field(default=None, ge=0, le=1999)
    max_registers: int | None = Field(default=None, ge=1, le=125)
    max_bits: int | None = Field(default=None, ge=1, le=2000)
    #: false: one request per field, for devices that refuse reads spanning several values.
    coalesce: bool = True
    #: Consecutive failed polls before the device is polled at ``degraded_interval_s``.
    degraded_after: int = Field(default=3, ge=1, le=1000)
    degraded_interval_s: float = Field(default=60.0, gt=0, le=86_400)
    #: How often a field that answered with an exception is tried again on its own.
    failing_retry_s: float = Field(default=300.0, gt=0, le=86_400)
    fields: list[ModbusFieldConfig] = Field(default_factory=list)

    _resolved: tuple[ResolvedField, ...] = PrivateAttr(default=())
    _profile_path: Path | None = PrivateAttr(default=None)
    _profile: ModbusProfile | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> ModbusDeviceConfig:
        ctx = info.context if isinstance(info.context, dict) else {}
        base = ctx.get("base_dir") or PROFILE_BASE_DIR.get()
        self._apply(Path(base) if base is not None else None)
        return self

    def _apply(self, base_dir: Path | None) -> None:
        profile = None
        if self.profile is not None:
            self._profile_path = resolve_profile_path(self.profile, base_dir)
            profile = load_profile(self._profile_path)
        self._profile = profile
        resolved, problems = _resolve_device(self, profile)
        if problems:
            raise ValueError("; ".join(problems))
        self._resolved = tuple(resolved)

    @property
    def prefix(self) -> str:
        return self.series_prefix or self.name

    @property
    def profile_model(self) -> ModbusProfile | None:
        return self._profile

    def resolved_fields(self, base_dir: Path | None = None) -> tuple[ResolvedField, ...]:
        """Every field of this device (profile first). With ``base_dir``, a relative profile path
        is looked up there first, and the map re-read if that finds another file than validation
        did. Raises ValueError when the profile cannot be found or no longer validates."""
        if base_dir is not None and self.profile is not None:
            path = resolve_profile_path(self.profile, base_dir)
            if path != self._profile_path:
                clone = self.model_copy()
                clone._apply(base_dir)
                return clone._resolved
        return self._resolved


def _resolve_device(
    dev: ModbusDeviceConfig, profile: ModbusProfile | None
) -> tuple[list[ResolvedField], list[str]]:
    problems: list[str] = []
    out: list[ResolvedField] = []
    if profile is not None:
        names = {f.name for f in profile.fields if f.name}
        for label, wanted in (("include", dev.include or []), ("exclude", dev.exclude)):
            unknown = sorted(set(wanted) - names)
            if unknown:
                problems.append(f"{label}: profile has no field named {', '.join(unknown)}")
        keep = set(dev.include) if dev.include is not None else names
        keep -= set(dev.exclude)
        chosen = [(i, f) for i, f in enumerate(profile.fields) if f.name is None or f.name in keep]
        table = dev.table or profile.table
        order = dev.word_order or profile.word_order
        for i, fc in chosen:
            where = f"profile {dev.profile} fields[{i}]"
            out.extend(_resolve_field(fc, dev.prefix, (table, order), where, problems))
    elif dev.include is not None or dev.exclude:
        problems.append("include/exclude need a profile")
    table = dev.table or "holding"
    order = dev.word_order or "ABCD"
    for i, fc in enumerate(dev.fields):
        out.extend(_resolve_field(fc, dev.prefix, (table, order), f"fields[{i}]", problems))
    if not out and not problems:
        problems.append("the device has no fields (give fields or a profile)")
    problems.extend(_overlaps(out))
    problems.extend(_duplicate_series(out))
    return out, problems


def _field_problems(fc: ModbusFieldConfig, table: Table, dtype: DataType) -> Iterator[str]:
    """What is wrong with one field on its own (its type, table and options together)."""
    if table in BIT_TABLES and dtype != "bool":
        yield f"table {table} holds single bits, so type must be bool (not {dtype})"
    if dtype == "bit" and fc.bit is None:
        yield "type bit needs bit = 0..15 (which bit of the register)"
    if fc.bit is not None and dtype != "bit":
        yield f"bit applies only to type bit (type is {dtype})"
    if dtype == "string" and fc.length is None:
        yield "type string needs length (bytes, two per register)"
    if fc.length is not None and dtype != "string":
        yield f"length applies only to type string (type is {dtype})"
    numeric = dtype in NUMERIC_TYPES
    if not numeric and (fc.scale != 1.0 or fc.offset != 0.0):
        yield f"scale and offset apply only to numbers (type is {dtype})"
    if not (math.isfinite(fc.scale) and fc.scale != 0.0) or not math.isfinite(fc.offset):
        yield "scale must be a finite, non-zero number and offset finite"
    if not numeric and fc.deadband:
        yield f"a deadband applies only to numbers (type is {dtype}); use 0 to report changes"
    if fc.heartbeat_s is not None and fc.deadband is None:
        yield "heartbeat_s needs a deadband (without one every poll is reported)"


def _resolve_field(
    fc: ModbusFieldConfig,
    prefix: str,
    defaults: tuple[Table, Order],
    where: str,
    problems: list[str],
) -> Iterator[ResolvedField]:
    table = fc.table or defaults[0]
    bits_table = table in BIT_TABLES
    dtype: DataType = fc.type or ("bool" if bits_table else "uint16")
    series = fc.series or (f"{prefix}.{fc.name}" if fc.name else None)
    label = f"{where} ({series or 'unnamed'})"

    def bad(msg: str) -> None:
        problems.append(f"{label}: {msg}")

    found = list(_field_problems(fc, table, dtype))
    if series is None:
        found.insert(0, "give a name or a series")
    if found:
        for msg in found:
            bad(msg)
        return
    size = 1 if bits_table else register_count(dtype, fc.length)
    if fc.count is not None and fc.count != size:
        unit = "bit" if bits_table else "registers"
        bad(f"type {dtype} spans {size} {unit}, but count = {fc.count}")
        return
    if fc.address + size > 65536:
        bad(f"address {fc.address} + {size} runs past the last address 65535")
        return
    assert series is not None
    spec = FieldSpec(
        series=series,
        table=table,
        address=fc.address,
        dtype=dtype,
        order=fc.word_order or defaults[1],
        bit=fc.bit,
        length=fc.length,
        scale=fc.scale,
        offset=fc.offset,
    )
    heartbeat = (
        fc.heartbeat_s
        if fc.heartbeat_s is not None
        else (300.0 if fc.deadband is not None else None)
    )
    yield ResolvedField(spec, fc.name or series, fc.deadband, heartbeat, fc.allow_overlap, where)


def _overlaps(fields: Sequence[ResolvedField]) -> Iterator[str]:
    ordered = sorted(fields, key=lambda f: (f.spec.table, f.spec.address, f.spec.end))
    active: list[ResolvedField] = []
    for f in ordered:
        active = [a for a in active if a.spec.table == f.spec.table and a.spec.end > f.spec.address]
        for a in active:
            if a.allow_overlap or f.allow_overlap:
                continue
            if a.spec.dtype == "bit" and f.spec.dtype == "bit" and a.spec.bit != f.spec.bit:
                continue
            lo, hi = f.spec.address, min(a.spec.end, f.spec.end) - 1
            at = f"{lo}" if lo == hi else f"{lo}..{hi}"
            yield (
                f"{f.origin} ({f.spec.series}) overlaps {a.origin} ({a.spec.series}) at "
                f"{f.spec.table} {at}; set allow_overlap = true on one of them if intended"
            )
        active.append(f)


def _duplicate_series(fields: Iterable[ResolvedField]) -> Iterator[str]:
    seen: dict[str, str] = {}
    for f in fields:
        if f.spec.series in seen:
            first = seen[f.spec.series]
            yield f"{f.origin}: series {f.spec.series!r} is already produced by {first}"
        else:
            seen[f.spec.series] = f.origin


class ModbusSourceConfig(SourceConfigBase):
    """``[[sources]]`` with ``type = "modbus"``: one transport, one or more devices."""

    type: Literal["modbus"]
    transport: Transport = "tcp"
    #: tcp / rtu_over_tcp: the device or serial-to-Ethernet converter.
    host: str | None = None
    port: int = Field(default=502, ge=1, le=65535)
    #: rtu: the RS-485 adapter (prefer the stable /dev/ttyRS485-* names of hardware/udev).
    serial_port: str | None = None
    baudrate: int = Field(default=9600, ge=300, le=4_000_000)
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    #: rtu: the adapter echoes what it sends (some two-wire adapters); the echo is discarded.
    local_echo: bool = False
    #: Default answer timeout per request (devices may override).
    timeout_s: float = Field(default=1.0, gt=0, le=60)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    #: Silence kept on the bus between transactions. Default: 3.5 characters at the baud rate
    #: (at least 1.75 ms) on rtu, none over TCP.
    inter_frame_delay_ms: float | None = Field(default=None, ge=0, le=1000)
    #: Coalescing: unused registers (bits) a read may span to join two fields.
    max_gap: int = Field(default=10, ge=0, le=124)
    max_bit_gap: int = Field(default=64, ge=0, le=1999)
    max_registers: int = Field(default=125, ge=1, le=125)
    max_bits: int = Field(default=2000, ge=1, le=2000)
    #: Reconnect backoff (capped, jittered, exponential).
    reconnect_min_s: float = Field(default=0.5, gt=0, le=600)
    reconnect_max_s: float = Field(default=60.0, gt=0, le=3600)
    devices: list[ModbusDeviceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ModbusSourceConfig:
        problems = [*self._transport_problems(), *self._uniqueness_problems()]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _transport_problems(self) -> Iterator[str]:
        tcp = self.transport != "rtu"
        for i, d in enumerate(self.devices):
            where = f"devices[{i}] ({d.name})"
            if tcp and not (d.host or self.host):
                yield f"{where}: transport {self.transport} needs host"
            if tcp and d.serial_port:
                yield f"{where}: serial_port applies only to transport rtu"
            if not tcp and not (d.serial_port or self.serial_port):
                yield f"{where}: transport rtu needs serial_port"
            if not tcp and (d.host or d.port):
                yield f"{where}: host and port apply only to tcp and rtu_over_tcp"
            if self.transport != "tcp" and not 1 <= d.unit <= 247:
                yield f"{where}: unit {d.unit} is not an RTU address (1-247)"
        if not tcp and self.host:
            yield "host applies only to tcp and rtu_over_tcp (rtu uses serial_port)"
        if tcp and self.serial_port:
            yield "serial_port applies only to transport rtu"
        if self.reconnect_max_s < self.reconnect_min_s:
            yield "reconnect_max_s must not be below reconnect_min_s"

    def _uniqueness_problems(self) -> Iterator[str]:
        names = [d.name for d in self.devices]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            yield f"device names must be unique, repeated: {', '.join(dups)}"
        seen_units: dict[tuple[str, int], str] = {}
        seen_series: dict[str, str] = {}
        for d in self.devices:
            key = (self.connection_label(d), d.unit)
            if key in seen_units:
                yield f"devices {seen_units[key]} and {d.name} share unit {d.unit} on {key[0]}"
            seen_units[key] = d.name
            for f in d.resolved_fields():
                other = seen_series.setdefault(f.spec.series, d.name)
                if other != d.name:
                    yield f"series {f.spec.series!r} is produced by devices {other} and {d.name}"

    def connection_label(self, dev: ModbusDeviceConfig) -> str:
        """Names the connection (bus or TCP peer) ``dev`` is polled over; equal labels share one."""
        if self.transport == "rtu":
            return f"rtu {dev.serial_port or self.serial_port}"
        return f"{self.transport} {dev.host or self.host}:{dev.port or self.port}"

    def series_names(self) -> Iterable[str]:
        for d in self.devices:
            for f in d.resolved_fields():
                yield f.spec.series
