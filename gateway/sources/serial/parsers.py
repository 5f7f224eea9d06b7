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

import csv
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo

from gateway.models import Reading, Value, value_problem
from gateway.sources.serial.config import (
    SKIP,
    DelimitedParserConfig,
    KeyValueParserConfig,
    LineFormatConfig,
    RegexParserConfig,
    resolve_zone,
)

#: Column names that mean "skip this column" in a delimited parser.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_CONTROL_BUT_DEL = re.compile(r"[\x00-\x08\x0b-\x1f]")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


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
                rows = csv.reader(
                    [line], delimiter=cfg.delimiter, quotechar=cfg.quotechar, strict=True
                )
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
        return self.cfg.series_for(field, self._prefix)

    def series_names(self) -> list[str] | None:
        return self.cfg.declared_series(self._prefix)

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
