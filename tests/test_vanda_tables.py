"""Vanda: the document's tables in config validation, rounding, time formats, answer reading."""

from __future__ import annotations

import math
import tomllib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.configbase import Secret
from gateway.models import StoredReading
from gateway.uplinks.base import Outcome
from gateway.uplinks.vanda.answer import read_answer
from gateway.uplinks.vanda.config import VandaConfig, VandaRoute
from gateway.uplinks.vanda.tables import (
    EXAMINATION_TYPES,
    ExaminationType,
    compare_tables,
    format_minute,
    parse_examination_types,
    parse_time,
    round_result,
)
from gateway.uplinks.vanda.uplink import VandaUplink

SAMPLE = Path(__file__).resolve().parents[1] / "config" / "samples" / "vanda.toml"


def route(**kw: Any) -> dict[str, Any]:
    return {
        "series": "s",
        "station_id": "52000123",
        "measurement_point_number": 1,
        "examination_type_sc": 25,
        "reason_code_sc": 5,
        **kw,
    }


def config(*routes: dict[str, Any], **kw: Any) -> VandaConfig:
    return VandaConfig.model_validate(
        {
            "name": "vanda",
            "type": "vanda",
            "api_url": "https://vandah.example/api",
            "token_url": "https://login.example/runtime/oauth2/token.idp",
            "client_id": {"env": "X"},
            "client_secret": {"env": "Y"},
            "routes": list(routes) or [route()],
            **kw,
        }
    )


def errors(exc: pytest.ExceptionInfo[ValidationError]) -> str:
    return " | ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.value.errors())


# -- the examination / parameter / unit table ----------------------------------------------------


def test_the_table_is_the_documents() -> None:
    assert sorted(EXAMINATION_TYPES) == [21, 22, 24, 25, 27, 28, 29, 30, 31]
    level = EXAMINATION_TYPES[25]
    assert (
        level.parameter_sc,
        level.unit_sc,
        level.min,
        level.max,
        level.decimals,
        level.interval_min,
    ) == (1233, 19, -1500, 10000, 1, 5)
    assert EXAMINATION_TYPES[31].decimals == 3 and EXAMINATION_TYPES[29].interval_min == 60
    assert EXAMINATION_TYPES[27].min is None and EXAMINATION_TYPES[28].max is None


@pytest.mark.parametrize("exam", list(EXAMINATION_TYPES.values()), ids=lambda e: str(e.sc))
def test_every_row_validates_with_and_without_parameter_and_unit(exam: ExaminationType) -> None:
    bare = VandaRoute.model_validate(route(examination_type_sc=exam.sc))
    full = VandaRoute.model_validate(
        route(examination_type_sc=exam.sc, parameter_sc=exam.parameter_sc, unit_sc=exam.unit_sc)
    )
    assert bare.min_interval_s == full.min_interval_s == exam.interval_min * 60
    assert bare.examination is exam


@given(sc=st.sampled_from(sorted(EXAMINATION_TYPES)), other=st.integers(0, 5000))
def test_a_parameter_or_unit_of_another_row_is_refused(sc: int, other: int) -> None:
    exam = EXAMINATION_TYPES[sc]
    for field, right in (("parameter_sc", exam.parameter_sc), ("unit_sc", exam.unit_sc)):
        if other == right:
            continue
        with pytest.raises(ValidationError) as info:
            VandaRoute.model_validate(route(examination_type_sc=sc, **{field: other}))
        assert f"examination type {sc}" in errors(info) and field in errors(info)


