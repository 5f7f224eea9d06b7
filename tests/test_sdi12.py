"""SDI-12 reply parsing, CRC and config (pure)."""

from __future__ import annotations

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.sandbox.serial_sim import sdi12_data_reply, sdi12_values
from gateway.sources.serial.config import Sdi12Config
from gateway.sources.serial.parsers import LineRejected, decode_line
from gateway.sources.serial.sdi12 import (
    Sdi12Error,
    Started,
    crc16,
    crc_ascii,
    is_service_request,
    measurement_command,
    parse_address_reply,
    parse_data,
    parse_started,
)


def kind_of(fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(Sdi12Error) as info:
        fn(*args, **kw)  # type: ignore[operator]
    return info.value.kind


def test_crc_matches_the_standard() -> None:
    assert crc16(b"123456789") == 0xBB3D  # CRC-16/ARC check value
    assert crc_ascii(crc16(b"0+3.14")) == "OqZ"  # the example in the SDI-12 specification
    assert parse_data("0+3.14OqZ", "0", crc=True) == [3.14]
    assert kind_of(parse_data, "0+3.15OqZ", "0", crc=True) == "crc"
    assert kind_of(parse_data, "0+3.14OqY", "0", crc=True) == "crc"
    assert kind_of(parse_data, "0O", "0", crc=True) == "crc"


def test_measurement_replies() -> None:
    assert parse_started("00052", "0", concurrent=False) == Started("0", 5, 2)
    assert parse_started("a12015", "a", concurrent=True) == Started("a", 120, 15)
    assert kind_of(parse_started, "00052", "1", concurrent=False) == "reply"  # other sensor
    assert kind_of(parse_started, "0005", "0", concurrent=False) == "reply"
    assert kind_of(parse_started, "000512", "0", concurrent=False) == "reply"
    assert kind_of(parse_started, "0005x", "0", concurrent=False) == "reply"
    assert kind_of(parse_started, "0\u0665\u0665\u06655", "0", concurrent=False) == "reply"
    assert is_service_request("3", "3") and not is_service_request("30", "3")


def test_data_replies() -> None:
    assert parse_data("1+21.5-0.03+1013", "1", crc=False) == [21.5, -0.03, 1013.0]
    assert parse_data("1", "1", crc=False) == []  # no (more) data
    assert parse_data("1-.5+0.", "1", crc=False) == [-0.5, 0.0]
    for bad in ["1 21.5", "1+21..5", "1+", "1+12345678", "121.5", "1+1.2x"]:
        assert kind_of(parse_data, bad, "1", crc=False) == "reply", bad


def test_address_reply_and_commands() -> None:
    assert parse_address_reply("7") == "7"
    assert kind_of(parse_address_reply, "70") == "reply"
    assert kind_of(parse_address_reply, "!") == "reply"
    assert measurement_command("0", "M", crc=False) == "0M!"
    assert measurement_command("0", "M", crc=True) == "0MC!"
    assert measurement_command("0", "M2", crc=True) == "0MC2!"
    assert measurement_command("b", "C", crc=False) == "bC!"
    assert measurement_command("b", "C1", crc=True) == "bCC1!"


def test_values_fit_seven_digits() -> None:
    assert sdi12_values([1.5, -2]) == "+1.500-2.000"
    assert sdi12_values([12345.678]) == "+12345.68"
    assert sdi12_values([-1234567.0]) == "-1234567"
    line = "0" + sdi12_values([12345.678, -0.001])
    assert parse_data(line, "0", crc=False) == [12345.68, -0.001]


values = st.lists(st.floats(min_value=-9999, max_value=9999, allow_nan=False), max_size=9)


@given(values=values, crc=st.booleans(), address=st.sampled_from("0129azAZ"))
def test_data_round_trip(values: list[float], crc: bool, address: str) -> None:
    line = sdi12_data_reply(address, values, crc=crc)
    assert parse_data(line, address, crc=crc) == pytest.approx(values, abs=0.0006)


@settings(max_examples=400)
@given(raw=st.binary(max_size=60), crc=st.booleans())
def test_no_bytes_make_a_reply_parser_raise_anything_but_a_rejection(raw: bytes, crc: bool) -> None:
    try:
        line = decode_line(raw)
        parse_data(line, "0", crc=crc)
    except LineRejected:
        pass
    text = raw.decode("latin-1")
    with contextlib.suppress(Sdi12Error):
        parse_address_reply(text)
    for concurrent in (False, True):
        with contextlib.suppress(Sdi12Error):
            parse_started(text, "0", concurrent=concurrent)


@given(st.text(alphabet="0123456789+-.!?aMCD\r", max_size=30))
def test_reply_shaped_text_only_ever_rejected(text: str) -> None:
    for crc in (False, True):
        try:
            out = parse_data(text, "0", crc=crc)
        except Sdi12Error:
            continue
        assert not any(math.isnan(v) for v in out)


def sdi(**kw: object) -> Sdi12Config:
    return Sdi12Config.model_validate(
        {"type": "sdi12", "name": "bus", "port": "/dev/ttyUSB1", **kw}
    )


def test_config() -> None:
    cfg = sdi(
        sensors=[
            {"address": "0", "series": ["soil.moist", "-", "soil.temp"]},
            {"address": "1", "command": "C", "series": ["rain"]},
        ]
    )
    assert list(cfg.series_names() or []) == ["soil.moist", "soil.temp", "rain"]
    assert cfg.sensors[1].concurrent
    assert sdi(sensors=[{"address": "0"}]).series_names() is None
    with pytest.raises(ValidationError, match="unique"):
        sdi(sensors=[{"address": "0"}, {"address": "0"}])
    with pytest.raises(ValidationError, match="single sensor"):
        sdi(sensors=[{"address": "?"}, {"address": "1"}])
    with pytest.raises(ValidationError):
        sdi(sensors=[{"address": "0", "command": "D0"}])
    with pytest.raises(ValidationError):
        sdi(sensors=[])
    raw = sdi(sensors=[{"address": "0"}], baudrate=1200, bytesize=7, parity="E", break_ms=12)
    assert (raw.baudrate, raw.bytesize, raw.parity) == (1200, 7, "E")
