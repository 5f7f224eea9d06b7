"""Serial sources (line loggers, NMEA GPS, SDI-12 through an adapter): their config models.

Pure: imports no serial library, so loading a config never opens or imports a port driver."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from datetime import UTC, timedelta, timezone, tzinfo
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from gateway.configbase import SourceConfigBase, Strict

_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")
GpsSeries = Literal["lat", "lon", "alt", "satellites", "hdop", "fix_quality"]
SKIP = frozenset({"", "-", "_"})


def resolve_zone(name: str) -> tzinfo:
    """An IANA zone or a fixed ``±HH:MM`` offset; ValueError when neither."""
    if name.upper() in {"UTC", "Z"}:
        return UTC
    m = _OFFSET.match(name)
    if m:
        delta = timedelta(hours=int(m.group(2)), minutes=int(m.group(3)))
        return timezone(-delta if m.group(1) == "-" else delta)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r}") from None


class TimestampConfig(Strict):
    """Which field holds the logger's own timestamp and how to read it."""

    #: A parser field (listed in the parser's ``fields`` when those are given).
    field: str = Field(min_length=1)
    #: "iso8601", "epoch_s", "epoch_ms", or a strptime format such as "%Y-%m-%d %H:%M:%S".
    format: str = "iso8601"
    #: IANA zone ("Europe/Copenhagen") or fixed offset ("+01:00"); used when the text has none.
    timezone: str = "UTC"

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in {"iso8601", "epoch_s", "epoch_ms"} and "%" not in v:
            raise ValueError('use "iso8601", "epoch_s", "epoch_ms" or a strptime format with %')
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        resolve_zone(v)
        return v


class RegexParserConfig(Strict):
    kind: Literal["regex"]
    #: A regular expression whose named groups are the fields.
    pattern: str
    #: "full": the pattern must match the whole line (safer against damaged lines).
    match: Literal["full", "search"] = "full"
    #: Named groups that are values (default: every named group except the timestamp's).
    fields: list[str] | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            rx = re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        if not rx.groupindex:
            raise ValueError("the pattern needs named groups, e.g. (?P<temp>[-\\d.]+)")
        return v

    def field_names(self) -> list[str]:
        groups = list(re.compile(self.pattern).groupindex)
        return groups if self.fields is None else list(self.fields)


class DelimitedParserConfig(Strict):
    kind: Literal["delimited"]
    #: One character, or "whitespace" for runs of blanks.
    delimiter: str = Field(default=",", min_length=1)
    quotechar: str | None = Field(default='"', min_length=1, max_length=1)
    #: Column names in order; "", "-" or "_" skip a column.
    columns: list[str] = Field(min_length=1)
    #: What a line with more columns than listed means: damaged ("reject") or ignorable.
    extra_columns: Literal["reject", "ignore"] = "reject"

    @field_validator("delimiter")
    @classmethod
    def _delim(cls, v: str) -> str:
        if v != "whitespace" and len(v) != 1:
            raise ValueError('delimiter must be one character or "whitespace"')
        return v

    @field_validator("columns")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        named = [c for c in v if c not in SKIP]
        if not named:
            raise ValueError("at least one column needs a name")
        dups = sorted({c for c in named if named.count(c) > 1})
        if dups:
            raise ValueError(f"column names must be unique, repeated: {', '.join(dups)}")
        return v

    def field_names(self) -> list[str]:
        return [c for c in self.columns if c not in SKIP]


class KeyValueParserConfig(Strict):
    kind: Literal["keyvalue"]
    #: Separator between pairs; None: any run of whitespace, commas or semicolons.
    pair_separator: str | None = Field(default=None, min_length=1)
    #: Separator between a key and its value.
    kv_separator: str = Field(default="=", min_length=1)
    #: Keys that are values (each must be present, or the line is rejected); None: every key.
    fields: list[str] | None = None

    def field_names(self) -> list[str] | None:
        return None if self.fields is None else list(self.fields)


LineParserConfig = Annotated[
    RegexParserConfig | DelimitedParserConfig | KeyValueParserConfig, Field(discriminator="kind")
]


