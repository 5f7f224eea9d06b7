"""What was captured, what each service holds, and the soak's report.

**Captured** comes from the store itself: before the first start the soak adds a table and an
``AFTER INSERT`` trigger on ``readings`` (:func:`prepare_store`). The trigger's row is written in
the same transaction as the reading, so a reading is in ``soak_captured`` exactly when its group
commit committed: the gateway's own definition of captured. The log is never pruned, so unlike a
"witness" uplink that never delivers (tests/integration/test_daemon.py) it leaves the store's
normal life intact: readings are deleted once every uplink is done with them, the store can run
empty, and a restart on an empty store is part of what the soak exercises.

**Delivered**, per uplink, is read from the stand-in after each service's documented
transformation: Qatium rows, Energydata MQTT messages (multi- and single-value) plus batch-import
values, Datacooee uploads per reading; NILU and Vanda get one value per aligned window (the
route's ``min_interval_s``), so they are verified per window: the packet or measurement of that
window must exist and carry the window's ``last`` reading.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.configbase import StoreConfig
from gateway.store import Store
from gateway.uplinks.datacooee.uplink import iso_ms
from gateway.uplinks.qatium.uplink import iso_time
from gateway.uplinks.vanda.tables import EXAMINATION_TYPES, format_minute, round_result

from .soakconfig import LOGGER_SLOT_S, VANDA_EXAMINATION, SoakPlan
from .stand import Stand

CAPTURE_SQL = """
CREATE TABLE IF NOT EXISTS soak_captured (
    rid INTEGER NOT NULL, series INTEGER NOT NULL, ts INTEGER NOT NULL, value
);
CREATE TRIGGER IF NOT EXISTS soak_capture AFTER INSERT ON readings BEGIN
    INSERT INTO soak_captured (rid, series, ts, value) VALUES (NEW.id, NEW.series, NEW.ts,
                                                              NEW.value);
END;
"""


async def prepare_store(db: Path, routes: Mapping[str, Iterable[str]]) -> None:
    """Create the store as the gateway would (schema, one cursor per uplink), then add the
    capture log. Its cursors start at id 0, so every later reading is pending for them."""
    store = await Store.open(StoreConfig(path=db), routes)
    await store.aclose()
    with sqlite3.connect(db) as conn:
        conn.executescript(CAPTURE_SQL)
    conn.close()


@dataclass(frozen=True, slots=True)
class Captured:
    """Every captured reading: (series, ts) -> (value, id); ``twice`` counts (series, ts) pairs
    committed more than once (a source handing the same reading over again)."""

    readings: dict[tuple[str, int], tuple[Any, int]]
    twice: int
    per_series: Counter[str]


def read_captured(db: Path) -> Captured:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT s.name, c.ts, c.value, c.rid FROM soak_captured c "
            "JOIN series s ON s.id = c.series ORDER BY c.rowid"
        ).fetchall()
    finally:
        conn.close()
    out: dict[tuple[str, int], tuple[Any, int]] = {}
    twice = 0
    per_series: Counter[str] = Counter()
    for name, ts, value, rid in rows:
        key = (str(name), int(ts))
        if key in out:
            twice += 1
        out[key] = (value, int(rid))
        per_series[key[0]] += 1
    return Captured(out, twice, per_series)


def dead_letters(db: Path) -> dict[str, tuple[int, str]]:
    """uplink -> (count, one reason)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT uplink, count(*), min(reason) FROM dead_letters GROUP BY uplink"
        ).fetchall()
    finally:
        conn.close()
    return {str(u): (int(n), str(r)) for u, n, r in rows}


@dataclass(slots=True)
class UplinkResult:
    """One uplink's verdict. ``expected``: captured readings routed to it (windows for NILU and
    Vanda); ``lost``: expected and never delivered; ``duplicates``: deliveries beyond the first;
    ``mismatched``: delivered with another value than captured; ``unexpected``: delivered but
    never captured."""

    name: str
    unit: str
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    mismatched: int = 0
    unexpected: int = 0
    dead_letters: int = 0
    dead_letter_reason: str = ""
    lost_examples: list[str] = field(default_factory=list)
    mismatch_examples: list[str] = field(default_factory=list)


def _compare(
    result: UplinkResult,
    want: Mapping[Any, Any],
    got: Mapping[Any, Any],
    deliveries: int,
    *,
    exact: bool = True,
) -> UplinkResult:
    result.expected = len(want)
    result.delivered = sum(1 for k in want if k in got)
    result.duplicates = deliveries - len(got)
    for key, value in want.items():
        if key not in got:
            result.lost += 1
            if len(result.lost_examples) < 5:
                result.lost_examples.append(repr(key))
        elif exact and got[key] != value:
            result.mismatched += 1
            if len(result.mismatch_examples) < 5:
                result.mismatch_examples.append(f"{key!r}: sent {got[key]!r}, captured {value!r}")
    result.unexpected = sum(1 for k in got if k not in want)
    return result