def test_wrong_combinations_name_the_field_and_the_table() -> None:
    with pytest.raises(ValidationError) as info:
        config(route(unit_sc=63))  # metres for Water Level (25), which is in cm
    assert "routes.0.unit_sc" in errors(info) and "unit 19 (cm) only" in errors(info)
    with pytest.raises(ValidationError) as info:
        config(route(examination_type_sc=23))
    assert "unknown examination type 23" in errors(info)
    with pytest.raises(ValidationError) as info:
        config(route(reason_code_sc=18))
    assert "18 (Nyt fixpunkt)" in errors(info)
    with pytest.raises(ValidationError) as info:
        config(route(measurement_point_number=3))
    assert "measurement_point_number" in errors(info)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"min_interval_s": 0}, "below the minimum interval"),
        ({"min_interval_s": 299}, "below the minimum interval"),
        ({"min_interval_s": 330}, "whole minutes"),
        ({"examination_type_sc": 29, "min_interval_s": 600}, "60 minutes"),
        ({"station_id": None}, "exactly one of station_id"),
        ({"operator_station_id": "OP-1"}, "exactly one of station_id"),
    ],
)
def test_route_rules(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        VandaRoute.model_validate(route(**kw))
    assert needle in errors(info)


def test_interval_may_be_raised_in_whole_minutes() -> None:
    assert VandaRoute.model_validate(route(min_interval_s=900)).min_interval_s == 900


def test_two_routes_to_one_measurement_key_are_refused_unless_one_updates() -> None:
    with pytest.raises(ValidationError) as info:
        config(route(series="a"), route(series="b", logger_id="other"))
    assert "'a' and 'b' go to the same station" in errors(info)
    cfg = config(
        route(series="a"),
        route(series="b", mode="update"),
        route(series="c", measurement_point_number=2),
    )
    assert len(cfg.routes) == 3


def test_batch_size_is_capped_at_the_documented_1000() -> None:
    assert config().batch_max_items == 1000
    with pytest.raises(ValidationError):
        config(batch_max_items=1001)


def test_the_sample_config_section_validates() -> None:
    data = tomllib.loads(SAMPLE.read_text(encoding="utf-8"))
    [section] = data["uplinks"]
    cfg = VandaConfig.model_validate(section)
    assert [r.min_interval_s for r in cfg.routes] == [900, 300, 300]
    assert cfg.routes[2].mode == "update"


# -- rounding --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "decimals", "want"),
    [
        (2.25, 1, 2.3),
        (2.675, 2, 2.68),
        (-2.25, 1, -2.3),
        (12.3456, 3, 12.346),
        (7, 1, 7.0),
        (-0.04, 1, 0.0),
        (10_000.05, 1, 10_000.1),
    ],
)
def test_rounding_is_half_away_from_zero(value: float, decimals: int, want: float) -> None:
    got = round_result(value, decimals)
    assert got == want and math.copysign(1, got) == math.copysign(1, want)


@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False), st.integers(0, 3))
def test_rounding_properties(value: float, decimals: int) -> None:
    got = round_result(value, decimals)
    assert abs(Decimal(repr(got)) - Decimal(repr(value))) <= Decimal(5).scaleb(-decimals - 1)
    assert round_result(got, decimals) == got  # idempotent
    assert round_result(-value, decimals) == -got or got == 0.0  # symmetric
    assert len(repr(got).partition(".")[2].rstrip("0")) <= decimals or "e" in repr(got)


def test_rounding_refuses_what_is_not_finite() -> None:
    for bad in (math.inf, math.nan, 1e300):
        with pytest.raises(ValueError):
            round_result(bad, 3)


# -- time ------------------------------------------------------------------------------------


def test_minute_format_is_rfc3339_without_seconds() -> None:
    ts = int(datetime(2023, 9, 21, 14, 34, 59, 999_000, tzinfo=UTC).timestamp() * 1000)
    assert format_minute(ts) == "2023-09-21T14:34Z"  # truncated, never rounded up
    assert format_minute(0) == "1970-01-01T00:00Z"


@given(st.integers(min_value=0, max_value=253_402_300_799_000))
def test_minute_format_round_trips_to_the_minute(ts: int) -> None:
    text = format_minute(ts)
    parsed = parse_time(text)
    assert not parsed.has_seconds and parsed.utc
    assert parsed.epoch_ms <= ts < parsed.epoch_ms + 60_000