class LineFormatConfig(Strict):
    """What a line means: the parts of ``serial_lines`` config that do not touch the port."""

    parser: LineParserConfig
    timestamp: TimestampConfig | None = None
    #: Series name = series_prefix + field, unless ``series`` maps the field explicitly.
    series_prefix: str | None = None
    series: dict[str, str] = Field(default_factory=dict)
    #: Field texts that mean "no value" (no reading for that field, the rest of the line counts).
    missing_values: list[str] = Field(default_factory=lambda: ["", "NAN", "NaN", "nan"])
    #: A field that is not a number: reject the line, skip the field, or emit the text.
    non_numeric: Literal["reject", "skip", "string"] = "reject"
    #: "21,5" is 21.5 (needs a delimiter other than ",").
    decimal_comma: bool = False
    #: Lines matching this (re.search) are skipped quietly: banners, headers, comments.
    ignore_pattern: str | None = None
    encoding: str = "ascii"

    @field_validator("encoding")
    @classmethod
    def _encoding(cls, v: str) -> str:
        try:
            codecs.lookup(v)
        except LookupError:
            raise ValueError(f"unknown encoding {v!r}") from None
        return v

    @field_validator("ignore_pattern")
    @classmethod
    def _ignore(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _cross(self) -> LineFormatConfig:
        names = self.parser.field_names()
        if names is not None:
            known = set(names)
            if self.timestamp is not None and self.timestamp.field not in known:
                raise ValueError(f"timestamp.field {self.timestamp.field!r} is not a parser field")
            unknown = sorted(set(self.series) - known)
            if unknown:
                raise ValueError(f"series maps unknown fields: {', '.join(unknown)}")
        if isinstance(self.parser, RegexParserConfig) and self.parser.fields is not None:
            groups = set(re.compile(self.parser.pattern).groupindex)
            missing = sorted(set(self.parser.fields) - groups)
            if missing:
                raise ValueError(f"parser.fields not in the pattern: {', '.join(missing)}")
        if self.decimal_comma and getattr(self.parser, "delimiter", None) == ",":
            raise ValueError("decimal_comma needs a delimiter other than ','")
        return self

    def value_fields(self) -> list[str] | None:
        """Fields that become readings, when known from config."""
        names = self.parser.field_names()
        if names is None:
            return None
        ts = self.timestamp.field if self.timestamp else None
        return [n for n in names if n != ts]

    def series_for(self, field: str, default_prefix: str) -> str:
        """The series a field's values go to: its ``series`` mapping, else prefix + field."""
        prefix = self.series_prefix if self.series_prefix is not None else default_prefix
        return self.series.get(field) or f"{prefix}{field}"

    def declared_series(self, default_prefix: str) -> list[str] | None:
        """Every series a line can produce (None: the fields are discovered from each line)."""
        fields = self.value_fields()
        return None if fields is None else [self.series_for(f, default_prefix) for f in fields]


# ----------------------------------------------------------------------------------------------
# Parsing


class SerialConfigBase(SourceConfigBase):
    """Port settings every serial source has. SDI-12 adapters: 1200 7E1 raw, often 9600 8N1."""

    port: str = Field(min_length=1)
    baudrate: int = Field(default=9600, gt=0, le=4_000_000)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = 1
    xonxoff: bool = False
    rtscts: bool = False
    #: Reopen backoff: first delay, cap (jittered between half and the full value).
    reconnect_min_s: float = Field(default=1.0, gt=0, le=3600)
    reconnect_max_s: float = Field(default=60.0, gt=0, le=3600)
    #: A serial device never resends: its readings are committed at once (README "Durability").
    commit: Literal["prompt", "grouped"] = "prompt"

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, v: float) -> float:
        if v not in (1, 1.5, 2):
            raise ValueError("stopbits must be 1, 1.5 or 2")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> SerialConfigBase:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be below reconnect_min_s")
        return self


class SerialLinesConfig(SerialConfigBase, LineFormatConfig):
    """``type = "serial_lines"``: a logger that writes one record per line."""

    type: Literal["serial_lines"]
    #: Line end ("\\n" also accepts "\\r\\n": whitespace is stripped from each line).
    terminator: str = Field(default="\n", min_length=1, max_length=8)
    max_line_bytes: int = Field(default=512, ge=8, le=65536)
    #: Unterminated bytes older than this when new bytes arrive are a cut-off line (None: off).
    partial_line_timeout_s: float | None = Field(default=5.0, gt=0)
    #: Reopen the port when no byte arrived for this long (a wedged adapter; None: never).
    silence_reopen_s: float | None = Field(default=None, gt=0)

    def series_names(self) -> Iterable[str] | None:
        return self.declared_series(f"{self.name}.")


