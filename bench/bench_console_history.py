"""Memory of the web console's in-memory history at its caps (issue 16: +3 MiB RSS at most).

Fills :class:`gateway.console.history.History` to its bounds: 360 samples of 5 uplinks and 50
sources, and the per-series log at MAX_SERIES series with RECENT values each (600 series offered),
then prints the Python heap it holds (tracemalloc) and the size of one /history answer.

    .venv/bin/python bench/bench_console_history.py
"""

from __future__ import annotations

import json
import time
import tracemalloc

from gateway.console.history import MAX_SERIES, POINTS, RECENT, History
from gateway.models import Reading


def main() -> None:
    tracemalloc.start()
    h = History()
    base = tracemalloc.get_traced_memory()[0]
    uplinks = {f"uplink{i}": {"backlog": 123_456, "delivered": 9_876_543} for i in range(5)}
    sources = {f"source{i}": {"readings": 1_234_567} for i in range(50)}
    status = {"uplinks": uplinks, "sources": sources}
    t = time.time()
    for k in range(POINTS):
        for u in uplinks.values():
            u["delivered"] += 1000 + k
        for s in sources.values():
            s["readings"] += 100 + k
        h.record(t + 10 * k, status)
    for k in range(RECENT):
        batch = [Reading(f"dev{j}.field", int((t + k) * 1000), k + j / 7) for j in range(600)]
        h.series.note("source0", batch)
    held = tracemalloc.get_traced_memory()[0] - base
    answer = len(json.dumps(h.as_dict()))
    print(
        f"history at its caps ({POINTS} samples x 5 uplinks + 50 sources; {MAX_SERIES} series x "
        f"{RECENT} values): {held / 2**20:.2f} MiB held; "
        f"one /history answer {answer / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
