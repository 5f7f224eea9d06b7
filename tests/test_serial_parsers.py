"""Line framing, decoding and the line-logger parsers (pure: no port involved)."""

from __future__ import annotations

import math
import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from structlog.testing import capture_logs

from gateway.models import Reading
from gateway.sources.base import SourceStats
from gateway.sources.serial.config import (
    LineFormatConfig,
    NmeaConfig,
    Sdi12Config,
    SerialLinesConfig,
    resolve_zone,
)
from gateway.sources.serial.parsers import (
    LineInterpreter,
    LineRejected,
    decode_line,
    parse_timestamp,
)
from gateway.sources.serial.port import Discarded, FaultLog, LineFramer

ARRIVAL = 1_700_000_000_000


def interp(**cfg: Any) -> LineInterpreter:
    return LineInterpreter(LineFormatConfig.model_validate(cfg), "log.")


def rejected_kind(it: LineInterpreter, line: str) -> str:
    with pytest.raises(LineRejected) as info:
        it.interpret(line, ARRIVAL)
    return info.value.kind


# -- framing ------------------------------------------------------------------------------------


def test_framer_splits_lines_and_joins_chunks() -> None:
    f = LineFramer(b"\r\n", 100)
    assert f.feed(b"a,1\r\nb,2\r", 0.0) == [b"a,1"]
    assert f.feed(b"\nc", 0.0) == [b"b,2"]  # terminator split across reads
    assert f.feed(b",3\r\n", 0.0) == [b"c,3"]


def test_framer_reports_overlong_once_and_resyncs_at_next_terminator() -> None:
    f = LineFramer(b"\n", 10)
    out = f.feed(b"x" * 25, 0.0)
    assert out == [Discarded("overlong", 25)]
    assert f.feed(b"y" * 30, 0.0) == []  # still the same overlong line: not reported again
    assert f.feed(b"zz\nok\n", 0.0) == [b"ok"]


def test_framer_overlong_line_within_one_chunk() -> None:
    f = LineFramer(b"\n", 4)
    assert f.feed(b"12345678\n12\n", 0.0) == [Discarded("overlong", 8), b"12"]


def test_framer_drops_stale_partial_line_before_new_bytes() -> None:
    f = LineFramer(b"\n", 100, partial_timeout_s=2.0)
    assert f.feed(b"21.5,4", 10.0) == []
    # The logger restarted mid-line: 5 s later a fresh line arrives; no splice.
    assert f.feed(b"22.0,41\n", 15.0) == [Discarded("partial", 6), b"22.0,41"]
    # Within the timeout, chunks of one line join as usual.
    assert f.feed(b"23.0,", 16.0) == []
    assert f.feed(b"42\n", 17.0) == [b"23.0,42"]


def test_framer_reset_reports_cut_off_line() -> None:
    f = LineFramer(b"\n", 100)
    f.feed(b"half", 0.0)
    assert f.reset() == Discarded("partial", 4)
    assert f.reset() is None


