"""Energydata.dk: message and CSV building, config rules, the split between MQTT and import."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.models import StoredReading
from gateway.sandbox.energydata_broker import (
    encode_packet,
    parse_connect,
    parse_publish,
    topic_matches,
)
from gateway.sandbox.energydata_import import Datastream, parse_ts, validate_csv
from gateway.uplinks.base import Failure, Outcome, SendResult
from gateway.uplinks.energydata.config import MULTI_MAX_VALUES, EnergydataConfig
from gateway.uplinks.energydata.csvimport import build_csv, csv_time, map_errors
from gateway.uplinks.energydata.messages import build_messages, merge_results, value_problem
from gateway.uplinks.energydata.uplink import EnergydataUplink

ROUTES = [
    {"series": "t1", "dataset": "site", "suffix": "temp/1", "datastream": 101},
    {"series": "t2", "dataset": "site", "suffix": "temp/2", "datastream": 102},
    {"series": "n", "dataset": "site", "suffix": "count", "datatype": "integer"},
    {"series": "s", "dataset": "site", "suffix": "state", "datatype": "string"},
    {"series": "p", "dataset": "pump", "suffix": "power", "datastream": 201},
]


def config(**kw: object) -> EnergydataConfig:
    data: dict[str, object] = {
        "name": "edk",
        "type": "energydata",
        "token": {"env": "UNUSED"},
        "datasets": [
            {"name": "site", "prefix": "my-topic-prefix"},
            {"name": "pump", "prefix": "pump7", "messages": "single"},
        ],
        "routes": ROUTES,
        **kw,
    }
    return EnergydataConfig.model_validate(data)


def uplink(**kw: object) -> EnergydataUplink:
    from gateway.configbase import Secret

    return EnergydataUplink(config(**kw), Secret("tok", "test"))


def messages(batch: list[StoredReading], **kw: object) -> list[tuple[str, object]]:
    up = uplink(**kw)
    out = build_messages(batch, up.routes, {d.name: d for d in up.cfg.datasets})
    assert sorted(i for m in out for i in m.ids) == sorted(r.id for r in batch)
    return [(m.topic, json.loads(m.payload)) for m in out]


def test_readings_sharing_a_timestamp_become_one_multi_value_message() -> None:
    t = 1521797973469
    batch = [
        StoredReading(1, "t1", t, 14.47),
        StoredReading(2, "t2", t, 34),
        StoredReading(3, "n", t, 4.0),
        StoredReading(4, "t1", 1521797974000, 1.5),
    ]
    assert messages(batch) == [
        (
            "my-topic-prefix",
            {"timestamp": 1521797973469, "value": {"temp/1": 14.47, "temp/2": 34, "count": 4}},
        ),
        ("my-topic-prefix/temp/1", {"timestamp": 1521797974000, "value": 1.5}),
    ]


def test_single_value_datasets_and_value_types() -> None:
    batch = [
        StoredReading(1, "p", 1000, True),
        StoredReading(2, "p", 1000, 2.5),
        StoredReading(3, "s", 1000, "on"),
        StoredReading(4, "s", 2000, False),
    ]
    assert messages(batch) == [
        ("pump7/power", {"timestamp": 1000, "value": 1}),
        ("pump7/power", {"timestamp": 1000, "value": 2.5}),
        ("my-topic-prefix/state", {"timestamp": 1000, "value": "on"}),
        ("my-topic-prefix/state", {"timestamp": 2000, "value": "false"}),
    ]


def test_single_mode_for_a_multi_dataset() -> None:
    batch = [StoredReading(1, "t1", 1000, 1.0), StoredReading(2, "t2", 1000, 2.0)]
    out = messages(
        batch,
        datasets=[
            {"name": "site", "prefix": "x", "messages": "single"},
            {"name": "pump", "prefix": "pump7"},
        ],
    )
    assert out == [
        ("x/temp/1", {"timestamp": 1000, "value": 1.0}),
        ("x/temp/2", {"timestamp": 1000, "value": 2.0}),
    ]


def test_a_duplicate_reading_goes_in_a_second_message_never_a_repeated_key() -> None:
    batch = [
        StoredReading(1, "t1", 1000, 1.0),
        StoredReading(2, "t1", 1000, 2.0),
        StoredReading(3, "t2", 1000, 3.0),
    ]
    assert messages(batch) == [
        ("my-topic-prefix", {"timestamp": 1000, "value": {"temp/1": 1.0, "temp/2": 3.0}}),
        ("my-topic-prefix/temp/1", {"timestamp": 1000, "value": 2.0}),
    ]


def test_multi_value_messages_are_capped() -> None:
    routes = [{"series": f"v{i}", "dataset": "site", "suffix": f"v/{i}"} for i in range(600)]
    batch = [StoredReading(i + 1, f"v{i}", 5000, float(i)) for i in range(600)]
    out = messages(batch, routes=routes)
    sizes = [len(p["value"]) for _, p in out]  # type: ignore[index]
    assert sizes == [MULTI_MAX_VALUES, MULTI_MAX_VALUES, 100]
    # In order: the first message holds the first readings.
    assert list(out[0][1]["value"])[:2] == ["v/0", "v/1"]  # type: ignore[index]
    # The cap is the uplink's multi_max_values; a last single value goes single-value.
    up = uplink(routes=routes, multi_max_values=299)
    got = build_messages(
        batch, up.routes, {d.name: d for d in up.cfg.datasets}, max_values=up.cfg.multi_max_values
    )
    assert [len(m.ids) for m in got] == [299, 299, 2]
    got = build_messages(
        batch[:300],
        up.routes,
        {d.name: d for d in up.cfg.datasets},
        max_values=up.cfg.multi_max_values,
    )
    assert [m.topic for m in got] == ["my-topic-prefix", "my-topic-prefix/v/299"]


@pytest.mark.parametrize(
    ("value", "datatype", "problem"),
    [
        (1.5, "double", None),
        (3, "integer", None),
        (3.0, "integer", None),
        (True, "integer", None),
        (3.5, "integer", "integer"),
        ("x", "double", "text"),
        (float("nan"), "double", "finite"),
        (float("inf"), "string", "finite"),
        ("anything", "string", None),
    ],
)
def test_value_checks(value: object, datatype: str, problem: str | None) -> None:
    got = value_problem(value, datatype)  # type: ignore[arg-type]
    assert (got is None) if problem is None else (got is not None and problem in got)


def test_config_cross_checks_name_the_problem() -> None:
    with pytest.raises(ValidationError, match="no dataset named 'nope'"):
        config(routes=[{"series": "a", "dataset": "nope", "suffix": "x"}])
    with pytest.raises(ValidationError, match="both publish to topic 'my-topic-prefix/x'"):
        config(
            routes=[
                {"series": "a", "dataset": "site", "suffix": "x"},
                {"series": "b", "dataset": "site", "suffix": "x"},
            ]
        )
    with pytest.raises(ValidationError, match="share datastream 5"):
        config(
            routes=[
                {"series": "a", "dataset": "site", "suffix": "x", "datastream": 5},
                {"series": "b", "dataset": "site", "suffix": "y", "datastream": 5},
            ]
        )
    with pytest.raises(ValidationError, match="suffix"):
        config(routes=[{"series": "a", "dataset": "site", "suffix": "bad/#"}])
    with pytest.raises(ValidationError, match="timeout_s must be at least"):
        config(backfill={"max_wait_s": 3000}, timeout_s=600)


def test_defaults_keep_the_window_full_and_tls_on() -> None:
    cfg = config()
    assert cfg.tls and cfg.resolved_port() == 8883 and cfg.window == 100
    assert cfg.rate_limit_requests == 0 and cfg.concurrency >= 2
    assert config(tls=False).resolved_port() == 1883
    cid = cfg.resolved_client_id()
    assert cid == config().resolved_client_id() and len(cid) <= 23 and cid.isalnum()
    assert config(name="other").resolved_client_id() != cid


# -- the split between MQTT and the batch import ---------------------------------------------

NOW = 1_700_000_000_000
HOUR = 3_600_000


def test_old_readings_go_by_import_new_and_text_by_mqtt() -> None:
    up = uplink(backfill={"older_than_s": 3600, "min_readings": 3, "larger_than": 1000})
    old = [StoredReading(i, "t1", NOW - 2 * HOUR + i, 1.0) for i in range(1, 6)]
    text = [StoredReading(10, "s", NOW - 2 * HOUR, "on")]
    new = [StoredReading(20, "t1", NOW - 1000, 2.0), StoredReading(21, "t2", NOW - HOUR // 2, 3.0)]
    imp, live = up.split([*old, *text, *new], now_ms=NOW)
    assert [r.id for r in imp] == [1, 2, 3, 4, 5]
    assert [r.id for r in live] == [10, 20, 21]
    # Too few old readings for an import: all by MQTT.
    imp, live = up.split([*old[:2], *new], now_ms=NOW)
    assert imp == [] and len(live) == 4


def test_a_large_backlog_goes_by_import_except_the_live_part() -> None:
    up = uplink(
        backfill={"older_than_s": 86400, "larger_than": 10, "live_s": 60, "min_readings": 5}
    )
    recent = [StoredReading(i, "t1", NOW - 600_000 + i, 1.0) for i in range(1, 13)]
    live = [StoredReading(100, "t2", NOW - 1000, 1.0)]
    imp, rest = up.split([*recent, *live], now_ms=NOW)
    assert len(imp) == 12 and [r.id for r in rest] == [100]
    assert up.split(recent[:9] + live, now_ms=NOW)[0] == []  # not larger than the threshold
    assert uplink().split(recent, now_ms=NOW) == ([], recent)  # no backfill configured


def test_merged_result_keeps_the_most_conservative_failure() -> None:
    ok = SendResult(delivered=[1, 2])
    rej = SendResult(rejected={3: "bad"}, failure=Failure(Outcome.REJECTED, "unidentified"))
    tr = SendResult.failed(Outcome.TRANSIENT, "lost")
    auth = SendResult(delivered=[4], failure=Failure(Outcome.AUTH, "topic"))
    merged = merge_results([ok, rej, tr])
    assert list(merged.delivered) == [1, 2] and dict(merged.rejected) == {3: "bad"}
    assert merged.failure is not None and merged.failure.outcome is Outcome.TRANSIENT
    assert merge_results([rej, auth]).failure.outcome is Outcome.AUTH  # type: ignore[union-attr]
    assert merge_results([ok, SendResult(delivered=[9])]).failure is None


# -- the import file -------------------------------------------------------------------------


def test_csv_is_exactly_the_documented_format() -> None:
    up = uplink()
    t = int(datetime(2021, 3, 10, 20, 24, 30, 139000, tzinfo=UTC).timestamp() * 1000)
    batch = [
        StoredReading(1, "t1", t, 23.4121),
        StoredReading(2, "n", t, -10),
        StoredReading(3, "t1", t + 1005, 999888777.121),
        StoredReading(4, "n", t + 1005, 0),
        StoredReading(5, "t2", t + 2022, -1.33e-16),
        StoredReading(6, "t1", t + 2022, True),
    ]
    f = build_csv(batch, dict(up.routes), {"t1": "101", "t2": "102", "n": "my-topic-prefix/count"})
    assert f.data.decode() == (
        ";101;my-topic-prefix/count;102\r\n"
        "2021-03-10T20:24:30.139Z;23.4121;-10;\r\n"
        "2021-03-10T20:24:31.144Z;999888777.121;0;\r\n"
        "2021-03-10T20:24:32.161Z;1;;-1.33e-16\r\n"
    )
    assert f.lines[4] == {"101": 6, "102": 5}
    assert csv_time(0) == "1970-01-01T00:00:00.000Z"


def test_validation_errors_map_to_the_offending_cells_only() -> None:
    up = uplink()
    batch = [
        StoredReading(1, "t1", 1000, 1.0),
        StoredReading(2, "t2", 1000, 2.0),
        StoredReading(3, "t1", 2000, 3.0),
    ]
    f = build_csv(batch, dict(up.routes), {"t1": "101", "t2": "102"})
    assert map_errors([{"line": 2, "column": "102", "message": "out of range"}], f) == {
        2: "import validation failed: out of range"
    }
    assert set(map_errors([{"line": 2, "column": None, "message": "bad row"}], f) or {}) == {1, 2}
    assert map_errors(["line 3: timestamp in the future"], f) == {
        3: "import validation failed: line 3: timestamp in the future"
    }
    assert map_errors([{"message": "file unreadable"}], f) is None
    assert map_errors([{"line": 9, "column": "101", "message": "?"}], f) is None


_values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(-(2**53), 2**53),
    st.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["t1", "t2", "p", "n"]), st.integers(0, 4_102_444_800_000), _values
        ),
        min_size=1,
        max_size=40,
    )
)
def test_built_csv_validates_and_round_trips(rows: list[tuple[str, int, object]]) -> None:
    """Whatever the readings, the emulator (the document's rules) reads back exactly them."""
    up = uplink()
    headers = {"t1": "101", "t2": "102", "p": "201", "n": "my-topic-prefix/count"}
    batch = []
    for i, (series, ts, raw) in enumerate(rows, start=1):
        value = raw
        if series == "n" and isinstance(raw, float):
            value = round(raw) if abs(raw) < 2**53 else 0
        batch.append(StoredReading(i, series, ts, value))  # type: ignore[arg-type]
    f = build_csv(batch, dict(up.routes), headers)
    streams = [
        Datastream(101, "my-topic-prefix/temp/1"),
        Datastream(102, "my-topic-prefix/temp/2"),
        Datastream(201, "pump7/power"),
        Datastream(7, "my-topic-prefix/count", "integer"),
    ]
    got, errors = validate_csv(f.data, streams)
    assert errors == []
    ids = {"t1": 101, "t2": 102, "p": 201, "n": 7}
    expected = [
        (ids[r.series], r.ts, float(r.value) if ids[r.series] != 7 else int(r.value)) for r in batch
    ]
    assert sorted(got, key=repr) == sorted(expected, key=repr)


def test_emulator_refuses_what_the_document_forbids() -> None:
    streams = [
        Datastream(1, "a/x", "integer"),
        Datastream(2, "a/y", "double"),
        Datastream(3, "a/s", "string"),
    ]
    data = (
        b";1;a/y;3\r\n"
        b"2021-03-10T20:24:30.139Z;1.5;2;hi\r\n"  # 1.5 on an integer stream
        b"2021-03-10T20:24:31Z;1;2;x\r\n"  # no milliseconds
        b"2021-03-10T20:24:32.000Z;1;2\r\n"  # a field missing
        b"2021-03-10T20:24:33.000Z;;abc;\r\n"  # not a double
        b"2021-03-10T20:24:34.000Z;;;\r\n"
    )  # empty: only "" for the string
    rows, errors = validate_csv(data, streams)
    assert [(e["line"], e["column"]) for e in errors] == [
        (2, "1"),
        (3, None),
        (4, None),
        (5, "a/y"),
    ]
    assert (3, parse_ts("2021-03-10T20:24:34.000Z"), "") in rows
    assert validate_csv(b";99\r\n", streams)[1][0]["message"] == "unknown datastream '99'"
    assert validate_csv(b"\xff\xfe", streams)[1][0]["line"] is None


# -- the broker front's MQTT parsing ---------------------------------------------------------


def test_topic_filters_and_packets() -> None:
    assert topic_matches("site/#", "site") and topic_matches("site/#", "site/a/b")
    assert topic_matches("site/+/x", "site/a/x") and not topic_matches("site/+", "site/a/b")
    assert not topic_matches("site", "site/a") and topic_matches("#", "anything/at/all")
    body = b"\x00\x04MQTT\x04\xc2\x00\x3c\x00\x03cid\x00\x03tok\x00\x01p"
    assert parse_connect(body) == ("cid", "tok")
    pub = parse_publish(0x32, b"\x00\x03a/b\x12\x34payload")
    assert (pub.topic, pub.pid, pub.payload) == ("a/b", 0x1234, b"payload")
    assert encode_packet(0x30, b"x" * 200)[:3] == bytes([0x30, 0xC8, 0x01])


def test_the_sample_config_section_loads() -> None:
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "config/samples/energydata.toml").read_text())
    [section] = data["uplinks"]
    cfg = EnergydataConfig.model_validate(section)
    assert cfg.backfill is not None and cfg.backfill.token is None
    assert [r.datastream for r in cfg.routes] == [19323, None, None]
    # The sample's pattern route names each meter's datastreams from the series.
    from gateway.configbase import Secret

    up = EnergydataUplink(cfg, Secret("tok", "test"))
    assert up.wire["meter12.voltage_l3"][::2] == ("my-topic-prefix", "meter/12/voltage_l3", None)
    assert up.wire.header("meter12.voltage_l3") == "my-topic-prefix/meter/12/voltage_l3"
    assert up.wire.header("well3.level") == "19323"
    assert "tank.level" not in up.routes
    assert cfg.token.credential == "energydata"