class NmeaConfig(SerialConfigBase):
    """``type = "nmea"``: a GPS receiver writing NMEA 0183 (GGA and/or RMC)."""

    type: Literal["nmea"]
    baudrate: int = Field(default=4800, gt=0, le=4_000_000)  # NMEA 0183; u-blox ships 9600
    #: False also accepts sentences without ``*hh`` (a wrong checksum is always rejected).
    require_checksum: bool = True
    #: GGA qualities that count as a fix (6 = dead reckoning, 7 = manual, 8 = simulator).
    fix_qualities: list[Annotated[int, Field(ge=1, le=8)]] = Field(
        default_factory=lambda: [1, 2, 3, 4, 5]
    )
    #: A GGA fix with fewer satellites in use, or a larger HDOP, does not count as a fix.
    min_satellites: int = Field(default=0, ge=0)
    max_hdop: float | None = Field(default=None, gt=0)
    #: How long a fix stays valid for readings that carry it (``position_from``).
    max_fix_age_s: float = Field(default=10.0, gt=0)
    #: Own series to emit (from GGA); names are series_prefix + item.
    emit: list[GpsSeries] = Field(default_factory=list)
    series_prefix: str | None = None
    #: At most one set of own readings per this many seconds (0: every GGA).
    min_interval_s: float = Field(default=0.0, ge=0)
    max_line_bytes: int = Field(default=164, ge=82, le=4096)
    #: A receiver talks every second; this long without a byte, the port is reopened.
    silence_reopen_s: float | None = Field(default=30.0, gt=0)

    def prefix(self) -> str:
        return self.series_prefix if self.series_prefix is not None else f"{self.name}."

    def series_names(self) -> Iterable[str]:
        return [f"{self.prefix()}{item}" for item in self.emit]


class Sdi12SensorConfig(Strict):
    #: Sensor address; "?" discovers it with ``?!`` (only with a single sensor on the bus).
    address: str = Field(pattern=r"^[0-9A-Za-z?]$")
    #: "M", "M1".."M9" (sequential, service request) or "C", "C1".."C9" (concurrent).
    command: str = Field(default="M", pattern=r"^[MC][1-9]?$")
    #: Ask for the CRC variant of the command (``aMC!``, ``aCC!``) and check each reply's CRC.
    crc: bool = False
    #: Full series names per value, in order ("" or "-" skip a value; values past the end of
    #: the list are not emitted). Default: ``<series_prefix><address>.<n>``, n counted from 1.
    series: list[str] | None = None

    @property
    def concurrent(self) -> bool:
        return self.command.startswith("C")


class Sdi12Config(SerialConfigBase):
    """``type = "sdi12"``: sensors on one SDI-12 bus behind a transparent serial adapter."""

    type: Literal["sdi12"]
    sensors: list[Sdi12SensorConfig] = Field(min_length=1)
    interval_s: float = Field(default=60.0, gt=0)
    #: How long a sensor may take to answer a command (adapters add latency).
    response_timeout_s: float = Field(default=1.0, gt=0, le=30)
    #: Extra tries of a command that got no or a damaged reply.
    retries: int = Field(default=2, ge=0, le=10)
    #: Break before each command, for raw adapters (0: the adapter wakes the bus itself).
    break_ms: int = Field(default=0, ge=0, le=1000)
    #: Margin over the announced wait before reading data without a service request.
    wait_margin_s: float = Field(default=0.1, ge=0)
    series_prefix: str | None = None

    @field_validator("sensors")
    @classmethod
    def _addresses(cls, v: list[Sdi12SensorConfig]) -> list[Sdi12SensorConfig]:
        addrs = [s.address for s in v]
        if "?" in addrs and len(v) > 1:
            raise ValueError('address "?" (discover) needs a single sensor on the bus')
        dups = sorted({a for a in addrs if addrs.count(a) > 1})
        if dups:
            raise ValueError(f"sensor addresses must be unique, repeated: {', '.join(dups)}")
        return v

    def prefix(self) -> str:
        return self.series_prefix if self.series_prefix is not None else f"{self.name}."

    def series_names(self) -> Iterable[str] | None:
        out: list[str] = []
        for s in self.sensors:
            if s.series is None:
                return None  # the value count is announced by the sensor at run time
            out.extend(n for n in s.series if n not in SKIP)
        return out