@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_framer_output_does_not_depend_on_chunking(lines: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    f = LineFramer(b"\n", 64)
    out: list[bytes | Discarded] = []
    prev = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        out += f.feed(stream[prev:cut], 0.0)
        prev = max(prev, cut)
    assert out == lines


@given(data=st.lists(st.binary(max_size=300), max_size=20), max_len=st.integers(4, 64))
def test_framer_never_emits_longer_than_max(data: list[bytes], max_len: int) -> None:
    f = LineFramer(b"\r\n", max_len, partial_timeout_s=1.0)
    for i, chunk in enumerate(data):
        for item in f.feed(chunk, float(i)):
            if isinstance(item, bytes):
                assert len(item) <= max_len and b"\r\n" not in item


# -- decoding -----------------------------------------------------------------------------------


def test_decode_rejects_wrong_baud_bytes_and_control_characters() -> None:
    assert decode_line(b" 21.5,40\r") == "21.5,40"
    with pytest.raises(LineRejected) as info:
        decode_line(b"\xe2\x8a21.5")
    assert info.value.kind == "decode"
    with pytest.raises(LineRejected) as info:
        decode_line(b"21\x00.5")
    assert info.value.kind == "garbage"
    assert decode_line("21,5 °C".encode(), "utf-8") == "21,5 °C"


# -- delimited ----------------------------------------------------------------------------------


def test_delimited_with_logger_timestamp_in_a_zone() -> None:
    it = interp(
        parser={"kind": "delimited", "columns": ["time", "temp", "-", "rh"]},
        timestamp={"field": "time", "format": "%Y-%m-%d %H:%M:%S", "timezone": "Europe/Berlin"},
        series={"rh": "site.humidity"},
    )
    out = it.interpret("2024-07-01 12:00:00, 21.5 ,x,40", ARRIVAL)
    ts = 1719828000000  # 10:00 UTC: Berlin is UTC+2 in summer
    assert out == [Reading("log.temp", ts, 21.5), Reading("site.humidity", ts, 40.0)]
    winter = it.interpret("2024-01-01 12:00:00,1,x,2", ARRIVAL)[0].ts
    assert winter == 1704106800000  # 11:00 UTC


def test_delimited_rejects_wrong_column_count_and_non_numbers() -> None:
    it = interp(parser={"kind": "delimited", "columns": ["a", "b"]})
    assert rejected_kind(it, "1") == "parse"
    assert rejected_kind(it, "1,2,3") == "parse"
    assert rejected_kind(it, "1,2x") == "parse"
    assert rejected_kind(it, "1,1_000") == "parse"  # float() would take it; a logger would not
    assert rejected_kind(it, "1,1e999") == "value"
    assert rejected_kind(it, "1,inf") == "parse"
    loose = interp(parser={"kind": "delimited", "columns": ["a", "b"], "extra_columns": "ignore"})
    assert [r.value for r in loose.interpret("1,2,3", ARRIVAL)] == [1.0, 2.0]


def test_delimited_missing_values_quotes_and_whitespace() -> None:
    it = interp(parser={"kind": "delimited", "columns": ["a", "b", "c"]})
    assert [r.series for r in it.interpret("1,,NAN", ARRIVAL)] == ["log.a"]
    assert [r.value for r in it.interpret('"1",2,"3"', ARRIVAL)] == [1.0, 2.0, 3.0]
    ws = interp(parser={"kind": "delimited", "delimiter": "whitespace", "columns": ["a", "b"]})
    assert [r.value for r in ws.interpret("  1.5 \t -2 ", ARRIVAL)] == [1.5, -2.0]
    semi = interp(
        parser={"kind": "delimited", "delimiter": ";", "columns": ["a", "b"]}, decimal_comma=True
    )
    assert [r.value for r in semi.interpret("21,5;-0,25", ARRIVAL)] == [21.5, -0.25]


def test_non_numeric_modes() -> None:
    base = {"parser": {"kind": "delimited", "columns": ["id", "v"]}}
    assert rejected_kind(interp(**base), "AB12,3") == "parse"
    assert [r.series for r in interp(**base, non_numeric="skip").interpret("AB12,3", 0)] == [
        "log.v"
    ]
    out = interp(**base, non_numeric="string").interpret("AB12,3", 0)
    assert [r.value for r in out] == ["AB12", 3.0]


# -- regex and key=value ----------------------------------------------------------------------


def test_regex_full_match_and_search() -> None:
    pattern = r"T=(?P<temp>-?\d+\.\d) P=(?P<press>\d+)"
    it = interp(parser={"kind": "regex", "pattern": pattern}, series_prefix="wx.")
    assert it.interpret("T=-3.5 P=1013", ARRIVAL) == [
        Reading("wx.temp", ARRIVAL, -3.5),
        Reading("wx.press", ARRIVAL, 1013.0),
    ]
    assert rejected_kind(it, "T=-3.5 P=1013 junk") == "parse"
    loose = interp(parser={"kind": "regex", "pattern": pattern, "match": "search"})
    assert len(loose.interpret(">> T=-3.5 P=1013 junk", ARRIVAL)) == 2
    only = interp(parser={"kind": "regex", "pattern": pattern, "fields": ["press"]})
    assert [r.series for r in only.interpret("T=1.0 P=2", ARRIVAL)] == ["log.press"]


def test_keyvalue_pairs_required_fields_and_duplicates() -> None:
    it = interp(parser={"kind": "keyvalue"})
    out = it.interpret("T=21.5, RH=40; BAT=12.6", ARRIVAL)
    assert {r.series: r.value for r in out} == {"log.T": 21.5, "log.RH": 40.0, "log.BAT": 12.6}
    assert rejected_kind(it, "T=1 T=2") == "parse"
    assert rejected_kind(it, "T=1 garbage") == "parse"
    assert rejected_kind(it, "=1") == "parse"
    fixed = interp(parser={"kind": "keyvalue", "fields": ["T", "RH"]})
    assert rejected_kind(fixed, "T=1") == "parse"  # a missing key means a damaged line
    assert [r.series for r in fixed.interpret("T=1 RH=2 X=3", ARRIVAL)] == ["log.T", "log.RH"]
    pipes = interp(parser={"kind": "keyvalue", "pair_separator": "|", "kv_separator": ":"})
    assert [r.value for r in pipes.interpret("a:1|b:2", ARRIVAL)] == [1.0, 2.0]


# -- timestamps ---------------------------------------------------------------------------------


def test_timestamp_formats() -> None:
    utc = resolve_zone("UTC")
    assert parse_timestamp("2024-01-01T00:00:00Z", "iso8601", utc) == 1704067200000
    assert parse_timestamp("2024-01-01T01:00:00+01:00", "iso8601", utc) == 1704067200000
    assert parse_timestamp("2024-01-01 02:00:00", "iso8601", resolve_zone("+02:00")) == (
        1704067200000
    )
    assert parse_timestamp("1704067200.5", "epoch_s", utc) == 1704067200500
    assert parse_timestamp("1704067200500", "epoch_ms", utc) == 1704067200500
    for text, fmt in [("yesterday", "iso8601"), ("1e30", "epoch_s"), ("12:00", "%H:%M:%S")]:
        with pytest.raises(LineRejected) as info:
            parse_timestamp(text, fmt, utc)
        assert info.value.kind == "timestamp"


def test_line_without_its_timestamp_is_rejected() -> None:
    it = interp(parser={"kind": "keyvalue"}, timestamp={"field": "t", "format": "epoch_s"})
    assert it.interpret("t=1700000000 v=1", 0) == [Reading("log.v", 1700000000000, 1.0)]
    assert rejected_kind(it, "v=1") == "timestamp"


def test_ignored_lines() -> None:
    it = interp(parser={"kind": "keyvalue"}, ignore_pattern=r"^(#|Logger )")
    assert it.ignored("")
    assert it.ignored("# comment")
    assert it.ignored("Logger v2.1 booting")
    assert not it.ignored("T=1")


# -- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"parser": {"kind": "regex", "pattern": "(unclosed"}}, "invalid regular expression"),
        ({"parser": {"kind": "regex", "pattern": r"\d+"}}, "named groups"),
        ({"parser": {"kind": "delimited", "columns": ["a", "a"]}}, "unique"),
        (
            {"parser": {"kind": "delimited", "columns": ["a"]}, "timestamp": {"field": "t"}},
            "not a parser field",
        ),
        ({"parser": {"kind": "delimited", "columns": ["a"]}, "series": {"b": "x"}}, "unknown"),
        ({"parser": {"kind": "delimited", "columns": ["a"]}, "decimal_comma": True}, "delimiter"),
        ({"parser": {"kind": "keyvalue"}, "encoding": "klingon"}, "unknown encoding"),
        (
            {"parser": {"kind": "keyvalue"}, "timestamp": {"field": "t", "timezone": "Mars/Base"}},
            "unknown timezone",
        ),
        (
            {"parser": {"kind": "keyvalue"}, "timestamp": {"field": "t", "format": "Y-m-d"}},
            "strptime",
        ),
    ],
)
def test_config_errors(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        LineFormatConfig.model_validate(cfg)


def test_serial_lines_config_series_names() -> None:
    base = {"type": "serial_lines", "name": "wx", "port": "/dev/ttyUSB0"}
    cfg = SerialLinesConfig.model_validate(
        {
            **base,
            "parser": {"kind": "delimited", "columns": ["t", "temp", "-", "rh"]},
            "timestamp": {"field": "t"},
            "series": {"rh": "site.rh"},
        }
    )
    assert list(cfg.series_names() or []) == ["wx.temp", "site.rh"]
    kv = SerialLinesConfig.model_validate({**base, "parser": {"kind": "keyvalue"}})
    assert kv.series_names() is None  # keys are discovered at run time
    with pytest.raises(ValidationError, match="stopbits"):
        SerialLinesConfig.model_validate({**base, "parser": {"kind": "keyvalue"}, "stopbits": 3})
    with pytest.raises(ValidationError, match="reconnect_max_s"):
        SerialLinesConfig.model_validate(
            {**base, "parser": {"kind": "keyvalue"}, "reconnect_min_s": 5, "reconnect_max_s": 1}
        )


# -- properties ---------------------------------------------------------------------------------

PARSERS: list[dict[str, Any]] = [
    {
        "parser": {"kind": "delimited", "columns": ["t", "a", "b"]},
        "timestamp": {"field": "t", "format": "%Y-%m-%d %H:%M:%S", "timezone": "Europe/Oslo"},
    },
    {"parser": {"kind": "keyvalue"}, "timestamp": {"field": "t", "format": "epoch_s"}},
    {
        "parser": {"kind": "regex", "pattern": r"(?P<a>\S+) (?P<b>\S+)", "match": "search"},
        "non_numeric": "string",
    },
    {"parser": {"kind": "delimited", "delimiter": "whitespace", "columns": ["a", "b"]}},
]


@settings(max_examples=300)
@given(raw=st.binary(max_size=120), which=st.integers(0, len(PARSERS) - 1))
def test_no_input_makes_a_parser_raise_anything_but_a_rejection(raw: bytes, which: int) -> None:
    it = interp(**PARSERS[which])
    try:
        readings = it.interpret(decode_line(raw, "latin-1"), ARRIVAL)
    except LineRejected as exc:
        assert exc.kind in {"decode", "garbage", "parse", "timestamp", "value"}
        return
    for r in readings:
        assert isinstance(r.value, float | str)
        assert not (isinstance(r.value, float) and math.isnan(r.value))


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(a=finite, b=finite)
def test_numbers_round_trip_through_a_delimited_line(a: float, b: float) -> None:
    it = interp(parser={"kind": "delimited", "columns": ["a", "b"]})
    out = it.interpret(f"{a!r},{b!r}", ARRIVAL)
    assert [r.value for r in out] == [a, b]


@given(
    st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,8}", fullmatch=True), finite, min_size=1, max_size=6
    )
)
def test_keyvalue_round_trip(values: dict[str, float]) -> None:
    it = interp(parser={"kind": "keyvalue"})
    out = it.interpret(" ".join(f"{k}={v!r}" for k, v in values.items()), ARRIVAL)
    assert {r.series: r.value for r in out} == {f"log.{k}": v for k, v in values.items()}


