"""Fuzzing (hypothesis) of everything that reads outside input: no exception escapes as a crash,
every bad input is a rejection of the documented type, counted and logged.

The parsers' own modules already throw arbitrary bytes at each parser (tests/test_serial_parsers.py,
test_nmea.py, test_sdi12.py, test_modbus_decode.py). This module adds what they leave out:

* the TOML loader: arbitrary text, every shipped config with its values replaced, keys dropped
  or added at random (a structure-aware mutation), and near-miss edits of the files' text; only
  ``ConfigError`` may come out;
* the serial line source end to end over its parsers with many configurations: every line is
  either good or one counted, logged rejection;
* NMEA sentences with a *valid* checksum around damaged fields, and NMEA without checksums (the
  field parsers behind the checksum gate);
* SDI-12 data replies with a valid CRC around damaged values (the value parser behind the CRC);
* Modbus: the RTU frame check on arbitrary bytes, and every decoded value either usable or
  refused by the one check the source applies before counting a rejection.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tomllib
from collections.abc import Iterator, MutableMapping
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from gateway.config import load_config_text
from gateway.errors import ConfigError
from gateway.models import MAX_STRING_VALUE, value_problem
from gateway.sandbox.demo import DEMO_TOKENS
from gateway.sandbox.serial_sim import nmea_sentence, sdi12_crc, sdi12_crc_chars
from gateway.sources.modbus.decode import (
    DATA_TYPES,
    ORDERS,
    DataType,
    FieldSpec,
    Order,
    make_decoder,
    register_count,
    rtu_frame_problem,
    words_to_bytes,
)
from gateway.sources.serial.config import SerialLinesConfig
from gateway.sources.serial.lines import SerialLinesSource
from gateway.sources.serial.nmea import GgaFix, NmeaError, RmcFix, Sentence, parse
from gateway.sources.serial.parsers import LineRejected, decode_line
from gateway.sources.serial.sdi12 import Sdi12Error, parse_data

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [
    *sorted((ROOT / "config").glob("*.toml")),
    *sorted((ROOT / "config/samples").glob("*.toml")),
]
#: Whole shipped configs are validated per example: fewer examples than the pure parsers get.
CONFIG_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# ----------------------------------------------------------------------------------------------
# The TOML loader


@pytest.fixture(scope="module", autouse=True)
def _shipped_secrets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The secrets the shipped configs refer to, provided the way an operator would, so that
    a mutation reaches validation past the secret references."""
    creds = tmp_path_factory.mktemp("credentials")
    for name in ("qatium", "energydata", "nilu", "datacooee", "vanda", "vanda_secret"):
        (creds / name).write_text("fuzz-secret\n")
        (creds / name).chmod(0o600)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CREDENTIALS_DIRECTORY", str(creds))
        for var, value in DEMO_TOKENS.items():
            mp.setenv(var, value)
        yield


def test_every_shipped_config_loads_as_the_base_of_the_mutations() -> None:
    assert len(CONFIGS) >= 10
    for path in CONFIGS:
        load_config_text(path.read_text(), path)


def load_only_config_errors(text: str, path: Path | None = None) -> None:
    """Load ``text``: a valid config, or ConfigError naming at least one problem; nothing else."""
    try:
        loaded = load_config_text(text, path)
    except ConfigError as exc:
        assert exc.problems, "a ConfigError names its problems"
        for where, message in exc.problems:
            assert isinstance(where, str) and isinstance(message, str) and message
        return
    assert loaded.settings is not None


TOML_ISH = st.text(alphabet="[]{}=.,\"'#\n abc_xyz019-+:eEtruefalsnif", max_size=200)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), TOML_ISH))
@example("a = " + "[" * 40 + "]" * 40)
@example('[store]\nquota_bytes = 1e400\n[health]\nport = "x"\n')
@example("[[uplinks]]\n[[uplinks.routes]]\n[[sources]]\ntype = 7\n")
def test_arbitrary_text_is_only_ever_a_config_error(text: str) -> None:
    load_only_config_errors(text)


