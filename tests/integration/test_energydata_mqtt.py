"""The Energydata.dk uplink over MQTT through the shared machinery, against a real mosquitto.

Mosquitto runs as a child process on a free port. Where the service's own rules matter (the
per-client incoming queue, disconnect on an unauthorised publish, the token as username) the
client talks to gateway/sandbox/energydata_broker.py in front of mosquitto; its ``stored`` list
is what the service acknowledged, i.e. kept.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway.config import Secret, StoreConfig
from gateway.models import Reading
from gateway.sandbox.energydata_broker import EnergydataBroker
from gateway.sandbox.mosquitto import Mosquitto, make_test_ca
from gateway.store import Store
from gateway.uplinks.dispatch import UplinkRunner, UplinkState
from gateway.uplinks.energydata.config import EnergydataConfig
from gateway.uplinks.energydata.uplink import EnergydataUplink

TOKEN = "edk-token-0123456789"
DATASETS = [
    {"name": "site", "prefix": "siteA"},
    {"name": "pump", "prefix": "siteB", "messages": "single"},
]
ROUTES = [
    {"series": "well.level", "dataset": "site", "suffix": "well/level"},
    {"series": "well.temp", "dataset": "site", "suffix": "well/temp"},
    {"series": "well.count", "dataset": "site", "suffix": "well/count", "datatype": "integer"},
    {"series": "well.state", "dataset": "site", "suffix": "state", "datatype": "string"},
    {"series": "pump.power", "dataset": "pump", "suffix": "power"},
]
SUFFIX = {r["series"]: r["suffix"] for r in ROUTES}
MOSQUITTO_ACL = {TOKEN: ["readwrite #"], "reader": ["read #"]}


def edk_cfg(port: int, **kw: object) -> EnergydataConfig:
    # One worker: Store.complete computes a lease's new "done" set before taking the write
    # lock, so two completions at once can drop one's marks (the readings are then leased and
    # sent again, and the backlog counter runs ahead). Exact counts below need one worker until
    # that is fixed; the window is shared by all workers either way.
    data: dict[str, object] = {
        "name": "edk",
        "type": "energydata",
        "host": "127.0.0.1",
        "port": port,
        "tls": False,
        "token": {"env": "UNUSED"},
        "datasets": DATASETS,
        "routes": ROUTES,
        "window": 20,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "ack_timeout_s": 10,
        "connect_timeout_s": 5,
        "concurrency": 1,
        **kw,
    }
    return EnergydataConfig.model_validate(data)


class Harness:
    def __init__(self, store: Store, runner: UplinkRunner, uplink: EnergydataUplink) -> None:
        self.store, self.runner, self.uplink = store, runner, uplink
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.runner.run(), name="uplink:edk")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.uplink.aclose()

    async def nudge(self) -> None:
        """An operator's "retry now": the runner's resume_now wakes the worker asleep for
        auth_retry_s (no restart needed)."""
        assert self.task is not None
        self.uplink.resume_now()
        self.runner.resume_now()

    async def until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.store.wait_for_data(0.02)

    def backlog(self) -> int:
        return int(self.store.uplink_stats("edk")["backlog"])


class Subscriber:
    """An aiomqtt client subscribed to everything on mosquitto, recording what arrives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got: list[tuple[str, Any]] = []
        self._tick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run(), name="test:subscriber")
        await asyncio.wait_for(self._ready.wait(), 10)
        return self

    async def _run(self) -> None:
        async with aiomqtt.Client(
            "127.0.0.1", self.port, username="reader", identifier="test-reader"
        ) as c:
            await c.subscribe("#", qos=1)
            self._ready.set()
            async for m in c.messages:
                self.got.append((str(m.topic), json.loads(bytes(m.payload))))
                self._tick.set()
                self._tick = asyncio.Event()

    async def wait_count(self, n: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                await self._tick.wait()

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def mosquitto(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    async with Mosquitto(tmp_path / "mq", acl=MOSQUITTO_ACL) as mq:
        yield mq


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Harness, asyncio.Task[None]]] = []

    async def make(port: int, token: str = TOKEN, **cfg_kw: object) -> Harness:
        cfg = edk_cfg(port, **cfg_kw)
        store = await Store.open(
            StoreConfig(path=tmp_path / f"e{len(made)}.db", commit_interval_ms=10),
            {"edk": cfg.routed_series()},
        )
        writer = asyncio.create_task(store.run(), name="store:writer")
        up = EnergydataUplink(cfg, Secret(token, "test"))
        h = Harness(store, UplinkRunner(up, cfg, store), up)
        made.append((h, writer))
        return h

    yield make
    for h, writer in made:
        await h.stop()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await h.store.aclose()


