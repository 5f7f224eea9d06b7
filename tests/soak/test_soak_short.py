"""The soak, short: eight SIGKILLs against all five uplinks while the services fail at random.

The long version (>= 50 kills, RSS over time) is ``bench/soak.py``; both run
tests/soak/harness.py. Run alone with ``.venv/bin/python -m pytest tests/soak -s`` to see the
report.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import Soak
from .soakconfig import SoakPlan


@pytest.mark.slow
async def test_soak_kill_9_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    plan = SoakPlan(kills=8, seed=20240611, drain_every=4, kill_wait_s=8.0, drain_timeout_s=60)
    report = await Soak(tmp_path, plan, say=print).run()
    print(report.format())
    assert report.kills == plan.kills, report.format()
    assert not report.unexpected_exits, report.format()
    assert not report.drain_left, report.format()
    assert report.final_rc == 0, report.format()
    assert report.captured > 10_000, report.format()
    assert report.lost == 0, report.format()
    assert report.mismatched == 0, report.format()
    assert all(u.dead_letters == 0 and u.unexpected == 0 for u in report.uplinks), report.format()
    assert report.log_errors.get("store_moved_aside", 0) == 0, report.format()
