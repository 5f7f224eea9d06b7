"""[clock] options for implausible timestamps (issue 12): defaults, bounds, and the check against
step_threshold_s, through the same loader as every config file."""

from __future__ import annotations

import pytest

from gateway.clock import Clock
from gateway.config import ClockConfig, load_config_text
from gateway.errors import ConfigError

BASE = "[store]\npath = '/tmp/x.db'\n[clock]\n"


def problems(clock_section: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_text(BASE + clock_section)
    return info.value.problems


def test_defaults_are_a_day_ahead_and_a_year_behind() -> None:
    cfg = load_config_text(BASE).settings.clock
    assert (cfg.max_future_s, cfg.max_age_days) == (86_400.0, 365.0)
    assert (ClockConfig().max_future_s, ClockConfig().max_age_days) == (86_400.0, 365.0)
    status = Clock(cfg).status()
    assert (status["max_future_s"], status["max_age_days"]) == (86_400.0, 365.0)
    assert status["rejected_timestamps"] == {"future": 0, "past": 0}
    assert status["last_rejected_timestamp"] is None


def test_values_in_range_load() -> None:
    cfg = load_config_text(BASE + "max_future_s = 60\nmax_age_days = 7\n").settings.clock
    assert (cfg.max_future_s, cfg.max_age_days) == (60, 7)
    cfg = load_config_text(BASE + "max_future_s = 315360000\nmax_age_days = 36500\n").settings.clock
    assert (cfg.max_future_s, cfg.max_age_days) == (3650 * 86_400, 36_500)


@pytest.mark.parametrize(
    ("line", "key", "message"),
    [
        ("max_future_s = 59", "clock.max_future_s", "greater than or equal to 60"),
        ("max_future_s = 315360001", "clock.max_future_s", "less than or equal to 315360000"),
        ("max_future_s = 'a day'", "clock.max_future_s", "number"),
        # A week at least: a logger replaying days of memory must never be refused by a slip.
        ("max_age_days = 6.9", "clock.max_age_days", "greater than or equal to 7"),
        ("max_age_days = 36501", "clock.max_age_days", "less than or equal to 36500"),
    ],
)
def test_values_out_of_range_are_errors_naming_the_key(line: str, key: str, message: str) -> None:
    [(where, what)] = problems(line + "\n")
    assert where.startswith(key + " (line 4)")
    assert message in what


def test_the_future_bound_must_exceed_the_step_threshold() -> None:
    # An unseen step back (below the threshold) leaves the gateway's own stamps that much ahead.
    [(where, what)] = problems("step_threshold_s = 600\nmax_future_s = 600\n")
    assert where.startswith("clock")
    assert what == "max_future_s must be larger than step_threshold_s"
    cfg = load_config_text(BASE + "step_threshold_s = 600\nmax_future_s = 601\n").settings.clock
    assert cfg.max_future_s == 601


def test_the_environment_overrides_the_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDGATE_CLOCK__MAX_FUTURE_S", "7200")
    monkeypatch.setenv("FIELDGATE_CLOCK__MAX_AGE_DAYS", "30")
    cfg = load_config_text(BASE).settings.clock
    assert (cfg.max_future_s, cfg.max_age_days) == (7200, 30)
