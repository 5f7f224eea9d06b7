"""Parsers for line loggers: one text line in, readings out, or a counted rejection.

Three parsers, chosen by ``[sources.parser] kind``: ``regex`` (named groups), ``delimited``
(CSV or any one-character delimiter, with a column list) and ``keyvalue`` (``T=21.5 RH=40``).
Every parser turns a line into ``{field: text}``; :class:`LineInterpreter` then turns the text into
numbers, picks the timestamp (a logger column with format and timezone, else arrival time) and
names the series (explicit ``series`` map, else ``series_prefix`` + field).

Callers may rely on: :meth:`LineInterpreter.interpret` and :func:`decode_line` raise nothing but
:class:`LineRejected` (whose ``kind`` is the counter to bump), and a rejected line yields no
reading at all, so a damaged line never becomes a partial set of values.
"""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from gateway.configbase import Strict
from gateway.models import Reading, Value, value_problem

#: Column names that mean "skip this column" in a delimited parser.
SKIP = frozenset({"", "-", "_"})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL_BUT_DEL = re.compile(r"[\x00-\x08\x0b-\x1f]")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_OFFSET = re.compile(r"^([+-])(\d{2}):?(\d{2})$")


class LineRejected(Exception):
    """A line that yields no readings; ``kind`` names the fault counter (decode, parse, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def decode_line(
    raw: bytes, encoding: str = "ascii", *, strip: bool = True, del_in_last: int = 0
) -> str:
    """Bytes of one framed line to text; control characters (wrong baud, noise) are rejected.

    ``del_in_last``: DEL (0x7F) is text, not noise, in the last this many characters (after
    stripping). SDI-12 sends its CRC as three characters ``0x40 | 6 bits``, DEL included; the
    CRC check, not this decoder, decides whether they are right. Other control characters are
    rejected everywhere.
    """
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise LineRejected("decode", f"not {encoding}: {exc.reason} at byte {exc.start}") from None
    if strip:
        text = text.strip()
    if del_in_last > 0:
        cut = max(0, len(text) - del_in_last)
        m = _CONTROL.search(text, 0, cut) or _CONTROL_BUT_DEL.search(text, cut)
    else:
        m = _CONTROL.search(text)
    if m:
        raise LineRejected("garbage", f"control character {m.group()!r} in line")
    return text


# ----------------------------------------------------------------------------------------------
# Config


class TimestampConfig(Strict):
    """Which field holds the logger's own timestamp and how to read it."""

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


# ----------------------------------------------------------------------------------------------
# Parsing


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


def parse_timestamp(text: str, fmt: str, zone: tzinfo) -> int:
    """Logger time text to UTC milliseconds (naive times are in ``zone``)."""
    try:
        if fmt in {"epoch_s", "epoch_ms"}:
            if not _NUMBER.fullmatch(text):
                raise ValueError("not a number")
            n = float(text)
            ms = round(n * 1000) if fmt == "epoch_s" else round(n)
            datetime.fromtimestamp(ms / 1000, UTC)  # range check: year 1..9999
            return ms
        dt = datetime.fromisoformat(text) if fmt == "iso8601" else datetime.strptime(text, fmt)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=zone)
        return round(dt.timestamp() * 1000)
    except (ValueError, OverflowError, OSError) as exc:
        raise LineRejected("timestamp", f"timestamp {text[:40]!r} not {fmt}: {exc}") from None


def _split_regex(cfg: RegexParserConfig) -> Callable[[str], dict[str, str]]:
    rx = re.compile(cfg.pattern)
    matcher = rx.fullmatch if cfg.match == "full" else rx.search

    def split(line: str) -> dict[str, str]:
        m = matcher(line)
        if m is None:
            raise LineRejected("parse", "line does not match the pattern")
        return {k: v for k, v in m.groupdict().items() if v is not None}

    return split


def _split_delimited(cfg: DelimitedParserConfig) -> Callable[[str], dict[str, str]]:
    columns = cfg.columns

    def cells(line: str) -> list[str]:
        if cfg.delimiter == "whitespace":
            return line.split()
        try:
            if cfg.quotechar is None:
                rows = csv.reader([line], delimiter=cfg.delimiter, quoting=csv.QUOTE_NONE)
            else:
                rows = csv.reader([line], delimiter=cfg.delimiter, quotechar=cfg.quotechar,
                                  strict=True)
            return next(rows)
        except (csv.Error, StopIteration) as exc:
            raise LineRejected("parse", f"bad delimited line: {exc}") from None

    def split(line: str) -> dict[str, str]:
        row = cells(line)
        if len(row) < len(columns) or (len(row) > len(columns) and cfg.extra_columns == "reject"):
            raise LineRejected("parse", f"{len(row)} columns, expected {len(columns)}")
        return {c: v.strip() for c, v in zip(columns, row, strict=False) if c not in SKIP}

    return split