def now_ms() -> int:
    return int(time.time() * 1000)


def site_readings(n: int, t0: int | None = None) -> list[Reading]:
    t0 = t0 if t0 is not None else now_ms() - n * 1000
    out: list[Reading] = []
    for i in range(n):
        t = t0 + i * 1000
        out += [
            Reading("well.level", t, round(2 + i * 0.01, 3)),
            Reading("well.temp", t, 10.5),
            Reading("well.count", t, i),
            Reading("well.state", t, "on" if i % 2 else "off"),
            Reading("pump.power", t, i % 3 == 0),
        ]
    return out


def expected_values(rs: list[Reading]) -> set[tuple[str, int, object]]:
    """(full topic, timestamp, value) the document's messages must carry for ``rs``."""
    prefix = {"site": "siteA", "pump": "siteB"}
    dataset = {r["series"]: r["dataset"] for r in ROUTES}
    out = set()
    for r in rs:
        v: object = r.value
        if r.series == "pump.power":
            v = int(bool(v))
        out.add((f"{prefix[dataset[r.series]]}/{SUFFIX[r.series]}", r.ts, v))
    return out


def received_values(got: list[tuple[str, Any]]) -> list[tuple[str, int, object]]:
    out = []
    for topic, payload in got:
        assert set(payload) == {"timestamp", "value"}
        if isinstance(payload["value"], dict):
            assert topic == "siteA"  # multi-value: on the prefix
            out += [(f"{topic}/{k}", payload["timestamp"], v) for k, v in payload["value"].items()]
        else:
            out.append((topic, payload["timestamp"], payload["value"]))
    return out


def stored_values(front: EnergydataBroker) -> list[tuple[str, int, object]]:
    return received_values([(t, json.loads(p)) for t, p in front.stored])


