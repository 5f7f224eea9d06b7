"""Config models of the Modbus source, device profiles, and the cross-field checks.

Re-exported by :mod:`gateway.sources.modbus.source`; imports only pydantic and the stdlib so that
loading a config never imports pymodbus. A ``[[sources]]`` entry of ``type = "modbus"`` is one
transport (tcp, rtu, rtu_over_tcp) with one or more devices; devices sharing a host:port or a
serial port share one connection (one RS-485 bus), devices elsewhere get their own.

A device's register map is its profile's fields (``profile = "hardware/profiles/sdm630.toml"``)
plus its own ``fields``. Every field is resolved at validation time into a :class:`FieldTemplate`
(every default applied, but no series name), shared by every device that resolves the same
profile fields the same way; a device keeps those and the tuple of its own series names
(:class:`FieldMap`), so 200 devices of one 125-field profile hold 125 templates and 200 name
tuples. :meth:`ModbusDeviceConfig.resolved_fields` builds the per-device
:class:`ResolvedField`/:class:`FieldSpec` view on demand. The checks a device must pass (reported
as one message naming each field by its TOML path):

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from gateway.configbase import NAME_PATTERN, SourceConfigBase, Strict
from gateway.sources.modbus.decode import (
    BIT_TABLES,
    NUMERIC_TYPES,
    DataType,
    Decoder,
    FieldSpec,
    Order,
    Table,
    make_decoder,
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


@dataclass(frozen=True, slots=True, eq=False)
class FieldTemplate:
    """A field with every default applied except the device's series prefix: its layout, its
    reporting options, where it came from, and its decoder. One is shared by every device that
    resolves the same profile field with the same table/order defaults and include/exclude.

    The series of a device's field is ``series`` when the field names one, else
    ``<device prefix>.<name>`` (:meth:`series_for`).
    """

    table: Table
    address: int
    dtype: DataType
    order: Order
    bit: int | None
    length: int | None
    scale: float
    offset: float
    #: The field's own name (None when it gives only a series) and explicit series name.
    name: str | None
    series: str | None
    deadband: float | None
    heartbeat_s: float | None
    allow_overlap: bool
    origin: str
    #: Registers (or bits, in the coil and discrete tables) spanned.
    count: int = field(init=False)
    #: A uint16 register read as is (no byte swap, scale, offset or deadband): its value is the
    #: register itself, so a request of only such fields needs no decoding.
    plain: bool = field(init=False)
    #: ``decode(wire_bytes, reg_offset)``: the scaled value (register tables; shared per layout).
    decode: Decoder = field(init=False, repr=False)

    def __post_init__(self) -> None:
        bits = self.table in BIT_TABLES
        object.__setattr__(self, "count", 1 if bits else register_count(self.dtype, self.length))
        plain = (
            not bits
            and self.dtype == "uint16"
            and self.order in ("ABCD", "CDAB")
            and self.scale == 1.0
            and self.offset == 0.0
            and self.deadband is None
        )
        object.__setattr__(self, "plain", plain)
        object.__setattr__(self, "decode", make_decoder(self))

    @property
    def end(self) -> int:
        return self.address + self.count

    def series_for(self, prefix: str) -> str:
        return self.series or f"{prefix}.{self.name}"

    def spec(self, series: str) -> FieldSpec:
        return FieldSpec(
            series=series,
            table=self.table,
            address=self.address,
            dtype=self.dtype,
            order=self.order,
            bit=self.bit,
            length=self.length,
            scale=self.scale,
            offset=self.offset,
        )

    def resolved(self, series: str) -> ResolvedField:
        """This field as one device's :class:`ResolvedField` (``series`` is its series there)."""
        return ResolvedField(
            self.spec(series),
            self.name or series,
            self.deadband,
            self.heartbeat_s,
            self.allow_overlap,
            self.origin,
        )


class FieldMap(NamedTuple):
    """A device's fields (profile first): ``fields[i]`` reports as ``series[i]``. ``fields`` is
    shared with every device resolving its profile alike (unless the device adds fields)."""

    fields: tuple[FieldTemplate, ...]
    series: tuple[str, ...]

    def resolved(self) -> tuple[ResolvedField, ...]:
        return tuple(t.resolved(s) for t, s in zip(self.fields, self.series, strict=True))


#: A profile's resolved fields per (profile path as written, table, word order, chosen fields):
#: the path appears in their ``origin``; table and order are the defaults they were resolved
#: with. Kept on the (cached) profile, so a changed profile file starts afresh. The flag says
#: whether the fields are free of overlaps among themselves.
_TemplateKey = tuple[str, Table, Order, tuple[int, ...]]
_Templates = tuple[tuple[FieldTemplate, ...], bool]


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

    _templates: dict[_TemplateKey, _Templates] = PrivateAttr(default_factory=dict)


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

    _map: FieldMap = PrivateAttr(default=FieldMap((), ()))
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
        fmap, problems = _resolve_device(self, profile)
        if problems:
            raise ValueError("; ".join(problems))
        self._map = fmap

    @property
    def prefix(self) -> str:
        return self.series_prefix or self.name

    @property
    def profile_model(self) -> ModbusProfile | None:
        return self._profile

    @property
    def series(self) -> tuple[str, ...]:
        """The series of every field of this device (profile first)."""
        return self._map.series

    def field_map(self, base_dir: Path | None = None) -> FieldMap:
        """Every field of this device (profile first) and its series. With ``base_dir``, a
        relative profile path is looked up there first, and the map re-read if that finds another
        file than validation did. Raises ValueError when the profile cannot be found or no longer
        validates."""
        if base_dir is not None and self.profile is not None:
            path = resolve_profile_path(self.profile, base_dir)
            if path != self._profile_path:
                clone = self.model_copy()
                clone._apply(base_dir)
                return clone._map
        return self._map

    def resolved_fields(self, base_dir: Path | None = None) -> tuple[ResolvedField, ...]:
        """:meth:`field_map` as one :class:`ResolvedField` per field (built on each call: the
        gateway itself keeps only the shared templates and the series names)."""
        return self.field_map(base_dir).resolved()