def test_parse_time_tells_seconds_and_offsets() -> None:
    assert parse_time("2023-10-13T04:50:33.370Z").has_seconds
    assert parse_time("2023-10-13T04:50+00:00").utc
    assert not parse_time("2023-10-13T06:50+02:00").utc
    assert parse_time("2023-10-13T06:50+02:00").minute == parse_time("2023-10-13T04:50Z").minute
    late = parse_time("2023-10-13T04:50:31Z")
    assert late.nearest_minute == parse_time("2023-10-13T04:51Z").minute
    for bad in ("2023-10-13", "2023-10-13T25:00Z", "yesterday", "2023-10-13T04:50"):
        with pytest.raises(ValueError):
            parse_time(bad)


# -- local checks and request bodies -------------------------------------------------------


def uplink(**kw: Any) -> VandaUplink:
    routes = [
        route(series="level"),
        route(
            series="gw",
            examination_type_sc=31,
            reason_code_sc=17,
            station_id=None,
            operator_station_id="OP-9",
        ),
    ]
    return VandaUplink(config(*routes, **kw), Secret("id", "t"), Secret("secret", "t"))


def test_check_rounds_before_the_range_check() -> None:
    up = uplink()
    assert up.check(StoredReading(1, "level", 0, 10_000.04)) is None  # 10000.0
    assert "above the maximum" in (up.check(StoredReading(1, "level", 0, 10_000.05)) or "")
    assert "below the minimum -5" in (up.check(StoredReading(1, "gw", 0, -5.0006)) or "")
    assert "numeric" in (up.check(StoredReading(1, "gw", 0, True)) or "")
    assert "numeric" in (up.check(StoredReading(1, "gw", 0, "3.2")) or "")


def test_bodies_follow_the_document() -> None:
    up = uplink(transaction_based=True)
    t = int(datetime(2024, 5, 1, 12, 5, 42, tzinfo=UTC).timestamp() * 1000)
    body = up.body(up.routes["gw"], [StoredReading(1, "gw", t, 3.14159)])
    assert body == {
        "station": {"operatorStationId": "OP-9"},
        "measurementPointNumber": 1,
        "examinationTypeSc": 31,
        "parameterSc": 1233,
        "unitSc": 63,
        "transactionBased": True,
        "measurements": [
            {"measurementDateTime": "2024-05-01T12:05Z", "result": 3.142, "reasonCodeSc": 17}
        ],
    }
    fixed = VandaRoute.model_validate(route(series="fix", mode="update"))
    assert up.body(fixed, [StoredReading(2, "fix", t, 1.0)]) == {
        "station": {"id": "52000123"},
        "measurementPointNumber": 1,
        "examinationTypeSc": 25,
        "transactionBased": True,
        "results": [{"measurementDateTime": "2024-05-01T12:05Z", "result": 1.0, "reasonCodeSc": 5}],
    }
    assert up.group_key(StoredReading(1, "gw", t, 1.0)) != up.group_key(
        StoredReading(1, "level", t, 1.0)
    )


# -- answers ---------------------------------------------------------------------------------

BATCH = [StoredReading(i + 1, "level", i * 300_000, 1.0) for i in range(4)]


def ok(i: int, action: str = "created") -> dict[str, Any]:
    return {"timestamp": format_minute(BATCH[i].ts), "action": action}


def bad(i: int, is_success: bool | None = False, code: int = 4002) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "timestamp": format_minute(BATCH[i].ts),
        "errorCode": code,
        "errorMessage": "too  high",
    }
    if is_success is not None:
        entry["isSuccess"] = is_success
    return entry


def test_answer_per_item() -> None:
    r = read_answer(
        {"successful": [ok(0), ok(1, "ignored"), ok(3)], "failed": [bad(2)]},
        BATCH,
        transactional=False,
        name="v",
    )
    assert sorted(r.delivered) == [1, 2, 4] and r.rejected == {3: "Vanda errorCode 4002: too high"}
    assert r.failure is None


def test_transactional_answer_names_the_culprit_and_resends_the_rest() -> None:
    answer = {
        "successful": [],
        "failed": [bad(0, True, 0), bad(1), bad(2, True, 0), bad(3, True, 0)],
    }
    r = read_answer(answer, BATCH, transactional=True, name="v")
    assert r.rejected.keys() == {2} and not r.delivered
    assert r.failure is not None and r.failure.outcome is Outcome.TRANSIENT
    assert r.failure.retry_after == 0.0