# -- fault logging ------------------------------------------------------------------


def test_fault_log_is_loud_once_per_burst() -> None:
    stats = SourceStats()
    faults = FaultLog("log1", stats)
    with capture_logs() as logs:
        faults.rejected("decode", "bad byte")
        faults.rejected("decode", "bad byte")
        faults.rejected("parse", "3 columns")
        faults.good()
        faults.rejected("decode", "bad byte")
    levels = [(e["log_level"], e.get("kind")) for e in logs if e["event"] == "input_rejected"]
    assert levels == [
        ("warning", "decode"),
        ("debug", "decode"),
        ("warning", "parse"),
        ("warning", "decode"),
    ]
    assert stats.rejected == 4 and stats.errors == 0
    assert stats.detail["faults"] == {"decode": 3, "parse": 1}
    faults.error("port_lost", "hung up")
    assert stats.errors == 1 and stats.last_error == "port_lost: hung up"


# -- sample config sections (to become config/samples/*.toml once the types are registered) ----

SAMPLES = {
    "serial_lines": """
# Sample: a line logger on a USB serial adapter. One record per line, parsed into readings.
[[sources]]
name = "weather"
type = "serial_lines"
port = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A10K1234-if00-port0"
baudrate = 9600                 # bytesize = 8, parity = "N", stopbits = 1 (the defaults)
terminator = "\\n"               # "\\r\\n" is accepted too: each line is stripped
encoding = "ascii"
max_line_bytes = 512            # longer lines are dropped (counted) up to the next terminator
series_prefix = "weather."      # series = prefix + column name, unless mapped below
ignore_pattern = "^(#|Logger)"  # banners and comments are skipped quietly
# position_from = "gps"         # attach the fix of the GPS source named "gps"
  [sources.parser]
  kind = "delimited"            # delimited | regex | keyvalue
  delimiter = ","
  columns = ["time", "temp", "rh", "-", "wind"]   # "-" skips a column
  [sources.timestamp]           # omit to stamp readings with arrival time
  field = "time"
  format = "%Y-%m-%d %H:%M:%S"  # or "iso8601", "epoch_s", "epoch_ms"
  timezone = "Europe/Copenhagen"
  [sources.series]
  rh = "site.humidity"          # explicit series for a column
""",
    "nmea": """
# Sample: a GPS receiver (NMEA 0183, GGA and RMC). Publishes its fix for position_from.
[[sources]]
name = "gps"
type = "nmea"
port = "/dev/ttyACM0"
baudrate = 9600                 # NMEA 0183 says 4800 (the default); u-blox ships 9600
fix_qualities = [1, 2, 4, 5]    # GGA qualities that count as a fix (no 6 = dead reckoning)
max_hdop = 5.0
max_fix_age_s = 10              # readings carry a fix at most this old
emit = ["lat", "lon", "alt", "satellites", "fix_quality"]   # own series, from GGA
min_interval_s = 60             # at most one set of own readings a minute
""",
    "sdi12": """
# Sample: SDI-12 sensors behind a transparent USB adapter (9600 8N1). Raw SDI-12 adapters:
# baudrate = 1200, bytesize = 7, parity = "E", break_ms = 12.
[[sources]]
name = "soil"
type = "sdi12"
port = "/dev/ttyUSB1"
interval_s = 300
response_timeout_s = 1.0
retries = 2
  [[sources.sensors]]
  address = "0"
  command = "M"                 # M, M1..M9 (service request) or C, C1..C9 (concurrent)
  crc = true                    # aMC! / aD0! replies carry a CRC
  series = ["soil.moisture", "soil.temp", "-"]
  [[sources.sensors]]
  address = "1"                 # values become soil.1.1, soil.1.2, ...
  command = "C"
""",
}


MODELS: dict[str, type[SerialLinesConfig | NmeaConfig | Sdi12Config]] = {
    "serial_lines": SerialLinesConfig,
    "nmea": NmeaConfig,
    "sdi12": Sdi12Config,
}


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_sample_configs_validate(kind: str) -> None:
    section = tomllib.loads(SAMPLES[kind])["sources"][0]
    cfg = MODELS[kind].model_validate(section)
    assert cfg.type == kind