def _resolve_device(
    dev: ModbusDeviceConfig, profile: ModbusProfile | None
) -> tuple[FieldMap, list[str]]:
    problems: list[str] = []
    prefix = dev.prefix
    fields: tuple[FieldTemplate, ...] = ()
    #: The profile's fields are known to be free of overlaps among themselves.
    shared_clean = False
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
        assert dev.profile is not None
        key: _TemplateKey = (dev.profile, table, order, tuple(i for i, _ in chosen))
        cached = profile._templates.get(key)
        if cached is None:
            # Whether a field resolves does not depend on the prefix (only the wording of what
            # is wrong names the series), so what resolves cleanly is kept for the next device.
            found: list[str] = []
            made: list[FieldTemplate] = []
            for i, fc in chosen:
                where = f"profile {dev.profile} fields[{i}]"
                made.extend(_resolve_field(fc, prefix, (table, order), where, found))
            problems.extend(found)
            fields = tuple(made)
            if not found:
                clean = next(_overlaps(fields, ("",) * len(fields)), None) is None
                profile._templates[key] = (fields, clean)
                shared_clean = clean
        else:
            fields, shared_clean = cached
    elif dev.include is not None or dev.exclude:
        problems.append("include/exclude need a profile")
    if dev.fields:
        table = dev.table or "holding"
        order = dev.word_order or "ABCD"
        own: list[FieldTemplate] = []
        for i, fc in enumerate(dev.fields):
            own.extend(_resolve_field(fc, prefix, (table, order), f"fields[{i}]", problems))
        if own:
            fields = (*fields, *own)
            shared_clean = False
    if not fields and not problems:
        problems.append("the device has no fields (give fields or a profile)")
    series = tuple([t.series_for(prefix) for t in fields])
    if not shared_clean:
        problems.extend(_overlaps(fields, series))
    if len(set(series)) != len(series):
        problems.extend(_duplicate_series(fields, series))
    return FieldMap(fields, series), problems


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
) -> Iterator[FieldTemplate]:
    """The field's template, or nothing (with what is wrong added to ``problems``). Only the
    wording of a problem depends on ``prefix``."""
    table = fc.table or defaults[0]
    bits_table = table in BIT_TABLES
    dtype: DataType = fc.type or ("bool" if bits_table else "uint16")

    def bad(msg: str) -> None:
        series = fc.series or (f"{prefix}.{fc.name}" if fc.name else None)
        problems.append(f"{where} ({series or 'unnamed'}): {msg}")

    found = list(_field_problems(fc, table, dtype))
    if fc.series is None and fc.name is None:
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
    heartbeat = (
        fc.heartbeat_s
        if fc.heartbeat_s is not None
        else (300.0 if fc.deadband is not None else None)
    )
    yield FieldTemplate(
        table=table,
        address=fc.address,
        dtype=dtype,
        order=fc.word_order or defaults[1],
        bit=fc.bit,
        length=fc.length,
        scale=fc.scale,
        offset=fc.offset,
        name=fc.name,
        series=fc.series,
        deadband=fc.deadband,
        heartbeat_s=heartbeat,
        allow_overlap=fc.allow_overlap,
        origin=where,
    )


def _overlaps(fields: Sequence[FieldTemplate], series: Sequence[str]) -> Iterator[str]:
    ordered = sorted(
        range(len(fields)), key=lambda i: (fields[i].table, fields[i].address, fields[i].end)
    )
    active: list[int] = []
    for j in ordered:
        f = fields[j]
        active = [k for k in active if fields[k].table == f.table and fields[k].end > f.address]
        for k in active:
            a = fields[k]
            if a.allow_overlap or f.allow_overlap:
                continue
            if a.dtype == "bit" and f.dtype == "bit" and a.bit != f.bit:
                continue
            lo, hi = f.address, min(a.end, f.end) - 1
            at = f"{lo}" if lo == hi else f"{lo}..{hi}"
            yield (
                f"{f.origin} ({series[j]}) overlaps {a.origin} ({series[k]}) at "
                f"{f.table} {at}; set allow_overlap = true on one of them if intended"
            )
        active.append(j)


def _duplicate_series(fields: Sequence[FieldTemplate], series: Sequence[str]) -> Iterator[str]:
    seen: dict[str, str] = {}
    for f, name in zip(fields, series, strict=True):
        if name in seen:
            yield f"{f.origin}: series {name!r} is already produced by {seen[name]}"
        else:
            seen[name] = f.origin


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
            for series in d.series:
                other = seen_series.setdefault(series, d.name)
                if other != d.name:
                    yield f"series {series!r} is produced by devices {other} and {d.name}"

    def connection_label(self, dev: ModbusDeviceConfig) -> str:
        """Names the connection (bus or TCP peer) ``dev`` is polled over; equal labels share one."""
        if self.transport == "rtu":
            return f"rtu {dev.serial_port or self.serial_port}"
        return f"{self.transport} {dev.host or self.host}:{dev.port or self.port}"

    def series_names(self) -> Iterable[str]:
        for d in self.devices:
            yield from d.series
