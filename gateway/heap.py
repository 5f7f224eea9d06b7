"""The cycle collector tuned for a daemon with a large, steady heap.

CPython's cycle collector runs a young-generation pass every 700 net new container objects and
a full pass over every tracked object as the old generations fill. At 25,000 readings a second
the hot path makes and drops tens of thousands of short-lived containers (leased rows, message
groups) and the heap holds about 150,000 long-lived ones (the config, per-series state): the
collector cost about 14 % of the gateway's CPU (bench/e2e.py, measured with gc.callbacks;
BENCHMARKS.md), nearly all of it finding nothing, since the hot path makes no cycles and its
objects are freed by reference counting as soon as they are dropped.

Two settings, both reversible and neither changing what is freed by reference counting:

* :func:`settle` moves every object alive once the gateway has started (its config, plugins,
  per-series tables) to the permanent generation (``gc.freeze``): full passes no longer walk
  them. Called at start-up and after each reload (``unfreeze`` first, so that what the reload
  dropped is collected once).
* A young generation of :data:`YOUNG` objects instead of 700: a lease's rows are usually freed
  before a pass sees them.
"""

from __future__ import annotations

import gc

#: Net new container objects between two young-generation passes (CPython's default: 700).
YOUNG = 20_000


def settle() -> None:
    """Collect once, then keep what is alive now out of every later pass."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _, mid, old = gc.get_threshold()
    gc.set_threshold(YOUNG, mid, old)
