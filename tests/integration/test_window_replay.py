"""A logger replaying hours of its memory at high speed: every downsampling window is closed by
its data, not by the wall clock (issue 13, first item).

A real ``fieldgate run`` reads a line logger through a socat pty; the logger (an in-process pty,
gateway/sandbox/serial_sim.py) writes six hours old one-per-minute records, stamped with its own
clock, in chunks as fast as the gateway takes them. Vanda (min_interval_s = 300: mean, min, max,
last, one station each) and NILU (two sensors, resolution 600 s and 300 s) must each receive, per
aligned window, exactly the aggregate of what was written into that window (computed here with
exact fractions from the lines' text), stamped with the window's start, and nothing may be
dead-lettered. Before the fix the first readings of each window in hand were sent alone as the
window's value (the window's end being long past on the wall clock) and the rest of the window
was dead-lettered as late.

Chunk boundaries fall inside windows; after each chunk the test waits until the emulators hold
every window that a later written reading has closed, so the gateway has really seen each window
arrive in pieces. One "closing" record in a later window follows the memory: it closes the
memory's last window, and its own window stays open (a reading of its series was captured within
the grace time), so it is not sent.
"""

from __future__ import annotations

import contextlib
import json
import random
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import httpx

from gateway.sandbox.nilu import NiluEmulator, SensorSchema
from gateway.sandbox.serial_sim import LineLoggerSim
from gateway.sandbox.vanda import VandaEmulator

from .daemon import DAEMON_HEAD, Daemon
from .test_sdi12_crc_del import socat_relay

CLIENT, SECRET, NILU_TOKEN = "replay-client", "replay-vanda-secret", "replay-nilu-token"
ENV = {
    "FG_REPLAY_VANDA_ID": CLIENT,
    "FG_REPLAY_VANDA_SECRET": SECRET,
    "FG_REPLAY_NILU_TOKEN": NILU_TOKEN,
}
#: The logger's clock: a fixed offset (no daylight saving change can fall into the data).
LOGGER_TZ = timedelta(hours=1)
MEMORY_MINUTES = 300  # five hours of one record per minute (a few minutes missing)
HOURS_AGO = 6


@dataclass(frozen=True)
class Target:
    """Where one column of the record goes and how its windows are aggregated."""

    column: str
    mode: str  # mean | min | max | last
    width_s: int
    uplink: str  # "vanda" or "nilu"
    key: str | int  # Vanda station id, or NILU sensor id
    parameter: str = ""  # NILU parameter


TARGETS = [
    Target("vmean", "mean", 300, "vanda", "52000101"),
    Target("vmin", "min", 300, "vanda", "52000102"),
    Target("vmax", "max", 300, "vanda", "52000103"),
    Target("vlast", "last", 300, "vanda", "52000104"),
    Target("nmean", "mean", 600, "nilu", 601, "level"),
    Target("nmax", "max", 600, "nilu", 601, "gust"),
    Target("nmin", "min", 300, "nilu", 602, "temp"),
]
COLUMNS = ["time", *(t.column for t in TARGETS)]
NILU_RESOLUTION = {601: 600, 602: 300}

CONFIG = (
    DAEMON_HEAD
    + """
[[sources]]
name = "river"
type = "serial_lines"
port = "{tty}"
baudrate = 115200
reconnect_min_s = 0.05
reconnect_max_s = 0.2
series_prefix = "river."
  [sources.parser]
  kind = "delimited"
  columns = {columns}
  [sources.timestamp]
  field = "time"
  format = "%Y-%m-%d %H:%M:%S"
  timezone = "+01:00"

[[uplinks]]
name = "vanda"
type = "vanda"
api_url = "{vanda}/api"
token_url = "{vanda}/runtime/oauth2/token.idp"
client_id = {{ env = "FG_REPLAY_VANDA_ID" }}
client_secret = {{ env = "FG_REPLAY_VANDA_SECRET" }}
rate_limit_requests = 0
backoff_initial_s = 0.05
backoff_max_s = 0.5
timeout_s = 5
{vanda_routes}
[[uplinks]]
name = "nilu"
type = "nilu"
url = "{nilu}"
token = {{ env = "FG_REPLAY_NILU_TOKEN" }}
rate_limit_requests = 0
backoff_initial_s = 0.05
backoff_max_s = 0.5
timeout_s = 5
{nilu_sensors}{nilu_routes}"""
)


