"""NILU packet building without a network: timestamps, coordinates, config, packet grouping."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.configbase import Secret
from gateway.models import Position, StoredReading
from gateway.sandbox.nilu import NUM, epoch_parser
from gateway.uplinks.nilu import packets as pk
from gateway.uplinks.nilu.config import NiluConfig
from gateway.uplinks.nilu.pushtest import compare
from gateway.uplinks.nilu.uplink import NiluUplink

ZONES = [
    "UTC",
    "Europe/Oslo",
    "Europe/Stockholm",
    "America/Chicago",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/St_Johns",
]
PATTERNS = [
    "yyyy/MM/dd HH:mm:ss",
    "yyyy-MM-dd'T'HH:mm:ss",
    "dd.MM.yyyy HH:mm:ss.fff",
    "yyyyMMddHHmmss",
    "HH:mm:ss dd/MM/yyyy",
    "yyyy-MM-dd\\THH:mm:ss.SSS",
]
#: 1970 .. 2100 in milliseconds.
TIMES = st.integers(min_value=0, max_value=4_102_444_800_000)


def sensor(**kw: Any) -> dict[str, Any]:
    return {"id": 393, "resolution_s": 60, "timestamp_field": "date", **kw}


def cfg(
    sensors: list[dict[str, Any]] | None = None,
    routes: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> NiluConfig:
    return NiluConfig.model_validate(
        {
            "name": "nilu",
            "type": "nilu",
            "token": {"env": "X"},
            "sensors": sensors or [sensor()],
            "routes": routes
            or [
                {"series": "a.no2", "sensor": 393, "parameter": "no2"},
                {"series": "a.pm10", "sensor": 393, "parameter": "pm10"},
            ],
            **kw,
        }
    )


def problem(**kw: Any) -> str:
    with pytest.raises(ValidationError) as info:
        cfg(**kw)
    return str(info.value)


# -- timestamps -----------------------------------------------------------------------------------


def test_the_documents_example_time() -> None:
    tokens = pk.parse_pattern("yyyy/MM/dd HH:mm:ss")
    ts = int(datetime(2010, 10, 20, 13, 0, tzinfo=UTC).timestamp() * 1000)
    assert pk.timestamp_value(ts, tokens, ZoneInfo("Europe/Stockholm")) == "2010/10/20 15:00:00"
    assert pk.timestamp_value(ts + 999, None, UTC) == 1287579600


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("yyyy/MM/dd HH:mm", "lacks second"),
        ("yy/MM/dd HH:mm:ss", "'yy' is not supported"),
        ("yyyy-MM-ddTHH:mm:ss", "'T' is not supported"),
        ("yyyy/MM/dd hh:mm:ss a", "'hh' is not supported"),
        ("yyyy/MM/dd HH:mm:ss 'x", "unclosed quote"),
        ("yyyy yyyy MM dd HH mm ss", "repeats year"),
    ],
)
def test_unsupported_patterns_are_refused_with_the_reason(pattern: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        pk.parse_pattern(pattern)


@given(ts=TIMES, zone=st.sampled_from(ZONES), pattern=st.sampled_from(PATTERNS))
def test_local_time_text_reads_back_as_the_same_second(ts: int, zone: str, pattern: str) -> None:
    # The emulator's StringEpochTime reader is written independently of the uplink's writer.
    text = pk.timestamp_value(ts, pk.parse_pattern(pattern), ZoneInfo(zone))
    assert isinstance(text, str)
    back = epoch_parser(pattern, zone)(text)
    if pk.ambiguous_local_time(ts, ZoneInfo(zone)):
        # The text names two instants; the reader picks one, and the uplink refuses to send it.
        assert pk.format_local(back * 1000, pk.parse_pattern(pattern), ZoneInfo(zone)) == text
    else:
        assert back == ts // 1000


@given(ts=TIMES)
def test_epoch_seconds_are_the_floor_of_the_milliseconds(ts: int) -> None:
    assert pk.timestamp_value(ts, None, UTC) == ts // 1000


def test_the_repeated_hour_is_ambiguous_and_nothing_else_around_it() -> None:
    oslo = ZoneInfo("Europe/Oslo")
    # 2024-10-27: clocks go from 03:00 CEST back to 02:00 CET at 01:00 UTC.
    start = int(datetime(2024, 10, 27, 0, 0, tzinfo=UTC).timestamp() * 1000)
    hour = 3_600_000
    assert not pk.ambiguous_local_time(start - 1000, oslo)
    assert all(pk.ambiguous_local_time(start + k * 60_000, oslo) for k in range(120))
    assert not pk.ambiguous_local_time(start + 2 * hour, oslo)
    assert not pk.ambiguous_local_time(start + 30 * 60_000, UTC)


# -- coordinates and endpoints -------------------------------------------------------------------


@given(x=st.floats(min_value=-180, max_value=180, allow_nan=False))
def test_coordinates_are_plain_decimals(x: float) -> None:
    text = pk.coord(x)
    assert re.fullmatch(NUM, text), text  # the emulator's route takes exactly this shape
    assert text != "-0" and abs(float(text) - x) <= 5e-8


def test_endpoints_follow_the_document() -> None:
    base = "https://sensors.nilu.no/"
    fixed = pk.default_endpoint(base, 393, gps=False)
    gps = pk.default_endpoint(base, 394, gps=True)
    assert fixed == "https://sensors.nilu.no/api/sensors/393/inbound"
    assert (
        gps == "https://sensors.nilu.no/api/sensors/394/{longitude}/{latitude}/{altitude}/inbound"
    )
    assert pk.fill_endpoint(fixed, None, None) == fixed
    assert pk.fill_endpoint(gps, Position(lat=50, lon=60, alt=1), None) == (
        "https://sensors.nilu.no/api/sensors/394/60/50/1/inbound"
    )
    assert pk.fill_endpoint(gps, Position(lat=-0.00000001, lon=5.3126911), 0.5).endswith(
        "/394/5.3126911/0/0.5/inbound"
    )
    with pytest.raises(ValueError, match="altitude"):
        pk.fill_endpoint(gps, Position(lat=1, lon=2), None)
    assert pk.pushtest_url(fixed) == fixed + "/?pushtest=true"
    assert pk.same_origin("https://sensors.nilu.no:443/x", base)
    assert not pk.same_origin("https://evil.example/api/sensors/1/inbound", base)
    assert not pk.same_origin("http://sensors.nilu.no/x", base)


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b'{"error-code": 110, "error-message": "bad", "http-status-code": 500}', 110, "bad"),
        (b'{"error-code": "131", "error-message": "conv"}', 131, "conv"),
        (b'{"error-code": true}', None, ""),
        (b"<html>oops</html>", None, "<html>oops</html>"),
        (b"[1]", None, "[1]"),
    ],
)
def test_error_bodies(body: bytes, code: int | None, message: str) -> None:
    assert pk.service_error(body) == pk.ServiceError(code, message)


# -- config --------------------------------------------------------------------------------------


def test_min_interval_defaults_to_the_resolution() -> None:
    c = cfg(
        routes=[
            {"series": "a.no2", "sensor": 393, "parameter": "no2"},
            {
                "series": "a.pm10",
                "sensor": 393,
                "parameter": "pm10",
                "min_interval_s": 60,
                "downsample": "mean",
            },
        ]
    )
    assert [r.min_interval_s for r in c.routes] == [60.0, 60.0]
    slower = cfg(
        routes=[{"series": "a.no2", "sensor": 393, "parameter": "no2", "min_interval_s": 300}]
    )
    assert slower.routes[0].min_interval_s == 300


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (
            {"routes": [{"series": "a", "sensor": 393, "parameter": "no2", "min_interval_s": 10}]},
            "below sensor 393's resolution of 60 s",
        ),
        (
            {
                "routes": [
                    {"series": "a", "sensor": 393, "parameter": "no2"},
                    {"series": "b", "sensor": 393, "parameter": "pm", "min_interval_s": 120},
                ]
            },
            "its routes need one min_interval_s",
        ),
        ({"routes": [{"series": "a", "sensor": 9, "parameter": "no2"}]}, "names sensor 9"),
        (
            {
                "routes": [
                    {"series": "a", "sensor": 393, "parameter": "no2"},
                    {"series": "b", "sensor": 393, "parameter": "no2"},
                ]
            },
            "routed from two series",
        ),
        ({"routes": [{"series": "a", "sensor": 393, "parameter": "date"}]}, "timestamp attribute"),
        ({"routes": [{"series": "a", "sensor": 393, "parameter": "no 2"}]}, "should match pattern"),
        ({"sensors": [sensor(timestamp_timezone="UTC")]}, "needs timestamp_format"),
        (
            {
                "sensors": [
                    sensor(
                        timestamp_format="yyyy/MM/dd HH:mm:ss", timestamp_timezone="Mars/Olympus"
                    )
                ]
            },
            "unknown time zone",
        ),
        (
            {
                "sensors": [
                    sensor(
                        timestamp_format="yyyy/MM/dd HH:mm:ss",
                        timestamp_timezone="../../etc/passwd",
                    )
                ]
            },
            "not an IANA name",
        ),
        ({"sensors": [sensor(timestamp_format="yy/MM/dd")]}, "not supported"),
        ({"sensors": [sensor(altitude_if_unknown_m=0.0)]}, "GPS sensors only"),
        ({"sensors": [sensor(), sensor()]}, "configured twice"),
        ({"sensors": [sensor(), sensor(id=394)]}, "sensors without routes: 394"),
        ({"batch_max_items": 1}, "packet would be split"),
    ],
)
def test_config_mistakes_are_named(kw: dict[str, Any], message: str) -> None:
    assert message in problem(**kw)


def test_the_sample_config_section_validates() -> None:
    path = Path(__file__).resolve().parents[1] / "config" / "samples" / "nilu.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    [section] = data["uplinks"]
    c = NiluConfig.model_validate(section)
    assert {s.id for s in c.sensors} == {393, 394} and c.token.credential == "nilu"


# -- packets ---------------------------------------------------------------------------------------


def uplink(**sensor_kw: Any) -> NiluUplink:
    return NiluUplink(cfg(sensors=[sensor(**sensor_kw)]), Secret("t0ken-value", "test"))


def test_one_packet_per_sensor_and_second_with_the_mapped_timestamp() -> None:
    up = uplink(timestamp_format="yyyy-MM-dd'T'HH:mm:ss", timestamp_timezone="Asia/Kolkata")
    t = int(datetime(2025, 1, 2, 3, 4, 0, tzinfo=UTC).timestamp() * 1000)
    a = StoredReading(1, "a.no2", t, 1.5)
    b = StoredReading(2, "a.pm10", t + 400, 7)
    assert up.group_key(a) == up.group_key(b) == (393, t // 1000)
    p = up.packet([a, b])
    assert p.body == {"no2": 1.5, "pm10": 7, "date": "2025-01-02T08:34:00"}
    assert sorted(p.ids) == [1, 2] and p.superseded == {} and p.position is None
    assert pk.encode(p.body) == b'{"no2":1.5,"pm10":7,"date":"2025-01-02T08:34:00"}'


def test_two_readings_of_one_series_in_a_packet() -> None:
    up = uplink()
    t = 1_700_000_040_000
    p = up.packet(
        [
            StoredReading(5, "a.no2", t, 2.0),
            StoredReading(3, "a.no2", t, 2.0),
            StoredReading(4, "a.no2", t + 1, 9.0),
            StoredReading(6, "a.pm10", t, 1),
        ]
    )
    assert p.body == {"no2": 2.0, "pm10": 1, "date": t // 1000}
    assert sorted(p.ids) == [3, 5, 6]  # the newest (5) goes; 3 is the same value
    assert list(p.superseded) == [4] and "superseded" in p.superseded[4]


def test_local_checks() -> None:
    gps = NiluUplink(cfg(sensors=[sensor(gps=True)]), Secret("t0ken-value", "test"))
    t = 1_700_000_040_000
    assert gps.check(StoredReading(1, "a.no2", t, 1.0, Position(60, 5, 3))) is None
    assert str(gps.check(StoredReading(1, "a.no2", t, 1.0))).startswith("no GPS fix")
    assert "without altitude" in str(gps.check(StoredReading(1, "a.no2", t, 1.0, Position(60, 5))))
    flat_ok = NiluUplink(
        cfg(sensors=[sensor(gps=True, altitude_if_unknown_m=0.0)]), Secret("t0ken-value", "test")
    )
    assert flat_ok.check(StoredReading(1, "a.no2", t, 1.0, Position(60, 5))) is None
    fixed = uplink()
    assert fixed.check(StoredReading(1, "a.no2", t, 1.0)) is None
    assert "finite" in str(fixed.check(StoredReading(1, "a.no2", t, float("inf"))))
    oslo = uplink(timestamp_format="yyyy/MM/dd HH:mm:ss", timestamp_timezone="Europe/Oslo")
    repeated = int(datetime(2024, 10, 27, 0, 30, tzinfo=UTC).timestamp() * 1000)
    reason = str(oslo.check(StoredReading(1, "a.no2", repeated, 1.0)))
    assert "'2024/10/27 02:30:00' occurs twice in Europe/Oslo" in reason
    assert oslo.check(StoredReading(1, "a.no2", repeated + 7_200_000, 1.0)) is None


# -- schema comparison (check-uplink) -------------------------------------------------------------


def test_schema_comparison_names_each_difference() -> None:
    c = cfg(sensors=[sensor(gps=True, timestamp_format="yyyy/MM/dd HH:mm:ss")])
    nilu: dict[str, Any] = {
        "enabled": False,
        "resolution": 30,
        "srs": {"epsg": 2000},
        "parameters": [
            {"name": "no2", "type": "double"},
            {"name": "so2", "type": "double"},
            {"name": "date", "type": "long"},
        ],
        "location": {"longitude": 1, "latitude": 2, "altitude": 3},
        "mapping": [{"name": "Timestamp", "target-path": "/date"}],
        "converters": [
            {
                "output-type": "StringEpochTime",
                "target-path": "/date",
                "input-args": {"input-format": "yyyy/MM/dd HH:mm:ss", "timezone": "Europe/Oslo"},
            }
        ],
    }
    lines = compare(c.sensors[0], ["no2", "pm10"], nilu)
    text = "\n".join(lines)
    for part in (
        "disabled at NILU",
        "resolution is 30 s at NILU, 60 s here",
        "parameter 'pm10' is not declared",
        "declares parameter 'so2'",
        "in Europe/Oslo, this config writes 'yyyy/MM/dd HH:mm:ss' in UTC",
        "fixed location for it: set gps = false",
        "EPSG:2000",
    ):
        assert part in text, part
    good = {
        **nilu,
        "enabled": True,
        "resolution": 60,
        "srs": {"epsg": 4326},
        "location": {},
        "parameters": [*nilu["parameters"][:1], {"name": "pm10", "type": "double"}],
        "converters": [
            {
                "output-type": "StringEpochTime",
                "target-path": "/date",
                "input-args": {"input-format": "yyyy/MM/dd HH:mm:ss"},
            }
        ],
    }
    assert [line[:4] for line in compare(c.sensors[0], ["no2", "pm10"], good)] == ["OK  "]