def _split_keyvalue(cfg: KeyValueParserConfig) -> Callable[[str], dict[str, str]]:
    sep = cfg.kv_separator
    pair_rx = re.compile(r"[\s,;]+") if cfg.pair_separator is None else None

    def split(line: str) -> dict[str, str]:
        tokens = pair_rx.split(line) if pair_rx else line.split(cfg.pair_separator)
        out: dict[str, str] = {}
        for token in (t.strip() for t in tokens):
            if not token:
                continue
            key, found, value = token.partition(sep)
            key = key.strip()
            if not found or not _KEY.fullmatch(key):
                raise LineRejected("parse", f"not a key{sep}value pair: {token[:40]!r}")
            if key in out:
                raise LineRejected("parse", f"key {key!r} repeated")
            out[key] = value.strip()
        if not out:
            raise LineRejected("parse", "no key=value pairs")
        if cfg.fields is not None:
            missing = [f for f in cfg.fields if f not in out]
            if missing:
                raise LineRejected("parse", f"missing keys: {', '.join(missing)}")
        return out

    return split


@dataclass(frozen=True, slots=True)
class _Target:
    field: str
    series: str


class LineInterpreter:
    """A compiled :class:`LineFormatConfig`: text line to readings, or :class:`LineRejected`."""

    def __init__(self, cfg: LineFormatConfig, default_prefix: str) -> None:
        self.cfg = cfg
        self._prefix = cfg.series_prefix if cfg.series_prefix is not None else default_prefix
        p = cfg.parser
        match p:
            case RegexParserConfig():
                self._split = _split_regex(p)
            case DelimitedParserConfig():
                self._split = _split_delimited(p)
            case KeyValueParserConfig():
                self._split = _split_keyvalue(p)
        self._fields = cfg.value_fields()
        self._ts = cfg.timestamp
        self._zone = resolve_zone(cfg.timestamp.timezone) if cfg.timestamp else UTC
        self._missing = frozenset(cfg.missing_values)
        self._ignore = re.compile(cfg.ignore_pattern) if cfg.ignore_pattern else None

    def series_for(self, field: str) -> str:
        return self.cfg.series.get(field) or f"{self._prefix}{field}"

    def series_names(self) -> list[str] | None:
        return None if self._fields is None else [self.series_for(f) for f in self._fields]

    def ignored(self, line: str) -> bool:
        """Blank lines and lines matching ``ignore_pattern`` carry no data and no fault."""
        return not line or (self._ignore is not None and self._ignore.search(line) is not None)

    def interpret(self, line: str, arrival_ms: int) -> list[Reading]:
        """Readings of one decoded line; raises LineRejected (and yields nothing) on any fault."""
        parts = self._split(line)
        ts = arrival_ms
        if self._ts is not None:
            text = parts.get(self._ts.field)
            if text is None or text in self._missing:
                raise LineRejected("timestamp", f"no {self._ts.field!r} in line")
            ts = parse_timestamp(text, self._ts.format, self._zone)
        fields = self._fields if self._fields is not None else self._discovered(parts)
        out: list[Reading] = []
        for name in fields:
            text = parts.get(name)
            if text is None or text in self._missing:
                continue
            value = self._value(name, text)
            if value is not None:
                out.append(Reading(self.series_for(name), ts, value))
        return out

    def _discovered(self, parts: Mapping[str, str]) -> list[str]:
        ts = self._ts.field if self._ts else None
        return [k for k in parts if k != ts]

    def _value(self, name: str, text: str) -> Value | None:
        t = text.replace(",", ".") if self.cfg.decimal_comma else text
        if _NUMBER.fullmatch(t):
            value: Value = float(t)
        elif self.cfg.non_numeric == "reject":
            raise LineRejected("parse", f"field {name!r} is not a number: {text[:40]!r}")
        elif self.cfg.non_numeric == "skip":
            return None
        else:
            value = text
        problem = value_problem(value)
        if problem is not None:
            raise LineRejected("value", f"field {name!r}: {problem}")
        return value
