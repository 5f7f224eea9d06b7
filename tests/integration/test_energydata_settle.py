"""Issue 13: Energydata settles each path's outcome as it completes.

One send of the Energydata uplink runs its MQTT publishes and a batch CSV import side by side.
The readings PUBACKed over MQTT must be recorded as delivered as soon as they are acknowledged,
not when the import (minutes, in real life) is over: a kill during the import then sends again
only what the import held.

Real parts throughout: ``fieldgate run`` as a child process (killed with SIGKILL), its store file
on disk, a real mosquitto behind the Energydata broker front, and the batch import emulator over
HTTP, whose validation is held for as long as the test says.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from gateway.config import load_config
from gateway.intervals import IntervalSet
from gateway.models import Reading
from gateway.sandbox.energydata_broker import EnergydataBroker
from gateway.sandbox.energydata_import import Datastream, EnergydataImportEmulator
from gateway.sandbox.mosquitto import Mosquitto
from gateway.store import Store

from .daemon import DAEMON_HEAD, Daemon

MQTT_TOKEN = "edk-settle-mqtt-token-31"
IMPORT_TOKEN = "edk-settle-import-token-59"
DAY = 86_400_000
N_SERIES = 10
STREAMS = [Datastream(7000 + i, f"siteA/m/{i}") for i in range(N_SERIES)]
STREAM_OF = {f"s{i}": 7000 + i for i in range(N_SERIES)}
TOPIC_OF = {ds.id: ds.topic for ds in STREAMS}

CONFIG = (
    DAEMON_HEAD
    + """
[[uplinks]]
name = "edk"
type = "energydata"
host = "127.0.0.1"
port = {mqtt_port}
tls = false
token = {{ env = "FG_TEST_EDK_TOKEN" }}
# One worker: the old and the recent readings share one lease, hence one send.
concurrency = 1
backoff_initial_s = 0.05
backoff_max_s = 0.2
connect_timeout_s = 5
  [uplinks.backfill]
  url = "{import_url}/api/v1"
  token = {{ file = "{tmp}/edk-import.token" }}
  older_than_s = 3600
  min_readings = 100
  poll_s = 0.05
  [[uplinks.datasets]]
  name = "site"
  prefix = "siteA"
{routes}
"""
)

ROUTE = """  [[uplinks.routes]]
  series = "s{i}"
  dataset = "site"
  suffix = "m/{i}"
  datastream = {ds}
"""

Value = tuple[str, int, object]  # (topic, timestamp ms, value)


def write_config(tmp: Path, mqtt_port: int, import_url: str) -> Path:
    token = tmp / "edk-import.token"
    token.write_text(IMPORT_TOKEN + "\n")
    token.chmod(0o600)
    routes = "".join(ROUTE.format(i=i, ds=7000 + i) for i in range(N_SERIES))
    path = tmp / "fieldgate.toml"
    path.write_text(
        CONFIG.format(
            db=f"{tmp}/fg.db", tmp=tmp, mqtt_port=mqtt_port, import_url=import_url, routes=routes
        )
    )
    return path


def readings(n_instants: int, t0: int, base: float) -> list[Reading]:
    return [
        Reading(f"s{i}", t0 + k * 1000, round(base + k * 0.01 + i, 3))
        for k in range(n_instants)
        for i in range(N_SERIES)
    ]


def as_values(rs: list[Reading]) -> set[Value]:
    return {(TOPIC_OF[STREAM_OF[r.series]], r.ts, r.value) for r in rs}


def broker_values(front: EnergydataBroker) -> list[Value]:
    """Every value the broker acknowledged, in order, repeats kept (multi-value messages are
    opened up into their values)."""
    out: list[Value] = []
    for topic, payload in front.stored:
        msg = json.loads(payload)
        if isinstance(msg["value"], dict):
            out.extend((f"{topic}/{k}", msg["timestamp"], v) for k, v in msg["value"].items())
        else:
            out.append((topic, msg["timestamp"], msg["value"]))
    return out


def imported_rows(emu: EnergydataImportEmulator) -> Counter[Value]:
    """Every value of every import that was ingested, counted (a re-imported row counts twice)."""
    return Counter(
        (TOPIC_OF[ds], ms, value)
        for job in emu.imports.values()
        if job.status == "done"
        for ds, ms, value in job.rows
    )


def stored_outcome(db: Path) -> tuple[int, IntervalSet]:
    """What the daemon's store file has committed for the uplink: (delivered, done ids)."""
    raw = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        delivered, done = raw.execute(
            "SELECT delivered, done FROM uplinks WHERE name = 'edk'"
        ).fetchone()
    finally:
        raw.close()
    return int(delivered), IntervalSet.from_json(done)


