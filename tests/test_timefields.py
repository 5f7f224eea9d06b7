"""/status times: ISO 8601 UTC text under the name, the number under ``_epoch`` (issue 16)."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.timefields import iso_utc, with_iso_times


def test_every_time_field_gets_text_and_its_number() -> None:
    t = 1796357045.38
    st = {
        "started_at": t,
        "uptime_s": 12.5,
        "sources": {"a": {"last_ok": t, "last_error_at": None, "readings": 3}},
        "store": {"events": [{"at": t, "kind": "moved_aside"}], "last_commit_at": t},
        "clock": {"wall_time": t, "last_step_s": -3.0, "synchronized": True},
        "flag_at": True,
        "text_at": "2026-01-01T00:00:00.000Z",
    }
    out = with_iso_times(st)
    assert out["started_at"] == "2026-12-04T04:04:05.380Z"
    assert out["started_at_epoch"] == t
    assert datetime.fromisoformat(out["started_at"]) == datetime.fromtimestamp(t, UTC).replace(
        microsecond=380000
    )
    assert out["uptime_s"] == 12.5 and "uptime_s_epoch" not in out
    assert out["sources"]["a"] == {
        "last_ok": iso_utc(t),
        "last_ok_epoch": t,
        "last_error_at": None,
        "last_error_at_epoch": None,
        "readings": 3,
    }
    assert out["store"]["events"][0] == {"at": iso_utc(t), "at_epoch": t, "kind": "moved_aside"}
    assert out["clock"]["wall_time_epoch"] == t and out["clock"]["last_step_s"] == -3.0
    assert out["flag_at"] is True and "flag_at_epoch" not in out  # not a time
    assert out["text_at"] == st["text_at"] and "text_at_epoch" not in out
    assert st["started_at"] == t  # the input is not changed
    assert with_iso_times(out) == out  # idempotent