def write_config(tmp: Path, tty: Path, vanda: str, nilu: str) -> Path:
    vanda_routes = "".join(
        f"""  [[uplinks.routes]]
  series = "river.{t.column}"
  station_id = "{t.key}"
  measurement_point_number = 1
  examination_type_sc = 25
  reason_code_sc = 5
  min_interval_s = {t.width_s}
  downsample = "{t.mode}"
"""
        for t in TARGETS
        if t.uplink == "vanda"
    )
    nilu_sensors = "".join(
        f"""  [[uplinks.sensors]]
  id = {sid}
  resolution_s = {res}
  timestamp_field = "t"
"""
        for sid, res in NILU_RESOLUTION.items()
    )
    # No min_interval_s: a NILU route's window is its sensor's resolution.
    nilu_routes = "".join(
        f"""  [[uplinks.routes]]
  series = "river.{t.column}"
  sensor = {t.key}
  parameter = "{t.parameter}"
  downsample = "{t.mode}"
"""
        for t in TARGETS
        if t.uplink == "nilu"
    )
    path = tmp / "fieldgate.toml"
    path.write_text(
        CONFIG.format(
            db=tmp / "fg.db",
            tty=tty,
            columns=json.dumps(COLUMNS),
            vanda=vanda,
            nilu=nilu,
            vanda_routes=vanda_routes,
            nilu_sensors=nilu_sensors,
            nilu_routes=nilu_routes,
        )
    )
    return path


# -- the logger's memory -------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    ts_ms: int  # UTC
    values: tuple[str, ...]  # as written, one per target

    def line(self) -> str:
        local = datetime.fromtimestamp(self.ts_ms / 1000, UTC) + LOGGER_TZ
        return ",".join([local.strftime("%Y-%m-%d %H:%M:%S"), *self.values])