def _last_per_window(
    captured: Captured, series: Iterable[str], width_ms: int
) -> dict[tuple[str, int], Any]:
    """(series, window start ms) -> the value of the window's last reading (ts, then id)."""
    wanted = set(series)
    best: dict[tuple[str, int], tuple[int, int, Any]] = {}
    for (name, ts), (value, rid) in captured.readings.items():
        if name not in wanted:
            continue
        key = (name, ts - ts % width_ms)
        cur = best.get(key)
        if cur is None or (ts, rid) > cur[:2]:
            best[key] = (ts, rid, value)
    return {k: v[2] for k, v in best.items()}


def verify(plan: SoakPlan, stand: Stand, captured: Captured, db: Path) -> list[UplinkResult]:
    dead = dead_letters(db)
    results = [
        _qatium(plan, stand, captured),
        _energydata(plan, stand, captured),
        _nilu(plan, stand, captured),
        _vanda(plan, stand, captured),
        _datacooee(plan, stand, captured),
    ]
    for r in results:
        r.dead_letters, r.dead_letter_reason = dead.get(r.name, (0, ""))
    return results


def _qatium(plan: SoakPlan, stand: Stand, captured: Captured) -> UplinkResult:
    routed = set(plan.routes()["qatium"])
    want = {(s, iso_time(ts)): v for (s, ts), (v, _) in captured.readings.items() if s in routed}
    got: dict[tuple[str, str], Any] = {}
    for row in stand.qatium.rows:  # the asset id is the series name (soakconfig)
        got[(str(row["asset"]), str(row["time"]))] = row["value"]
    return _compare(UplinkResult("qatium", "readings"), want, got, len(stand.qatium.rows))


def _energydata(plan: SoakPlan, stand: Stand, captured: Captured) -> UplinkResult:
    routes = plan.energydata_routes()
    want = {(s, ts): v for (s, ts), (v, _) in captured.readings.items() if s in routes}
    got: dict[tuple[str, int], Any] = {}
    deliveries = 0
    for topic, payload in stand.broker.stored:
        msg = json.loads(payload)
        ts = int(msg["timestamp"])
        if "/" in topic:  # single-value: the topic names the datastream (suffix = series)
            got[(topic.split("/", 1)[1], ts)] = msg["value"]
            deliveries += 1
        else:  # multi-value on the dataset prefix
            for suffix, value in msg["value"].items():
                got[(suffix, ts)] = value
                deliveries += 1
    by_stream = {ds_id: s for s, (_, ds_id) in routes.items()}
    for ds_id, values in stand.importer.values.items():
        for ms, value in values.items():
            got[(by_stream[ds_id], ms)] = value
    deliveries += stand.importer.ingested
    return _compare(UplinkResult("energydata", "readings"), want, got, deliveries)


def _nilu(plan: SoakPlan, stand: Stand, captured: Captured) -> UplinkResult:
    routes = plan.nilu_routes()
    width = plan.nilu_resolution_s * 1000
    want: dict[tuple[int, int, str], Any] = {}
    for (series, start), value in _last_per_window(captured, routes, width).items():
        sensor, param = routes[series]
        want[(sensor, start // 1000, param)] = value
    got: dict[tuple[int, int, str], Any] = {}
    for packet in stand.nilu.packets:
        for param, value in packet.values.items():
            got[(packet.sensor, packet.timestamp, param)] = value
    result = _compare(UplinkResult("nilu", "windows x parameters"), want, got, len(got))
    # An identical re-send is answered 200 and not stored again: the emulator counts packets.
    result.duplicates = stand.nilu.duplicates
    return result


def _vanda(plan: SoakPlan, stand: Stand, captured: Captured) -> UplinkResult:
    routes = plan.vanda_routes()
    decimals = EXAMINATION_TYPES[VANDA_EXAMINATION].decimals
    want: dict[tuple[int, str], Any] = {}
    for (series, start), value in _last_per_window(captured, routes, LOGGER_SLOT_S * 1000).items():
        want[(routes[series], format_minute(start))] = round_result(value, decimals)
    got = {
        (m.measurement_point_number, m.measurement_date_time): m.result
        for m in stand.vanda.measurements
    }
    deliveries = len(got) + stand.vanda.actions["ignored"]
    return _compare(UplinkResult("vanda", "windows"), want, got, deliveries)


def _datacooee(plan: SoakPlan, stand: Stand, captured: Captured) -> UplinkResult:
    routes = plan.datacooee_routes()
    want = {
        (routes[s], iso_ms(ts)): float(v)
        for (s, ts), (v, _) in captured.readings.items()
        if s in routes
    }
    got = {(r.input_pk, r.timestamp): float(r.value) for r in stand.datacooee.accepted}
    return _compare(UplinkResult("datacooee", "readings"), want, got, len(stand.datacooee.accepted))
