"""NMEA 0183 parsing: checksums, GGA, RMC, fix quality (pure)."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from datetime import time as dtime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.models import Position
from gateway.sandbox.serial_sim import nmea_gga, nmea_rmc, nmea_sentence
from gateway.sources.serial.config import NmeaConfig
from gateway.sources.serial.nmea import (
    GgaFix,
    NmeaError,
    RmcFix,
    Sentence,
    checksum,
    parse,
)
from gateway.sources.serial.parsers import LineRejected, decode_line

GGA = "$GPGGA,123519,4807.038,N,01131.000,E,1,08,0.9,545.4,M,46.9,M,,*47"
RMC = "$GPRMC,123519,A,4807.038,N,01131.000,E,022.4,084.4,230394,003.1,W*6A"


def kind_of(line: str) -> str:
    with pytest.raises(NmeaError) as info:
        parse(line)
    return info.value.kind


def test_textbook_gga() -> None:
    fix = parse(GGA)
    assert isinstance(fix, GgaFix)
    assert fix.time == dtime(12, 35, 19)
    assert fix.quality == 1 and fix.satellites == 8 and fix.hdop == 0.9
    assert fix.position is not None
    assert fix.position.lat == pytest.approx(48.1173)
    assert fix.position.lon == pytest.approx(11.5166667)
    assert fix.position.alt == 545.4


def test_textbook_rmc() -> None:
    fix = parse(RMC)
    assert isinstance(fix, RmcFix)
    assert fix.valid
    assert fix.utc == datetime(1994, 3, 23, 12, 35, 19, tzinfo=UTC)
    assert fix.position is not None and fix.position.alt is None
    assert fix.position.lat == pytest.approx(48.1173)
    assert fix.position.lon == pytest.approx(11.5166667)
    assert fix.speed_knots == 22.4 and fix.course == 84.4


def test_checksum_is_verified() -> None:
    assert checksum(GGA[1:-3]) == 0x47
    # The simulator frames sentences with its own checksum: the textbook lines come out whole.
    assert nmea_sentence(GGA[1:-3]) == GGA and nmea_sentence(RMC[1:-3]) == RMC
    assert kind_of(GGA[:-2] + "48") == "checksum"
    assert kind_of(GGA.replace("545.4", "546.4")) == "checksum"
    assert kind_of(GGA[:-3]) == "checksum"  # missing checksum
    assert isinstance(parse(GGA[:-3], require_checksum=False), GgaFix)
    assert isinstance(parse(GGA[:-2] + "47".lower()), GgaFix)
    assert kind_of(GGA[1:]) == "format"


def test_no_fix_and_void() -> None:
    no_fix = parse(nmea_sentence("GPGGA,123519,,,,,0,00,99.9,,M,,M,,"))
    assert isinstance(no_fix, GgaFix) and no_fix.quality == 0 and no_fix.position is None
    # A stale position with quality 0 is not a fix either.
    stale = parse(nmea_sentence("GPGGA,123519,4807.038,N,01131.000,E,0,03,9.9,545.4,M,,M,,"))
    assert isinstance(stale, GgaFix) and stale.position is None
    void = parse(nmea_sentence("GPRMC,123519,V,4807.038,N,01131.000,E,,,230394,,,N"))
    assert isinstance(void, RmcFix) and not void.valid and void.position is None
    not_valid_mode = parse(nmea_sentence("GNRMC,123519,A,4807.038,N,01131.000,E,,,230394,,,N"))
    assert isinstance(not_valid_mode, RmcFix) and not not_valid_mode.valid


def test_damaged_fields() -> None:
    assert kind_of(nmea_sentence("GPGGA,123519,9107.038,N,01131.000,E,1,08,0.9,1,M,,M,,")) == (
        "field"
    )
    assert kind_of(nmea_sentence("GPGGA,123519,4867.038,N,01131.000,E,1,08,0.9,1,M,,M,,")) == (
        "field"
    )
    assert kind_of(nmea_sentence("GPGGA,123519,4807.038,X,01131.000,E,1,08,0.9,1,M,,M,,")) == (
        "field"
    )
    assert kind_of(nmea_sentence("GPGGA,123519,,,,,1,08,0.9,,M,,M,,")) == "field"
    assert kind_of(nmea_sentence("GPGGA,253519,,,,,0,00,,,M,,M,,")) == "field"
    assert kind_of(nmea_sentence("GPGGA,123519,4807.038,N")) == "format"
    assert kind_of(nmea_sentence("GPRMC,123519,A,,,,,,,230394,,")) == "field"
    assert kind_of(nmea_sentence("GPRMC,123519,A,4807.038,N,01131.000,E,,,320394,,")) == "field"


def test_other_sentences_and_talkers() -> None:
    gsa = parse(nmea_sentence("GPGSA,A,3,04,05,,,,,,,,,,,2.5,1.3,2.1"))
    assert gsa == Sentence("GP", "GSA", ("A", "3", "04", "05", *[""] * 10, "2.5", "1.3", "2.1"))
    assert isinstance(parse(nmea_sentence(GGA[1:-3].replace("GPGGA", "GNGGA"))), GgaFix)
    proprietary = parse(nmea_sentence("PUBX,00,123519"))
    assert isinstance(proprietary, Sentence) and proprietary.talker == "P"


@settings(max_examples=400)
@given(st.binary(max_size=100))
def test_no_bytes_make_the_parser_raise_anything_but_a_rejection(raw: bytes) -> None:
    with contextlib.suppress(LineRejected):
        parse(decode_line(raw))


@settings(max_examples=300)
@given(st.text(alphabet="$GPNRMCA*,.0123456789NSEWV-", max_size=90))
def test_sentence_shaped_text_only_ever_rejected(text: str) -> None:
    try:
        parse(text)
    except NmeaError as exc:
        assert exc.kind in {"format", "checksum", "field"}


lat = st.floats(min_value=-89.999, max_value=89.999, allow_nan=False)
lon = st.floats(min_value=-179.999, max_value=179.999, allow_nan=False)
alt = st.one_of(st.none(), st.floats(min_value=-400, max_value=9000).map(lambda a: round(a, 1)))


@given(
    pos=st.builds(Position, lat, lon, alt),
    quality=st.integers(1, 8),
    sats=st.integers(0, 40),
    talker=st.sampled_from(["GP", "GN", "GL", "GA"]),
)
def test_gga_round_trip(pos: Position, quality: int, sats: int, talker: str) -> None:
    lat, lon, alt = pos.lat, pos.lon, pos.alt
    line = nmea_gga(dtime(1, 2, 3, 450000), pos, quality=quality, satellites=sats, talker=talker)
    fix = parse(line)
    assert isinstance(fix, GgaFix)
    assert fix.quality == quality and fix.satellites == sats and fix.time == dtime(1, 2, 3, 450000)
    assert fix.position is not None
    assert fix.position.lat == pytest.approx(lat, abs=1e-7)
    assert fix.position.lon == pytest.approx(lon, abs=1e-7)
    assert fix.position.alt == alt


@given(
    lat=lat,
    lon=lon,
    when=st.datetimes(min_value=datetime(1980, 1, 1), max_value=datetime(2079, 12, 31)),
)
def test_rmc_round_trip(lat: float, lon: float, when: datetime) -> None:
    when = when.replace(microsecond=when.microsecond // 10000 * 10000, tzinfo=UTC)
    fix = parse(nmea_rmc(when, Position(lat, lon)))
    assert isinstance(fix, RmcFix) and fix.valid and fix.utc == when
    assert fix.position is not None
    assert fix.position.lat == pytest.approx(lat, abs=1e-7)
    assert fix.position.lon == pytest.approx(lon, abs=1e-7)


@given(
    lat=lat,
    lon=lon,
    index=st.integers(1, 60),
    char=st.characters(min_codepoint=32, max_codepoint=126),
)
def test_any_single_character_change_is_caught(
    lat: float, lon: float, index: int, char: str
) -> None:
    line = nmea_gga(dtime(12, 0), Position(lat, lon, 10.0))
    index = index % (len(line) - 1) + 1
    damaged = line[:index] + char + line[index + 1 :]
    try:
        fix = parse(damaged)
    except NmeaError:
        return
    # Only harmless changes survive: the same character, or hex case in the checksum.
    assert damaged.upper() == line.upper()
    assert fix == parse(line)


def test_config() -> None:
    cfg = NmeaConfig.model_validate(
        {"type": "nmea", "name": "gps", "port": "/dev/ttyACM0", "emit": ["lat", "satellites"]}
    )
    assert cfg.baudrate == 4800
    assert list(cfg.series_names()) == ["gps.lat", "gps.satellites"]
    with pytest.raises(ValidationError):
        NmeaConfig.model_validate(
            {"type": "nmea", "name": "gps", "port": "/dev/ttyACM0", "emit": ["speed"]}
        )