def memory(seed: int = 13) -> tuple[list[Record], Record]:
    """Five hours of records six hours back (an hour boundary: aligned for 300 and 600 s
    windows), one a minute at a random second, some minutes missing; values move in quarter steps
    (exact in binary floating point). Then one closing record in the next window."""
    rng = random.Random(seed)
    t0 = (int(time.time()) // 3600 - HOURS_AGO) * 3600 * 1000
    level = [Fraction(rng.randrange(400, 800), 4) for _ in TARGETS]
    out: list[Record] = []
    for minute in range(MEMORY_MINUTES):
        if rng.random() < 0.08:
            continue  # the logger missed a minute
        level = [v + Fraction(rng.randrange(-12, 13), 4) for v in level]
        ts = t0 + minute * 60_000 + rng.randrange(60) * 1000
        out.append(Record(ts, tuple(f"{float(v):.2f}" for v in level)))
    closing = Record(t0 + MEMORY_MINUTES * 60_000 + 7_000, tuple("100.00" for _ in TARGETS))
    return out, closing


def windows(records: Iterable[Record], target: Target) -> dict[int, Fraction]:
    """Window start (ms) -> the window's aggregate, exactly, from the text written."""
    index = TARGETS.index(target)
    width = target.width_s * 1000
    members: dict[int, list[tuple[int, Fraction]]] = defaultdict(list)
    for r in records:
        members[r.ts_ms - r.ts_ms % width].append((r.ts_ms, Fraction(r.values[index])))
    out = {}
    for start, items in members.items():
        values = [v for _, v in sorted(items)]
        out[start] = {
            "mean": sum(values, Fraction(0)) / len(values),
            "min": min(values),
            "max": max(values),
            "last": values[-1],
        }[target.mode]
    return out


def half_away_from_zero(x: Fraction, decimals: int) -> float:
    """Vanda keeps results rounded half away from zero (Water Level: one decimal)."""
    scaled = abs(x) * 10**decimals
    whole = int(scaled + Fraction(1, 2))
    return float((1 if x >= 0 else -1) * Fraction(whole, 10**decimals))


def minute_text(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%MZ")


# -- what the services hold -----------------------------------------------------------------------


def received(vanda: VandaEmulator, nilu: NiluEmulator, target: Target) -> dict[Any, float]:
    """Window start as the service shows it -> value, for one target."""
    if target.uplink == "vanda":
        return {
            m.measurement_date_time: m.result for m in vanda.measurements if m.station == target.key
        }
    return {
        p.timestamp: p.values[target.parameter]
        for p in nilu.packets
        if p.sensor == target.key and target.parameter in p.values
    }


def expected(records: Iterable[Record], target: Target) -> dict[Any, float]:
    got = windows(records, target)
    if target.uplink == "vanda":
        return {minute_text(s): half_away_from_zero(v, 1) for s, v in got.items()}
    return {s // 1000: float(v) for s, v in got.items()}


def closed_windows(records: list[Record], target: Target) -> set[Any]:
    """The windows of ``records`` that a later record in them has closed, as the service keys
    them (all but the window of the last record)."""
    width = target.width_s * 1000
    last = records[-1].ts_ms - records[-1].ts_ms % width
    starts = {s for s in windows(records, target) if s < last}
    return (
        {minute_text(s) for s in starts}
        if target.uplink == "vanda"
        else {s // 1000 for s in starts}
    )


async def test_replayed_memory_is_aggregated_per_window_with_no_dead_letters(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    records, closing = memory()
    schemas = [
        SensorSchema(601, {"level": "double", "gust": "double"}, timestamp="t", resolution_s=600),
        SensorSchema(602, {"temp": "double"}, timestamp="t", resolution_s=300),
    ]
    async with (
        VandaEmulator({CLIENT: SECRET}) as vanda,
        NiluEmulator(schemas, NILU_TOKEN) as nilu,
        LineLoggerSim(tmp_path / "logger") as logger,
        socat_relay(tmp_path / "logger", tmp_path / "gw") as tty,
    ):
        d = Daemon(write_config(tmp_path, tty, vanda.url, nilu.url), env=ENV)
        daemons.append(d)
        await d.start()
        async with httpx.AsyncClient(base_url=await d.health_url()) as client:
            # Opening the port flushes its input: write only once the gateway holds it open.
            await d.status_until(client, lambda st: st["sources"]["river"].get("port_open"))

            def holds(written: list[Record], uplink: str) -> Callable[[], bool]:
                def check() -> bool:
                    return all(
                        closed_windows(written, t) <= set(received(vanda, nilu, t))
                        for t in TARGETS
                        if t.uplink == uplink
                    )

                return check

            # The memory in chunks that end inside windows; after each, wait until every window
            # a later reading has closed is at both services (more of the window that is still
            # filling arrives with the next chunk).
            rng = random.Random(1)
            i = 0
            split = 0  # chunk boundaries inside a 5-minute window
            while i < len(records):
                chunk = records[i : i + rng.randrange(30, 61)]
                await logger.write(b"".join(r.line().encode() + b"\r\n" for r in chunk))
                i += len(chunk)
                if i < len(records):
                    split += records[i - 1].ts_ms // 300_000 == records[i].ts_ms // 300_000
                await vanda.wait_for(holds(records[:i], "vanda"), timeout=20)
                await nilu.wait_for(holds(records[:i], "nilu"), timeout=20)
            await logger.write_line(closing.line())
            await vanda.wait_for(holds([*records, closing], "vanda"), timeout=20)
            await nilu.wait_for(holds([*records, closing], "nilu"), timeout=20)

            # The closing record's readings stay pending (their window is open), everything
            # else was delivered (or, before the fix, dead-lettered).
            held = {"vanda": 4, "nilu": 3}
            st = await d.status_until(
                client,
                lambda st: all(
                    st["uplinks"][u]["backlog"] == n or st["uplinks"][u]["dead_letters"]
                    for u, n in held.items()
                ),
            )
            assert await d.terminate() == 0
    assert split >= 4

    with contextlib.closing(sqlite3.connect(f"file:{tmp_path / 'fg.db'}?mode=ro", uri=True)) as db:
        dead = db.execute("SELECT uplink, series, reason FROM dead_letters ORDER BY id").fetchall()
    for t in TARGETS:
        want = expected(records, t)  # the memory's windows; not the closing record's
        got = received(vanda, nilu, t)
        wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
        extra = sorted(set(got) - set(want))
        assert not wrong and not extra, (
            f"{t.uplink} {t.key} {t.column} ({t.mode}, {t.width_s} s): "
            f"{len(wrong)} of {len(want)} windows wrong, e.g. (got, want) "
            f"{dict(list(wrong.items())[:3])}; windows that should not have been sent "
            f"{extra[:3]}; {len(dead)} dead letters, e.g. {dead[:1]}"
        )
        assert len(want) >= MEMORY_MINUTES * 60 // t.width_s - 2
    assert dead == []
    src = st["sources"]["river"]
    assert src["readings"] == (len(records) + 1) * len(TARGETS)
    assert src["rejected"] == 0
    for u, n in held.items():
        assert st["uplinks"][u]["dead_letters"] == 0, (u, st["uplinks"][u])
        assert st["uplinks"][u]["backlog"] == n, (u, st["uplinks"][u])
    # Every request was taken whole: nothing refused by either service.
    assert vanda.actions["failed"] == 0
    assert nilu.refused == []