async def test_every_reading_arrives_exactly_as_documented(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    async with (
        EnergydataBroker(("127.0.0.1", mosquitto.port), tokens={TOKEN: ["#"]}) as front,
        Subscriber(mosquitto.port) as sub,
    ):
        h: Harness = await env(front.port)
        rs = site_readings(60)
        await h.store.ingest(rs, durable=True)
        h.start()
        await h.until(lambda: h.backlog() == 0)
        # Every site reading of one instant in one multi-value message; pump single-value.
        await sub.wait_count(2 * 60)
        multi = [p for t, p in sub.got if t == "siteA"]
        assert len(multi) == 60 and all(len(p["value"]) == 4 for p in multi)
        assert {t for t, _ in sub.got} == {"siteA", "siteB/power"}
        got = received_values(sub.got)
        assert len(got) == len(rs) and set(got) == expected_values(rs)
        # Types as documented: integer stays integer, string stays string, bool as 1/0.
        by = {(t, ts): v for t, ts, v in got}
        counts = [by[("siteA/well/count", r.ts)] for r in rs if r.series == "well.count"]
        states = [by[("siteA/state", r.ts)] for r in rs if r.series == "well.state"]
        assert all(type(v) is int for v in counts) and all(type(v) is str for v in states)
        assert front.max_unacked <= 20 and h.uplink.publisher.max_in_flight <= 20
        assert h.runner.state is UplinkState.OK and front.dropped == 0


async def test_broker_killed_mid_stream_and_restarted_loses_nothing(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    async with EnergydataBroker(("127.0.0.1", mosquitto.port), tokens={TOKEN: ["#"]}) as front:
        h: Harness = await env(
            front.port,
            datasets=[{"name": "site", "prefix": "siteA", "messages": "single"}, DATASETS[1]],
            batch_max_items=500,
        )
        rs = site_readings(600)  # 3,000 readings, one message each
        await h.store.ingest(rs, durable=True)
        h.start()
        await front.wait_for(lambda: len(front.stored) >= 800, timeout=30)
        await mosquitto.kill()
        await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
        assert 0 < h.backlog() < len(rs)
        await mosquitto.start()
        await h.until(lambda: h.backlog() == 0, timeout=60)
        stored = stored_values(front)
        # Everything the store calls delivered was acknowledged by the broker, at least once;
        # repeats only for what was in flight when the broker died.
        assert set(stored) == expected_values(rs)
        assert len(stored) - len(set(stored)) <= 20
        assert h.store.uplink_stats("edk")["delivered"] == len(rs)
        assert h.uplink.publisher.connects >= 2 and h.runner.state is UplinkState.OK


async def test_small_broker_queue_never_overflows_and_nothing_counts_before_puback(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    async with EnergydataBroker(
        ("127.0.0.1", mosquitto.port), tokens={TOKEN: ["#"]}, queue_limit=16
    ) as front:
        h: Harness = await env(
            front.port,
            window=8,
            datasets=[{"name": "site", "prefix": "siteA", "messages": "single"}, DATASETS[1]],
        )
        rs = site_readings(60)
        await h.store.ingest(rs, durable=True)
        front.hold()  # the broker stops dequeuing: the client's window fills up and stops
        h.start()
        await front.wait_for(lambda: front.queued() == 8)
        assert h.uplink.publisher.in_flight == 8 and front.dropped == 0
        assert h.backlog() == len(rs)  # nothing delivered without its PUBACK
        front.release()
        await h.until(lambda: h.backlog() == 0)
        assert set(stored_values(front)) == expected_values(rs)
        assert front.dropped == 0 and front.max_queue <= 8 and front.max_unacked <= 8
        assert h.uplink.publisher.max_in_flight == 8

    # Control: a client that does not wait for acknowledgements overflows the same queue.
    async with EnergydataBroker(
        ("127.0.0.1", mosquitto.port), tokens={TOKEN: ["#"]}, queue_limit=16
    ) as front:
        front.hold()
        async with aiomqtt.Client(
            "127.0.0.1", front.port, username=TOKEN, max_inflight_messages=100
        ) as c:
            tasks = [
                asyncio.create_task(c.publish("siteA/x", b"{}", qos=1, timeout=30))
                for _ in range(40)
            ]
            await front.wait_for(lambda: front.dropped == 24)
            assert front.queued() == 16
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_broker_that_drops_overflow_loses_nothing(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    # A window larger than the broker's queue (misconfigured on purpose): what overflows is
    # dropped without a word, its PUBACK never comes, the connection is dropped after
    # ack_timeout_s and everything unacknowledged is published again.
    async with EnergydataBroker(
        ("127.0.0.1", mosquitto.port), tokens={TOKEN: ["#"]}, queue_limit=4
    ) as front:
        h: Harness = await env(
            front.port,
            window=8,
            ack_timeout_s=0.5,
            datasets=[{"name": "site", "prefix": "siteA", "messages": "single"}, DATASETS[1]],
        )
        rs = site_readings(8)
        await h.store.ingest(rs, durable=True)
        front.hold()
        h.start()
        await front.wait_for(lambda: front.dropped == 4)
        front.release()
        await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
        assert "publish failed" in (h.runner.last_error or "")
        await h.until(lambda: h.backlog() == 0)
        assert set(stored_values(front)) == expected_values(rs)
        assert h.uplink.publisher.connects >= 2


async def test_forbidden_topic_is_auth_failed_and_the_other_data_keeps_its_place(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    async with EnergydataBroker(
        ("127.0.0.1", mosquitto.port), tokens={TOKEN: ["siteA", "siteA/#"]}
    ) as front:
        h: Harness = await env(front.port, auth_retry_s=3600)
        rs = site_readings(40)
        pump = [r for r in rs if r.series == "pump.power"]
        site = [r for r in rs if r.series != "pump.power"]
        await h.store.ingest(rs, durable=True)
        h.start()
        await h.until(lambda: h.runner.state is UplinkState.AUTH_FAILED)
        assert "not authorised" in (h.runner.last_error or "")
        assert "'siteB/power'" in (h.runner.last_error or "")
        await h.until(lambda: h.backlog() == len(pump))
        assert set(stored_values(front)) == expected_values(site)
        assert h.store.uplink_stats("edk")["dead_letters"] == 0
        # A slow retry, no reconnect loop: the first disconnect, one lone probe, and nothing
        # else for an hour.
        assert front.connects <= 3 and len(front.denied) == 2
        assert h.runner.status()["retry_in_s"] > 3000
        assert h.uplink.status()["mqtt"]["forbidden_topics"] == ["siteB/power"]  # type: ignore[index]
        assert TOKEN not in json.dumps(h.runner.status(), default=str)

        # The token gets the licence: the kept readings go, in full.
        front.grant(TOKEN, "siteB/#")
        await h.nudge()
        await h.until(lambda: h.backlog() == 0)
        assert set(stored_values(front)) == expected_values(rs)
        await h.until(lambda: h.runner.state is UplinkState.OK)


async def test_unknown_token_is_refused_as_auth_and_data_is_kept(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    async with EnergydataBroker(("127.0.0.1", mosquitto.port), tokens={TOKEN: ["#"]}) as front:
        h: Harness = await env(front.port, token="not-the-token", auth_retry_s=3600)
        rs = site_readings(5)
        await h.store.ingest(rs, durable=True)
        h.start()
        await h.until(lambda: h.runner.state is UplinkState.AUTH_FAILED)
        assert front.refused[5] == 1 and front.stored == []
        assert "refused" in (h.runner.last_error or "")
        assert h.backlog() == len(rs)
        assert "not-the-token" not in json.dumps(h.runner.status(), default=str)


async def test_tls_with_a_generated_test_ca(tmp_path: Path, env: Callable[..., Any]) -> None:
    ca = await make_test_ca(tmp_path / "ca")
    other = await make_test_ca(tmp_path / "other-ca")
    async with (
        Mosquitto(tmp_path / "mq", tls=ca, acl=MOSQUITTO_ACL) as mq,
        Subscriber(mq.port) as sub,
    ):
        rs = site_readings(10)
        # A CA that did not sign the broker's certificate: refused, nothing sent, all kept.
        bad: Harness = await env(mq.tls_port, tls=True, ca_file=str(other.ca_cert))
        await bad.store.ingest(rs, durable=True)
        bad.start()
        await bad.until(lambda: bad.runner.state is UplinkState.BACKING_OFF)
        assert "certificate verify failed" in (bad.runner.last_error or "")
        assert bad.backlog() == len(rs)
        await bad.stop()

        good: Harness = await env(mq.tls_port, tls=True, ca_file=str(ca.ca_cert))
        await good.store.ingest(rs, durable=True)
        good.start()
        await good.until(lambda: good.backlog() == 0)
        await sub.wait_count(20)
        assert set(received_values(sub.got)) == expected_values(rs)
        assert good.runner.state is UplinkState.OK


async def test_a_refused_connection_sets_the_wait_and_the_runner_takes_it_as_it_is() -> None:
    # Nothing listens on the port: a real refusal. The connection's own backoff picks the next
    # attempt and hands it to the runner as retry_after, so the runner's backoff does not stack
    # on top (bench/e2e.py: with three workers, a 30 s outage left a minute of waiting).
    from gateway.sandbox.mosquitto import free_port
    from gateway.uplinks.base import Outcome
    from gateway.uplinks.energydata.messages import Message
    from gateway.uplinks.energydata.mqtt import WindowedPublisher

    cfg = edk_cfg(free_port(), backoff_initial_s=4.0, backoff_max_s=16.0, connect_timeout_s=2)
    pub = WindowedPublisher(cfg, Secret("tok", "test"))
    msg = Message("siteA/tank1/level", b'{"timestamp":1,"value":1}', (1,))
    try:
        acked, failure = await pub.publish([msg])
        assert acked == [] and failure is not None
        assert failure.outcome is Outcome.TRANSIENT
        assert failure.retry_after is not None and 2.0 <= failure.retry_after <= 4.0
        # Asked again before that time: no new attempt, the rest of the same wait.
        acked, again = await pub.publish([msg])
        assert acked == [] and again is not None and again.retry_after is not None
        assert again.retry_after <= failure.retry_after and again.message.startswith("reconnect in")
        assert pub.connects == 1  # attempts: the second publish made none
    finally:
        await pub.aclose()


async def test_pattern_routes_name_each_datastream_from_its_series(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    """One ``u*.r*`` route stands for every unit's registers; an exact route wins over a
    pattern; a series whose capture makes no valid topic is dead-lettered with the reason; a
    series no route takes is never sent."""
    routes = [
        {"series": "u*.r*", "dataset": "site", "suffix": "unit{1}/reg{2}", "datatype": "integer"},
        {"series": "u7.r0", "dataset": "site", "suffix": "seven/zero", "datatype": "integer"},
        {"series": "pump.*", "dataset": "pump", "suffix": "{series}"},
    ]
    async with (
        EnergydataBroker(("127.0.0.1", mosquitto.port), tokens={TOKEN: ["#"]}) as front,
        Subscriber(mosquitto.port) as sub,
    ):
        h: Harness = await env(front.port, routes=routes)
        t = now_ms() - 10_000
        rs = [
            Reading(f"u{u}.r{r}", t + i * 1000, u * 1000 + r + i)
            for i in range(3)
            for u in (1, 7, 12)
            for r in range(4)
        ]
        rs += [
            Reading("pump.power", t, 5.5),
            Reading("u3.r x", t, 1),
            Reading("tank.level", t, 2.0),
        ]
        await h.store.ingest(rs, durable=True)
        h.start()
        await h.until(lambda: h.backlog() == 0)
        await sub.wait_count(3 + 1)
        got = received_values(sub.got)
        want = {
            (f"siteA/unit{r.series[1:].split('.r')[0]}/reg{r.series.split('.r')[1]}", r.ts, r.value)
            for r in rs[:36]
            if r.series != "u7.r0"
        }
        want |= {("siteA/seven/zero", r.ts, r.value) for r in rs[:36] if r.series == "u7.r0"}
        want.add(("siteB/pump.power", t, 5.5))
        assert len(got) == len(want) and set(got) == want
        # Three instants, 12 values each: one multi-value message per instant.
        assert sorted(len(p["value"]) for tp, p in sub.got if tp == "siteA") == [12, 12, 12]
        dead = await h.store.dead_letters("edk")
        assert [(d["series"], d["reason"]) for d in dead] == [
            (
                "u3.r x",
                "series 'u3.r x' makes topic suffix 'unit3/reg x' from 'unit{1}/reg{2}': "
                "not alphanumeric parts separated by /",
            )
        ]
        # tank.level matches no route: the store never hands it to this uplink.
        assert all("tank" not in tp for tp, _ in sub.got)


# Reconnect schedules: backoff_initial_s above the short cap makes the two schedules disjoint
# from the first failure on (short: 1-2 s; refused: 5-10 s, then 10-20 s...), so which one the
# runner took shows in the delay it chose, without waiting any of it out.
SHORT_CAP = 2.0
SCHEDULES: dict[str, object] = {
    "backoff_initial_s": 10.0,
    "backoff_max_s": 120.0,
    "reconnect_max_s": SHORT_CAP,
}


async def test_a_broker_that_went_away_is_retried_within_the_short_cap(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    h: Harness = await env(mosquitto.port, **SCHEDULES)
    await h.store.ingest(site_readings(5), durable=True)
    h.start()
    await h.until(lambda: h.backlog() == 0)
    await mosquitto.kill()  # the connection drops; then nothing listens on the port
    more = site_readings(5, t0=now_ms())
    await h.store.ingest(more, durable=True)
    await h.until(lambda: h.runner.state is UplinkState.BACKING_OFF)
    publisher = h.uplink.publisher
    kinds = []
    for _ in range(4):
        st = h.runner.status()
        kinds.append(st["retry_kind"])
        assert st["retry_in_s"] <= SHORT_CAP
        # An operator's nudge instead of waiting: the next attempt now, on the same schedule.
        attempts = publisher.connects
        await h.nudge()
        await h.until(lambda a=attempts: publisher.connects > a)
        await h.until(lambda: h.runner.status()["retry_in_s"] > 0)
    assert kinds == ["unreachable"] * 4
    assert "Connection refused" in (h.runner.last_error or "")
    assert h.backlog() == len(more)
    # Back: delivered, and both schedules start again from their first step.
    await mosquitto.start()
    await h.until(lambda: h.backlog() == 0, timeout=30)
    assert h.runner.state is UplinkState.OK and h.runner.status()["retry_kind"] is None
    assert publisher._retry.unreachable.attempts == 0


async def test_a_broker_that_answers_and_refuses_backs_off_on_the_long_schedule(
    mosquitto: Mosquitto, env: Callable[..., Any]
) -> None:
    # The service's front answers, but its broker behind it is gone: CONNACK 3 (server
    # unavailable). It answered, so retrying within seconds cannot help: the long schedule.
    async with EnergydataBroker(("127.0.0.1", mosquitto.port), tokens={TOKEN: ["#"]}) as front:
        await mosquitto.kill()
        h: Harness = await env(front.port, **SCHEDULES)
        await h.store.ingest(site_readings(3), durable=True)
        h.start()
        await h.until(lambda: front.refused[3] >= 1 and h.runner.status()["retry_in_s"] > 0)
        st = h.runner.status()
        assert st["retry_kind"] == "refused" and st["retry_in_s"] > SHORT_CAP
        assert "refused the connection" in (h.runner.last_error or "")
        # Once more: the next wait grows (10-20 s), where a dropped link would stay at 1-2 s.
        await h.nudge()
        await h.until(lambda: front.refused[3] >= 2 and h.runner.status()["retry_in_s"] > 0)
        assert h.runner.status()["retry_in_s"] > 9.0
        assert front.connects == 2 and h.backlog() == 15
        # The broker behind it comes back: delivered at the next attempt.
        await mosquitto.start()
        await h.nudge()
        await h.until(lambda: h.backlog() == 0, timeout=30)
        assert h.runner.state is UplinkState.OK
