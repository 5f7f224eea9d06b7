"""Datacooee request bodies, built without any network: value and time formatting, document
shape, the config's limits, and agreement with the emulator's own validation of the document."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.configbase import Secret
from gateway.models import Position, StoredReading
from gateway.sandbox.datacooee import InputKind, parse_timestamp, validate
from gateway.uplinks.datacooee.config import DatacooeeConfig, DatacooeeRoute
from gateway.uplinks.datacooee.uplink import (
    DatacooeeUplink,
    coord_text,
    document,
    encode,
    error_details,
    float_text,
    iso_ms,
    value_text,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ISO_MS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
DECIMAL = re.compile(r"^-?\d+\.\d+$")
#: 0001-01-01T00:00:00.000Z .. 9999-12-31T23:59:59.999Z in milliseconds since the epoch.
TS = st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(min_size=1, max_size=256).filter(lambda s: s.strip() != "")


def cfg(**kw: object) -> DatacooeeConfig:
    data: dict[str, object] = {
        "name": "datacooee",
        "type": "datacooee",
        "organization_id": "org-1",
        "api_key": {"env": "UNUSED"},
        "routes": [{"series": "s", "input_pk": "senabc"}],
        **kw,
    }
    return DatacooeeConfig.model_validate(data)


ROUTE = DatacooeeRoute(series="s", input_pk="senxxxxxxxxxx")


# -- timestamps ----------------------------------------------------------------------------------


def test_timestamp_is_the_documented_form() -> None:
    assert iso_ms(1_602_597_759_489) == "2020-10-13T14:02:39.489Z"  # the document's example
    assert iso_ms(1_602_597_759_000) == "2020-10-13T14:02:39.000Z"
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"
    assert iso_ms(-1) == "1969-12-31T23:59:59.999Z"
    assert iso_ms(-62_135_596_800_000) == "0001-01-01T00:00:00.000Z"  # four-digit year, padded
    assert iso_ms(253_402_300_799_999) == "9999-12-31T23:59:59.999Z"


@settings(deadline=None)  # pure and fast, but a loaded CI box must not make it flaky
@given(TS)
def test_timestamp_reads_back_to_the_same_millisecond(ts: int) -> None:
    text = iso_ms(ts)
    assert ISO_MS.match(text), text
    assert datetime.fromisoformat(text) == EPOCH + timedelta(milliseconds=ts)
    assert parse_timestamp(text) == EPOCH + timedelta(milliseconds=ts)  # the emulator agrees


# -- values --------------------------------------------------------------------------------------


def test_value_strings() -> None:
    assert value_text(12.5) == "12.5"  # the document's example
    assert value_text(42) == "42"
    assert value_text(-7) == "-7"
    assert value_text(3.0) == "3.0"
    assert value_text(0.1) == "0.1"
    assert value_text(1e-7) == "0.0000001"
    assert value_text(1e20) == "100000000000000000000.0"
    assert value_text(-0.0) == "0.0"
    assert value_text(True) == "1" and value_text(False) == "0"
    assert value_text(True, "text") == "true" and value_text(False, "text") == "false"
    assert value_text("OPEN") == "OPEN"
    with pytest.raises(ValueError, match="finite"):
        float_text(math.nan)


@settings(deadline=None)
@given(FINITE)
def test_floats_are_positional_and_exact(x: float) -> None:
    text = value_text(x)
    assert DECIMAL.match(text), text
    assert float(text) == x
    # Shortest: never longer (in significant digits) than Python's own shortest repr.
    digits = len(text.lstrip("-").replace(".", "").strip("0"))
    assert digits <= len(repr(abs(x)).split("e")[0].replace(".", "").strip("0")) or x == 0


@settings(deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_integers_are_plain_decimal(n: int) -> None:
    text = value_text(n)
    assert re.fullmatch(r"-?\d+", text) and int(text) == n


@settings(deadline=None)
@given(TEXT)
def test_text_goes_as_is(s: str) -> None:
    assert value_text(s) == s


# -- coordinates ---------------------------------------------------------------------------------


def test_coordinates() -> None:
    assert coord_text(40.730610) == "40.73061"
    assert coord_text(-73.935242) == "-73.935242"
    assert coord_text(0.0) == "0.0"
    assert coord_text(-0.00000001) == "0.0"
    assert coord_text(90.0) == "90.0"
    assert coord_text(51.123456789) == "51.1234568"


@settings(deadline=None)
@given(st.floats(min_value=-180, max_value=180))
def test_coordinates_keep_a_centimetre(x: float) -> None:
    text = coord_text(x)
    assert DECIMAL.match(text), text
    assert abs(float(text) - x) <= 5.000001e-8
    assert len(text.split(".")[1]) <= 7
    assert text.endswith(".0") or not text.endswith("0")


# -- the document --------------------------------------------------------------------------------


def test_document_is_byte_for_byte_the_documented_shape() -> None:
    item = StoredReading(1, "s", 1_602_597_759_489, 12.5, Position(40.730610, -73.935242, 31.0))
    assert encode(document(item, ROUTE)) == (
        b'{"data":{"type":"SensorData","id":"null","attributes":{"value":"12.5",'
        b'"timestamp":"2020-10-13T14:02:39.489Z","latitude":"40.73061","longitude":"-73.935242"},'
        b'"relationships":{"sensor":{"data":{"type":"Sensor","id":"senxxxxxxxxxx"}}}}}'
    )
    bare = document(StoredReading(2, "s", 1_602_597_759_489, 7), ROUTE)
    assert bare["data"]["attributes"] == {"value": "7", "timestamp": "2020-10-13T14:02:39.489Z"}
    # The document's order: type, id, attributes, relationships.
    assert list(bare["data"]) == ["type", "id", "attributes", "relationships"]


def test_position_outside_wgs84_is_left_out_not_the_value() -> None:
    item = StoredReading(1, "s", 0, 1.5, Position(math.nan, 10.0))
    assert "latitude" not in document(item, ROUTE)["data"]["attributes"]
    item = StoredReading(1, "s", 0, 1.5, Position(91.0, 10.0))
    assert document(item, ROUTE)["data"]["attributes"]["value"] == "1.5"
    assert "longitude" not in document(item, ROUTE)["data"]["attributes"]


def test_non_ascii_text_is_escaped() -> None:
    body = encode(document(StoredReading(1, "s", 0, "Ström ✓"), ROUTE))
    assert body.isascii()
    assert json.loads(body)["data"]["attributes"]["value"] == "Ström ✓"


positions = st.one_of(
    st.none(),
    st.builds(
        Position, st.floats(min_value=-90, max_value=90), st.floats(min_value=-180, max_value=180)
    ),
)


@settings(deadline=None)
@given(
    TS,
    st.one_of(FINITE, st.integers(-(2**53), 2**53), st.booleans(), TEXT),
    positions,
    st.sampled_from(["number", "text"]),
)
def test_emulator_accepts_every_document_we_build(
    ts: int, value: float | int | bool | str, pos: Position | None, booleans: str
) -> None:
    route = DatacooeeRoute(series="s", input_pk="sen-1_a.b~c", booleans=booleans)  # type: ignore[arg-type]
    doc = json.loads(encode(document(StoredReading(9, "s", ts, value, pos), route)))
    kind: InputKind = "any" if isinstance(value, str) or booleans == "text" else "number"
    attrs = validate(doc, "sen-1_a.b~c", kind)
    assert attrs["value"] == value_text(value, booleans)  # type: ignore[arg-type]
    assert ("latitude" in attrs) == (pos is not None)


# -- config and local checks ---------------------------------------------------------------------


def test_config_defaults_are_conservative() -> None:
    c = cfg()
    assert (c.batch_max_items, c.concurrency) == (1, 2)
    assert (c.rate_limit_requests, c.rate_limit_period_s) == (60, 60.0)
    assert c.endpoint("senabc") == (
        "https://cloud.mydata.management/api/external/v1/inputs/senabc/inputdata/"
    )
    assert cfg(url="http://127.0.0.1:9/").endpoint("x") == (
        "http://127.0.0.1:9/api/external/v1/inputs/x/inputdata/"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"batch_max_items": 5}, "one reading per request"),
        ({"routes": [{"series": "s", "input_pk": "a/../b"}]}, "String should match pattern"),
        ({"routes": [{"series": "s", "input_pk": "x", "booleans": "yes"}]}, "'number' or 'text'"),
        ({"url": "cloud.mydata.management"}, "String should match pattern"),
        (
            {"routes": [{"series": "s", "input_pk": "a"}, {"series": "s", "input_pk": "b"}]},
            "series routed twice",
        ),
    ],
)
def test_config_refuses(override: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        cfg(**override)


def test_local_checks() -> None:
    up = DatacooeeUplink(cfg(), Secret("k", "test"))
    assert up.check(StoredReading(1, "s", 0, " ")) is not None
    assert "finite" in (up.check(StoredReading(1, "s", 0, math.inf)) or "")
    assert up.check(StoredReading(1, "s", 0, 0)) is None
    assert up.check(StoredReading(1, "s", 0, "x")) is None
    assert up.group_key(StoredReading(1, "s", 0, 0)) is None
    body = up.body(StoredReading(1, "s", 0, "y" * 200, Position(-33.8688197, 151.2092955)))
    assert len(body) <= up.item_size(StoredReading(1, "s", 0, "y" * 200))


def test_error_details_read_jsonapi_errors_only() -> None:
    body = {
        "errors": [
            {
                "status": "400",
                "detail": "This field may not be blank.",
                "source": {"pointer": "/data/attributes/value"},
            },
            {"status": "400", "detail": "Bad.", "source": {"pointer": "/data"}},
        ]
    }
    assert error_details(httpx.Response(400, json=body)) == [
        "value: This field may not be blank.",
        "Bad.",
    ]
    assert error_details(httpx.Response(404, text="<html>nope</html>")) is None
    assert error_details(httpx.Response(400, json={"errors": []})) is None
    assert error_details(httpx.Response(400, json=["x"])) is None