# A small TOML writer for the structure-aware mutations (tomllib reads only). Every table is
# written inline, which TOML allows at any depth; tomllib reading it back gives the same data.


def toml_key(key: str) -> str:
    return toml_string(key)


def toml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:  # control characters must be escaped
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, datetime | date | time):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {type(v).__name__}")


def toml_dumps(data: dict[str, Any]) -> str:
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in data.items())


scalars = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "",
            "-",
            "tcp",
            "rtu",
            "modbus",
            "float32",
            "ABCD",
            "holding",
            "qatium",
            "synthetic",
            "https://x.invalid/",
            "/dev/null",
            "../x.toml",
            "UTC",
        ]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**64, 10**30]),
    st.floats(),
    st.booleans(),
    st.datetimes(),
    st.dates(),
    st.times(),
)
toml_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(min_size=1, max_size=12), inner, max_size=4),
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(toml_values)
def test_the_toml_writer_round_trips(value: Any) -> None:
    doc = {"k": value}
    back = tomllib.loads(toml_dumps(doc))
    # NaN is not equal to itself: compare the text the writer makes of both.
    assert toml_dumps(back) == toml_dumps(doc)


def containers(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Paths of every table and array in a document (the root included)."""
    if isinstance(node, dict | list):
        yield path
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            yield from containers(v, (*path, k))


def at(node: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        node = node[part]
    return node


def mutate(doc: dict[str, Any], data: st.DataObject) -> None:
    """One edit somewhere in ``doc``: replace, drop or add a value."""
    parent = at(doc, data.draw(st.sampled_from(list(containers(doc))), label="where"))
    keys = list(parent) if isinstance(parent, dict) else list(range(len(parent)))
    op = data.draw(st.sampled_from(["replace", "drop", "add"]) if keys else st.just("add"))
    if op == "add":
        value = data.draw(toml_values, label="added")
        if isinstance(parent, dict):
            parent[data.draw(st.text(min_size=1, max_size=12), label="new key")] = value
        else:
            parent.append(value)
        return
    key = data.draw(st.sampled_from(keys), label="key")
    if op == "drop":
        del parent[key]
    else:
        parent[key] = data.draw(toml_values, label="value")


@CONFIG_SETTINGS
@given(which=st.sampled_from(CONFIGS), edits=st.integers(1, 4), data=st.data())
def test_shipped_configs_with_values_changed_are_only_config_errors(
    which: Path, edits: int, data: st.DataObject
) -> None:
    doc = tomllib.loads(which.read_text())
    for _ in range(edits):
        mutate(doc, data)
    # Loaded as if from the shipped file's place, so relative profile paths still resolve.
    load_only_config_errors(toml_dumps(doc), which)


@CONFIG_SETTINGS
@given(which=st.sampled_from(CONFIGS), data=st.data())
def test_near_miss_edits_of_the_config_text_are_only_config_errors(
    which: Path, data: st.DataObject
) -> None:
    lines = which.read_text().splitlines(keepends=True)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        i = data.draw(st.integers(0, max(0, len(lines) - 1)), label="line")
        op = data.draw(st.sampled_from(["insert", "delete", "duplicate", "splice"]))
        if op == "insert":
            lines.insert(i, data.draw(TOML_ISH, label="text") + "\n")
        elif op == "delete" and lines:
            del lines[i]
        elif op == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif lines:
            line = lines[i]
            cut = data.draw(st.integers(0, len(line)), label="cut")
            lines[i] = line[:cut] + data.draw(TOML_ISH, label="spliced") + line[cut:]
    load_only_config_errors("".join(lines), which)


@pytest.mark.parametrize("opening", ["[", "{a = "])
def test_deeply_nested_values_are_a_config_error(opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    with pytest.raises(ConfigError):
        load_config_text("x = " + opening * 5000 + "1" + closing * 5000)


NILU_SAMPLE = ROOT / "config/samples/nilu.toml"


def nilu_with(change: str) -> str:
    doc = tomllib.loads(NILU_SAMPLE.read_text())
    up = doc["uplinks"][0]
    match change:
        case "sensor id is an array":
            up["sensors"][0]["id"] = [393]
        case "route names its sensor with a table":
            up["routes"][0]["sensor"] = {"id": 393}
        case "sensor without id, route without sensor":
            del up["sensors"][0]["id"]
            del up["routes"][0]["sensor"]
    return toml_dumps(doc)


@pytest.mark.parametrize(
    "change",
    [
        "sensor id is an array",
        "route names its sensor with a table",
        "sensor without id, route without sensor",
    ],
)
def test_nilu_sensor_references_of_the_wrong_shape_are_config_errors(change: str) -> None:
    with pytest.raises(ConfigError):
        load_config_text(nilu_with(change), NILU_SAMPLE)


# ----------------------------------------------------------------------------------------------
# Serial line logger: every line is good or exactly one counted, logged rejection

LINE_CONFIGS: list[dict[str, Any]] = [
    {
        "parser": {"kind": "delimited", "columns": ["t", "a", "-", "b"]},
        "encoding": "utf-8",
        "timestamp": {"field": "t", "format": "iso8601", "timezone": "Europe/Oslo"},
    },
    {
        "parser": {
            "kind": "delimited",
            "delimiter": ";",
            "columns": ["t", "a"],
            "extra_columns": "ignore",
            "quotechar": None,
        },
        "decimal_comma": True,
        "timestamp": {"field": "t", "format": "epoch_ms"},
    },
    {
        "parser": {"kind": "delimited", "delimiter": "whitespace", "columns": ["a", "b"]},
        "non_numeric": "skip",
        "missing_values": ["-999", "NaN"],
    },
    {
        "parser": {"kind": "keyvalue", "fields": ["ts", "a"]},
        "non_numeric": "string",
        "timestamp": {"field": "ts", "format": "%d.%m.%Y %H:%M", "timezone": "+05:30"},
    },
    {
        "parser": {"kind": "keyvalue", "pair_separator": "|", "kv_separator": ":"},
        "ignore_pattern": "^#",
    },
    {
        "parser": {"kind": "regex", "pattern": r"(?P<t>\S+) T=(?P<a>\S+) P=(?P<b>\S+)"},
        "timestamp": {"field": "t", "format": "epoch_s"},
        "encoding": "latin-1",
    },
]

line_text = st.text(alphabet="0123456789+-.,;:|= eE\tTZ:naNinf#abt", max_size=60)
lines = st.lists(st.one_of(st.binary(max_size=80), line_text.map(str.encode)), max_size=12)


@contextlib.contextmanager
def every_log_event() -> Iterator[list[MutableMapping[str, Any]]]:
    """Capture log events at every level, whatever level an earlier test set up."""
    before = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as events:
            yield events
    finally:
        structlog.configure(**before)


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, len(LINE_CONFIGS) - 1), raw_lines=lines)
def test_every_bad_line_is_one_counted_logged_rejection(which: int, raw_lines: list[bytes]) -> None:
    cfg = SerialLinesConfig.model_validate(
        {"type": "serial_lines", "name": "log", "port": "/dev/null", **LINE_CONFIGS[which]}
    )
    source = SerialLinesSource(cfg)
    with every_log_event() as events:
        # The source's per-line step (pure: the port only feeds it lines).
        readings, good = source._readings(raw_lines, 1_700_000_000_000)
    rejected = source.stats.rejected
    assert good + rejected == len(raw_lines)
    assert sum(source.stats.detail["faults"].values()) == rejected
    assert sum(1 for e in events if e["event"] == "input_rejected") == rejected
    for r in readings:
        assert value_problem(r.value) is None and isinstance(r.value, float | str)


# ----------------------------------------------------------------------------------------------
# NMEA: the field parsers behind a valid checksum, and without checksums

nmea_field = st.text(alphabet="0123456789.-+NSEWAVMDK", max_size=12)


@settings(max_examples=500, deadline=None)
@given(
    talker=st.sampled_from(["GP", "GN", "GL", "P", "", "G"]),
    kind=st.sampled_from(["GGA", "RMC", "GSA", "XXX"]),
    fields=st.lists(nmea_field, max_size=16),
)
def test_checksummed_sentences_with_damaged_fields_are_only_rejected(
    talker: str, kind: str, fields: list[str]
) -> None:
    line = nmea_sentence(",".join([talker + kind, *fields]))
    try:
        item = parse(line)
    except NmeaError as exc:
        assert exc.kind in {"format", "field"}  # the checksum itself is right
        return
    assert isinstance(item, GgaFix | RmcFix | Sentence)
    pos = getattr(item, "position", None)
    if pos is not None:
        assert -90 <= pos.lat <= 90 and -180 <= pos.lon <= 180


def unchecked(head: str, n: int) -> st.SearchStrategy[bytes]:
    """A sentence of up to ``n`` damaged fields with no checksum at all."""
    return st.lists(nmea_field, max_size=n).map(lambda f: (head + ",".join(f)).encode())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=100), unchecked("$GPGGA,", 16), unchecked("$GNRMC,", 14)))
def test_sentences_without_checksums_are_only_rejected(raw: bytes) -> None:
    try:
        parse(decode_line(raw), require_checksum=False)
    except LineRejected as exc:
        assert exc.kind in {"decode", "garbage", "format", "checksum", "field"}


# ----------------------------------------------------------------------------------------------
# SDI-12: the value parser behind a valid CRC


@settings(max_examples=500, deadline=None)
@given(
    address=st.sampled_from("0aZ"),
    values=st.text(alphabet="0123456789+-.e ", max_size=40) | st.text(max_size=20),
)
def test_data_replies_with_a_valid_crc_are_only_rejected_as_malformed(
    address: str, values: str
) -> None:
    body = address + values
    # The CRC as the simulated sensor computes it, over the bytes the gateway checks it on.
    line = body + sdi12_crc_chars(sdi12_crc(body.encode("ascii", "replace")))
    try:
        out = parse_data(line, address, crc=True)
    except Sdi12Error as exc:
        assert exc.kind == "reply"  # never "crc": it is right
        return
    assert all(math.isfinite(v) for v in out)


# ----------------------------------------------------------------------------------------------
# Modbus


@settings(max_examples=500)
@given(st.binary(max_size=300))
@example(bytes([1, 3, 250]))  # announces more bytes than follow
@example(bytes([1, 0x83, 2, 0, 0]))  # an exception response with a wrong CRC
def test_the_rtu_frame_check_takes_any_bytes(raw: bytes) -> None:
    assert rtu_frame_problem(raw) in (None, "crc")


@settings(max_examples=500)
@given(dtype=st.sampled_from(DATA_TYPES), order=st.sampled_from(ORDERS), data=st.data())
def test_every_decoded_value_is_usable_or_refused_by_the_sources_check(
    dtype: DataType, order: Order, data: st.DataObject
) -> None:
    length = (
        data.draw(st.integers(1, 2 * MAX_STRING_VALUE), label="length")
        if dtype == "string"
        else None
    )
    spec = FieldSpec(
        "s",
        "holding",
        0,
        dtype,
        order,
        bit=data.draw(st.integers(0, 15)) if dtype == "bit" else None,
        length=length,
        scale=data.draw(st.sampled_from([1.0, 0.1, 1e300])),
        offset=data.draw(st.sampled_from([0.0, -40.0])),
    )
    n = register_count(dtype, length)
    words = data.draw(st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n), label="words")
    value = make_decoder(spec)(words_to_bytes(words), 0)
    problem = value_problem(value)
    # The Modbus source (modbus.py, _decode) looks for a problem only in non-finite floats and
    # in strings: no other decoded value may have one, or it would be emitted unchecked.
    if not ((type(value) is float and not math.isfinite(value)) or type(value) is str):
        assert problem is None, (dtype, order, value)
    if type(value) is float and not math.isfinite(value):
        assert problem is not None
