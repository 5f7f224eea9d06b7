"""The retry schedules: capped, jittered, a short cap while a service cannot be reached.

Delays are the values the schedule chooses (no clock is read): bounds, escalation and reset.
"""

from __future__ import annotations

import pytest

from gateway.backoff import Backoff, RetrySchedule


def test_backoff_doubles_with_equal_jitter_up_to_its_cap() -> None:
    b = Backoff(1.0, 8.0, seed=1)
    delays = [b.next() for _ in range(8)]
    for n, d in enumerate(delays):
        step = min(8.0, 2.0**n)
        assert step / 2 <= d <= step
    b.reset()
    assert 0.5 <= b.next() <= 1.0
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


def test_unreachable_stays_under_the_short_cap_and_never_below_its_floor() -> None:
    s = RetrySchedule(1.0, 120.0, 5.0, seed=7)
    delays = [s.next(unreachable=True) for _ in range(200)]
    assert max(delays) <= 5.0
    assert min(delays) >= 0.5  # half of the first step: never a busy loop
    assert delays[0] <= 1.0 and delays[2] >= 2.0  # it doubles up to the cap (1, 2, 4, 5, 5...)
    # Jitter: at the cap the delays spread between half and all of it.
    capped = delays[10:]
    assert min(capped) >= 2.5 and max(capped) - min(capped) > 1.0


def test_refusals_escalate_to_the_long_cap_independently() -> None:
    s = RetrySchedule(1.0, 120.0, 5.0, seed=3)
    for _ in range(5):
        assert s.next(unreachable=True) <= 5.0
    refused = [s.next(unreachable=False) for _ in range(12)]
    # The refusal schedule starts at its own first step (the unreachable failures before it
    # did not advance it) and goes far past the short cap.
    assert refused[0] <= 1.0
    assert max(refused) > 60.0 and all(d <= 120.0 for d in refused)
    # A link going down again after refusals is again retried within the short cap.
    assert s.next(unreachable=True) <= 5.0
    s.reset()
    assert s.next(unreachable=False) <= 1.0 and s.next(unreachable=True) <= 1.0


def test_the_short_cap_never_exceeds_the_long_one_and_starts_no_later() -> None:
    # backoff_max_s below reconnect_max_s: the long cap bounds both.
    s = RetrySchedule(0.05, 0.2, 5.0)
    assert max(s.next(unreachable=True) for _ in range(20)) <= 0.2
    # backoff_initial_s above the short cap: the short schedule starts at the cap.
    s = RetrySchedule(10.0, 60.0, 2.0)
    assert all(1.0 <= s.next(unreachable=True) <= 2.0 for _ in range(20))
    assert s.next(unreachable=False) >= 5.0