def test_unidentified_failures_are_bisected() -> None:
    answer = {"successful": [], "failed": [bad(i, None) for i in range(4)]}
    r = read_answer(answer, BATCH, transactional=True, name="v")
    assert r.failure is not None and r.failure.outcome is Outcome.REJECTED
    # Timestamps that name no item of ours (e.g. the transaction time) while something failed:
    odd = {
        "successful": [{"timestamp": "2023-10-13T04:50:33.382Z", "action": "x"}],
        "failed": [{"timestamp": "2023-10-13T04:50:33.382Z", "errorCode": 1}],
    }
    r = read_answer(odd, BATCH, transactional=False, name="v")
    assert r.failure is not None and r.failure.outcome is Outcome.REJECTED


def test_unmatched_answer_without_failures_is_all_delivered() -> None:
    odd = {
        "successful": [{"timestamp": "2023-10-13T04:50:33.382Z", "action": "created"}],
        "failed": [],
    }
    assert sorted(read_answer(odd, BATCH, transactional=False, name="v").delivered) == [1, 2, 3, 4]


@pytest.mark.parametrize("answer", [None, [], {"other": 1}, {"successful": "yes"}])
def test_unreadable_answers_are_sent_again(answer: object) -> None:
    r = read_answer(answer, BATCH, transactional=False, name="v")
    assert r.failure is not None and r.failure.outcome is Outcome.TRANSIENT and not r.delivered


def test_items_left_out_are_sent_again() -> None:
    r = read_answer({"successful": [ok(0)], "failed": []}, BATCH, transactional=False, name="v")
    assert r.delivered == [1] and r.failure is not None
    assert r.failure.outcome is Outcome.TRANSIENT


# -- the machine-readable table --------------------------------------------------------------


def test_service_table_round_trips_and_compares() -> None:
    served = [t.to_json() for t in EXAMINATION_TYPES.values()]
    assert compare_tables(EXAMINATION_TYPES, parse_examination_types(served)) == []
    served[0] = {**served[0], "decimals": 2, "min": None}
    served[-1] = {**served[-1], "reasonCodesSc": [0, 18]}
    lines = compare_tables(EXAMINATION_TYPES, parse_examination_types(served[:-2] + served[-1:]))
    assert lines == [
        "examination type 21: min is unbounded at the service, -15 built in",
        "examination type 21: decimals is 2 at the service, 1 built in",
        "examination type 30: built in, but not offered by the service",
        f"examination type 31: reasonCodesSc at the service [0, 18], built in {list(range(18))}",
    ]
    with pytest.raises(ValueError, match=r"\[0\]"):
        parse_examination_types([{"examinationTypeSc": 25}])


def test_the_emulators_transcription_agrees_with_the_builtin_table() -> None:
    """Two transcriptions of the document (the uplink's and the emulator's, written apart) must
    describe the same table; the emulator imports nothing of the uplink's."""
    from gateway.sandbox import vanda_tables as emulator

    served = [t.to_json() for t in emulator.EXAMINATION_TYPES.values()]
    assert compare_tables(EXAMINATION_TYPES, parse_examination_types(served)) == []
    assert config().batch_max_items == emulator.MAX_MEASUREMENTS_PER_REQUEST
    for text in ("2023-09-21T14:34Z", "2023-10-13T04:50:33.370Z", "2024-02-29T23:59:31+00:00"):
        ours, theirs = parse_time(text), emulator.read_time(text)
        assert (theirs.minute_ms, theirs.nearest_minute_ms) == (ours.minute, ours.nearest_minute)
        assert emulator.minute_text(theirs.minute_ms) == format_minute(ours.minute)
    for value, decimals in ((2.25, 1), (2.675, 2), (-2.25, 1), (12.3456, 3), (-0.04, 1)):
        assert emulator.stored_result(value, decimals) == round_result(value, decimals)