# A lease at a time (ChecksInBulk): the same answers as item by item, and the runner uses it.


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(
        st.tuples(
            st.sampled_from([r["series"] for r in ROUTES]),
            st.one_of(st.integers(-5, 5), st.integers(1_700_000_000_000, 1_800_000_000_000)),
            st.one_of(
                st.integers(-(2**70), 2**70),
                st.floats(allow_nan=True, allow_infinity=True),
                st.booleans(),
                st.text(max_size=5),
            ),
        ),
        max_size=30,
    )
)
def test_checking_and_sizing_a_lease_at_once_answers_as_item_by_item(
    items: list[tuple[str, int, object]],
) -> None:
    up = uplink()
    batch = [StoredReading(i + 1, s, ts, v) for i, (s, ts, v) in enumerate(items)]  # type: ignore[arg-type]
    one_by_one = {r.id: why for r in batch if (why := up.check(r)) is not None}
    assert up.check_all(batch) == one_by_one
    assert up.sizes(batch) == [up.item_size(r) for r in batch]
    assert up.group_keys(batch) is None and all(up.group_key(r) is None for r in batch)


def test_a_lease_of_plain_ints_passes_the_bulk_check_and_one_bad_item_is_named() -> None:
    up = uplink()
    batch = [StoredReading(i, "n", 1_800_000_000_000, i) for i in range(1, 6)]
    assert up.check_all(batch) == {}
    batch[2] = StoredReading(3, "n", 1_800_000_000_000, 2.5)
    assert up.check_all(batch) == {3: "datastream type is integer, got 2.5"}


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["t1", "t2", "n", "p", "s"]),
            st.sampled_from([1_800_000_000_000, 1_800_000_001_000]),
            st.one_of(st.integers(-(2**40), 2**40), st.floats(-1e3, 1e3), st.booleans()),
        ),
        max_size=40,
    ),
    max_values=st.integers(1, 5),
)
def test_messages_built_column_by_column_are_those_built_reading_by_reading(
    rows: list[tuple[str, int, object]], max_values: int
) -> None:
    from gateway.uplinks.energydata.messages import _build_columns, _build_loop

    up = uplink()
    wire = up._wire
    batch = [StoredReading(i + 1, s, ts, v) for i, (s, ts, v) in enumerate(rows)]  # type: ignore[arg-type]
    loop = _build_loop(batch, wire, max_values)
    columns = _build_columns(batch, wire, max_values)
    if columns is not None:
        assert columns == loop
    assert (
        build_messages(batch, up.routes, {d.name: d for d in up.cfg.datasets}, wire, max_values)
        == loop
    )


def test_a_poll_of_ints_goes_the_column_way() -> None:
    from gateway.uplinks.energydata.messages import _build_columns

    up = uplink()
    batch = [StoredReading(i, s, 1_800_000_000_000, i) for i, s in enumerate(["t1", "t2", "n"], 1)]
    got = _build_columns(batch, up._wire, 250)
    assert got is not None and [m.ids for m in got] == [(1, 2, 3)]