async def test_mqtt_part_is_recorded_at_once_and_a_kill_resends_only_the_import(
    tmp_path: Path, daemons: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FG_TEST_EDK_TOKEN", MQTT_TOKEN)
    async with (
        Mosquitto(tmp_path / "mq", acl={MQTT_TOKEN: ["readwrite #"]}) as mq,
        EnergydataBroker(("127.0.0.1", mq.port), tokens={MQTT_TOKEN: ["#"]}) as front,
        EnergydataImportEmulator(IMPORT_TOKEN, datastreams=STREAMS) as emu,
    ):
        config = write_config(tmp_path, front.port, emu.url)
        db = tmp_path / "fg.db"
        now = int(time.time() * 1000)
        old = readings(20, now - DAY, 1.0)  # 200 readings a day old: the batch import
        recent = readings(5, now - 30_000, 500.0)  # 50 from half a minute ago: MQTT
        # The store a previous run left: a backlog of both kinds (captured while the link was
        # down). One lease takes them all, so one send runs the import and the publishes.
        loaded = load_config(config)
        up = loaded.settings.uplinks[0]
        store = await Store.open(loaded.settings.store, {up.name: up.routed_series()})
        await store.ingest(old + recent)
        await store.aclose()
        old_ids = IntervalSet([(1, len(old))])
        recent_ids = IntervalSet([(len(old) + 1, len(old) + len(recent))])

        emu.hold()  # validation takes as long as the test says
        d1 = Daemon(config)
        daemons.append(d1)
        await d1.start()
        await d1.wait_event("gateway_ready")
        await emu.wait_for(
            lambda: any(j.status == "validating" for j in emu.imports.values()), timeout=20
        )
        await front.wait_for(lambda: as_values(recent) <= set(broker_values(front)), timeout=20)

        # PUBACKed while the import is still held: recorded as delivered, in memory and on disk.
        async with httpx.AsyncClient(base_url=await d1.health_url()) as client:
            st = (
                await d1.status_until(
                    client,
                    lambda s: s["uplinks"]["edk"]["delivered"] >= len(recent),
                    timeout=10,
                    what="MQTT readings PUBACKed but not recorded delivered while the import runs",
                )
            )["uplinks"]["edk"]
        assert (st["delivered"], st["backlog"]) == (len(recent), len(old))
        delivered, done = stored_outcome(db)
        assert delivered == len(recent)
        assert all(i in done for lo, hi in recent_ids for i in range(lo, hi + 1))
        assert not any(i in done for lo, hi in old_ids for i in range(lo, hi + 1))
        assert [j.status for j in emu.imports.values()] == ["validating"]
        assert emu.ingested == 0

        # Killed in the middle of the import: only the import's readings were in flight.
        assert await d1.kill() == -9
        before_kill = broker_values(front)

        await emu.release()
        d2 = Daemon(config)
        daemons.append(d2)
        await d2.start()
        await d2.wait_event("gateway_ready")
        async with httpx.AsyncClient(base_url=await d2.health_url()) as client:
            await d2.status_until(
                client,
                lambda s: s["uplinks"]["edk"]["backlog"] == 0,
                timeout=30,
                what="backlog not drained after the restart",
            )
        await emu.wait_for(lambda: emu.ingested >= len(old), timeout=10)
        assert await d2.terminate() == 0

    mqtt = broker_values(front)
    after_kill = mqtt[len(before_kill) :]
    imported = imported_rows(emu)
    # Nothing PUBACKed before the kill was published again after the restart.
    assert [v for v in after_kill if v in set(before_kill)] == []
    # Every reading delivered: the recent ones over MQTT exactly once, the old ones imported.
    assert Counter(mqtt) == Counter(as_values(recent))
    assert set(imported) == as_values(old)
    # The only repeats a kill during an import may cause are the import's own readings.
    assert set(mqtt) & set(imported) == set()
    assert max(imported.values()) <= 2
    delivered, done = stored_outcome(db)
    assert delivered == len(old) + len(recent)  # each reading counted once across both runs
