"""End-to-end benchmark: Modbus TCP -> gateway -> SQLite -> MQTT QoS 1 -> counting subscriber.

    .venv/bin/python bench/e2e.py run [--gateway fieldgate|peer|both] [--units 200]
        [--registers 125] [--interval 1.0] [--seconds 300] [--warmup 10] [--pin]
        [--out FILE.json]
    .venv/bin/python bench/e2e.py idle [--gateway ...]        # RSS with one device, one uplink
    .venv/bin/python bench/e2e.py outage [--gateway ...] [--down 30] [--outages 1] [--up S]
        [--kill]                                              # broker down, then back
    .venv/bin/python bench/e2e.py suite [--seconds 300]      # everything BENCHMARKS.md reports

``--pin`` (any scenario; needs 2 CPUs or more and ``taskset``): the gateway under test runs on
CPU 0 alone (the lowest CPU this process may use), everything else on the remaining ones: the
simulator, mosquitto, the subscriber and the harness itself. fieldgate is started through
``taskset -c 0``, the peer from a harness thread switched to CPU 0 for the fork, so either one
is pinned before it starts a thread (fieldgate's aiosqlite worker included); the other parts
inherit the harness's CPUs. The result's ``"pinned"`` holds the plan (``"gateway"``, ``"rest"``)
and ``"read"``: each process's ``Cpus_allowed_list`` from ``/proc/<pid>/status`` after the
warm-up (every gateway thread's too), and ``"ok"`` when all of them match the plan. ``suite``
adds a pinned 25k run (``load_25k_pinned``) on a machine with 2 CPUs or more.

Every run starts its own parts, all on loopback:

- the Modbus simulator (``gateway/sandbox/modbus_sim.py --counters``) in a child process:
  units 1..N with ``--registers`` uint16 holding registers each; register 0 counts the polls that
  read it, so every delivered point names the poll it came from;
- a mosquitto on a free port (``gateway/sandbox/mosquitto.py``);
- the counting subscriber (``bench/e2e_subscriber.py``), a process of its own;
- the gateway under test: fieldgate (``python -m gateway run`` with a generated config: one
  Modbus TCP source, one device per unit reading all registers, the Energydata uplink with
  multi-value messages, QoS 1, plain TCP to the local broker), or the peer, ThingsBoard IoT
  Gateway, installed from PyPI into its own venv at benchmark time (``bench/peer_tbgateway.py``).

At the end the simulator is told to stop answering (SIGUSR1) and reports how many polls each
unit answered; the harness waits for the subscriber to go quiet and then compares: a point is
lost when a poll the simulator answered did not arrive whole, duplicated when it arrived twice.
CPU is the gateway process's user+system time over the measured window (after ``--warmup``),
as % of one core; RSS is sampled every second (VmRSS). Latency is the subscriber's arrival time
minus the reading's timestamp (the poll), per point: broker acknowledgement and delivery to the
subscriber are one broker step apart on loopback.

``outage`` also reports how fast the backlog leaves once the broker is back: ``drain_points_per_s``
is the points of the polls that arrived whole from the first delivery after the broker was back up
to the caught-up moment (the backlog, plus the live polls taken meanwhile), divided by that span:
points per second leaving the gateway while it catches up. ``drain_vs_live`` is that over the
offered live rate (units x registers / interval): 1.0 would mean it never catches up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.sandbox.mosquitto import Mosquitto  # noqa: E402

TOKEN = "bench-token"
PREFIX = "bench"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- process figures --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its reaped children."""
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(parts[i]) for i in (11, 12, 13, 14)) / _TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Sampler:
    """RSS every second and CPU over a window, for one process (and its children's pids)."""

    pids: list[int]
    rss: list[float] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def total_rss(self) -> float:
        return sum(rss_mib(p) for p in self.pids if Path(f"/proc/{p}").exists())

    def cpu(self) -> float:
        return sum(cpu_seconds(p) for p in self.pids if Path(f"/proc/{p}").exists())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.rss.append(self.total_rss())
            await asyncio.sleep(1.0)  # a sampling period, not a synchronisation

    def start(self) -> None:
        self.rss.clear()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# -- pinning (--pin) ------------------------------------------------------------------------


def cpu_list(cpus: Iterable[int]) -> str:
    """CPUs as the kernel writes ``Cpus_allowed_list`` (and taskset -c reads): ``0,2-3``."""
    runs: list[list[int]] = []
    for c in sorted(set(cpus)):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


@dataclass(frozen=True)
class Pin:
    """The gateway under test on ``gateway``, every other part of the rig on ``rest``."""

    gateway: frozenset[int]
    rest: frozenset[int]

    def as_json(self) -> dict[str, str]:
        return {"gateway": cpu_list(self.gateway), "rest": cpu_list(self.rest)}


def pin_plan(available: Iterable[int]) -> Pin:
    """The lowest available CPU (CPU 0 on an unrestricted machine) for the gateway, the others
    for the rest; ValueError when there is only one."""
    cpus = sorted(set(available))
    if len(cpus) < 2:
        raise ValueError(
            f"--pin needs at least 2 CPUs (this process may use {len(cpus)}: "
            f"{cpu_list(cpus) or 'none'}): the gateway gets one to itself, the rest another"
        )
    return Pin(frozenset(cpus[:1]), frozenset(cpus[1:]))


def pinned_command(cmd: Sequence[str], cpus: Iterable[int]) -> list[str]:
    """``cmd`` started through taskset on ``cpus``: pinned before its first instruction, so
    every thread it starts is too."""
    return ["taskset", "-c", cpu_list(cpus), *cmd]


def _threads(pid: int) -> list[int]:
    try:
        return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return []


def allowed_cpus(pid: int, tid: int | None = None) -> str | None:
    """``Cpus_allowed_list`` of a process (its main thread) or of one of its threads."""
    path = f"/proc/{pid}/task/{tid}/status" if tid is not None else f"/proc/{pid}/status"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def set_harness_cpus(cpus: Iterable[int]) -> None:
    """Every thread of this process on ``cpus`` (sched_setaffinity(0) moves only the calling
    thread); processes and threads started afterwards inherit it."""
    cpus = set(cpus)
    for tid in _threads(os.getpid()):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(tid, cpus)


@contextlib.contextmanager
def forking_on(cpus: Iterable[int] | None) -> Iterator[None]:
    """The calling thread on ``cpus`` for the block: a child forked in it starts pinned (for
    launchers that build their own command line, as the peer's does)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# -- the parts ------------------------------------------------------------------------------


class Simulator:
    def __init__(self, units: range, registers: int) -> None:
        self.units, self.registers = units, registers
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway.sandbox.modbus_sim",
                "--counters",
                f"{self.units.start}-{self.units.stop - 1}={self.registers}",
                "--port",
                "0",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        self.port = json.loads(self.proc.stdout.readline())["port"]

    def hush(self) -> dict[int, int]:
        """Stop answering; the polls each unit answered."""
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(signal.SIGUSR1)
        line = self.proc.stdout.readline()
        return {int(u): n for u, n in json.loads(line)["polls"].items()}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Subscriber:
    def __init__(self, port: int, topic: str, fmt: str, units: range, registers: int) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "e2e_subscriber.py"),
                "--port",
                str(port),
                "--topic",
                topic,
                "--format",
                fmt,
                "--registers",
                str(registers),
                "--units",
                f"{units.start}-{units.stop - 1}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert json.loads(self.ask_raw())["ready"]

    def ask_raw(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.ask_raw()))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("quit")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self.proc.poll() is None:
            self.proc.kill()


# -- the gateways ---------------------------------------------------------------------------


class GatewayProcess:
    """A gateway under test as a child process: its pid, kill -9, and SIGTERM with a deadline."""

    proc: subprocess.Popen[bytes] | None
    #: --pin: the CPUs the gateway is started on (None: wherever the harness runs)
    cpus: frozenset[int] | None = None

    @property
    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid]

    def _send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        assert self.proc is not None
        self._send(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self._send(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9


class Fieldgate(GatewayProcess):
    name = "fieldgate"
    topic = PREFIX
    fmt = "fieldgate"

    def __init__(
        self,
        workdir: Path,
        *,
        modbus_port: int,
        units: range,
        registers: int,
        interval: float,
        mqtt_port: int,
        commit_interval_ms: int | None = None,
        health: bool = False,
    ) -> None:
        self.workdir = workdir
        self.db = workdir / "fieldgate.db"
        self.config = workdir / "fieldgate.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        profile = workdir / "counter.toml"
        profile.write_text(
            'manufacturer = "fieldgate bench"\nmodel = "counter"\ntable = "holding"\n'
            + "".join(
                f'[[fields]]\nname = "r{i}"\naddress = {i}\ntype = "uint16"\n'
                for i in range(registers)
            )
        )
        lines = [
            "[store]",
            f'path = "{self.db}"',
            *([f"commit_interval_ms = {commit_interval_ms}"] if commit_interval_ms else []),
            # Off by default: the peer has no local endpoint either (--health turns it on).
            "[health]",
            f"enabled = {'true' if health else 'false'}",
            "port = 0",
            "[log]",
            'level = "warning"',
            'format = "json"',
            "[clock]",
            'trust = "always"',
            "[[sources]]",
            'name = "plant"',
            'type = "modbus"',
            'transport = "tcp"',
            'host = "127.0.0.1"',
            f"port = {modbus_port}",
            "timeout_s = 2.0",
        ]
        for u in units:
            lines += [
                "[[sources.devices]]",
                f'name = "u{u}"',
                f"unit = {u}",
                f"interval_s = {interval}",
                f'profile = "{profile}"',
            ]
        lines += [
            "[[uplinks]]",
            'name = "energydata"',
            'type = "energydata"',
            'host = "127.0.0.1"',
            f"port = {mqtt_port}",
            "tls = false",
            f'token = {{ value = "{TOKEN}", plain_text = true }}',
            "[[uplinks.datasets]]",
            'name = "bench"',
            f'prefix = "{PREFIX}"',
            'messages = "multi"',
        ]
        # One pattern route for every unit's registers (u1.r0 -> bench/u1/r0), as the peer's
        # range datapoint covers a unit's 125 registers in one entry.
        lines += [
            "[[uplinks.routes]]",
            'series = "u*.r*"',
            'dataset = "bench"',
            'suffix = "u{1}/r{2}"',
            'datatype = "integer"',
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        log = (self.workdir / "fieldgate.log").open("ab")
        cmd = [sys.executable, "-m", "gateway", "run", "--config", str(self.config)]
        self.proc = subprocess.Popen(
            pinned_command(cmd, self.cpus) if self.cpus else cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def durable_counters(self) -> dict[int, int]:
        """Per unit, the highest poll counter in the store (read after a kill)."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT s.name, max(r.value) FROM readings r JOIN series s ON s.id = r.series "
                "WHERE s.name LIKE 'u%.r0' GROUP BY s.name"
            ).fetchall()
        finally:
            con.close()
        return {int(name[1:].split(".")[0]): int(v) for name, v in rows}


class Peer(GatewayProcess):
    name = "thingsboard-gateway"
    fmt = "peer"

    def __init__(
        self,
        workdir: Path,
        *,
        modbus_port: int,
        units: range,
        registers: int,
        interval: float,
        mqtt_port: int,
        venv: Path,
    ) -> None:
        from bench import peer_tbgateway as tb

        self.tb = tb
        self.topic = tb.PEER_TOPIC
        self.workdir = workdir
        self.python = tb.ensure_peer(venv)
        self.config_dir = tb.write_peer_config(
            workdir,
            modbus_port=modbus_port,
            units=list(units),
            registers=registers,
            poll_ms=int(interval * 1000),
            mqtt_port=mqtt_port,
        )
        self.mqtt_port = mqtt_port
        self.proc: subprocess.Popen[bytes] | None = None
        self._stub: asyncio.Task[None] | None = None

    async def _stub_forever(self) -> None:
        # The peer publishes nothing until "ThingsBoard" answers its session-limits request
        # (bench/peer_tbgateway.py); the stand-in reconnects when the broker comes back.
        import aiomqtt

        while True:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.tb.serve_thingsboard_stub(self.mqtt_port)
            await asyncio.sleep(0.5)  # broker down: try again

    def start(self) -> None:
        if self._stub is None:
            self._stub = asyncio.get_running_loop().create_task(self._stub_forever())
        with forking_on(self.cpus):  # start_peer builds its own command line: no taskset
            self.proc = self.tb.start_peer(self.python, self.config_dir, self.workdir / "peer.log")

    def _send(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)  # the peer's whole process group

    def stop(self) -> int:
        if self._stub is not None:
            self._stub.cancel()
            self._stub = None
        if self.proc is not None and self.proc.poll() is None:
            self.tb.stop_peer(self.proc, timeout_s=30)
        return self.proc.returncode if self.proc else 0


Gateway = Fieldgate | Peer


@dataclass
class Rig:
    workdir: Path
    units: range
    registers: int
    interval: float
    sim: Simulator
    broker: Mosquitto
    gw: Gateway
    sub: Subscriber
    pin: Pin | None = None


@contextlib.asynccontextmanager
async def rig(which: str, args: argparse.Namespace, **fg_extra: Any) -> AsyncIterator[Rig]:
    units = range(1, args.units + 1)
    pin: Pin | None = None
    harness_cpus = os.sched_getaffinity(0)
    if getattr(args, "pin", False):
        pin = pin_plan(harness_cpus)
        # Before any part starts: the simulator, mosquitto (restarts included) and the
        # subscriber inherit the harness's CPUs; only the gateway is started on pin.gateway.
        set_harness_cpus(pin.rest)
    try:
        async with _rig(which, args, units, pin, **fg_extra) as r:
            yield r
    finally:
        if pin is not None:
            set_harness_cpus(harness_cpus)  # suite: the next scenario may not be pinned


@contextlib.asynccontextmanager
async def _rig(
    which: str, args: argparse.Namespace, units: range, pin: Pin | None, **fg_extra: Any
) -> AsyncIterator[Rig]:
    with tempfile.TemporaryDirectory(prefix=f"fieldgate-e2e-{which}-") as tmp:
        workdir = Path(tmp)
        sim = Simulator(units, args.registers)
        sim.start()
        # Persistent sessions, no queue limit: when the broker comes back after an outage, what
        # a gateway publishes before the subscriber has reconnected is queued for it (the
        # subscriber's session survives the restart), so a late subscriber never looks like loss.
        broker = Mosquitto(
            workdir / "mq", max_inflight_messages=1000, max_queued_messages=0, persistence=True
        )
        await broker.start()
        gw: Gateway
        try:
            common: dict[str, Any] = dict(
                modbus_port=sim.port,
                units=units,
                registers=args.registers,
                interval=args.interval,
                mqtt_port=broker.port,
            )
            if which == "fieldgate":
                gw = Fieldgate(workdir, **common, **fg_extra)
            else:
                gw = Peer(workdir, **common, venv=Path(args.peer_venv))
            gw.cpus = pin.gateway if pin is not None else None
            sub = Subscriber(broker.port, gw.topic, gw.fmt, units, args.registers)
            try:
                yield Rig(workdir, units, args.registers, args.interval, sim, broker, gw, sub, pin)
            finally:
                gw.stop()
                sub.close()
        finally:
            await broker.aclose()
            sim.close()


def pin_report(r: Rig) -> dict[str, Any] | None:
    """--pin: the plan and each part's ``Cpus_allowed_list`` as read now (None unpinned)."""
    if r.pin is None:
        return None
    plan = r.pin.as_json()
    gw_threads = {
        f"{pid}/{tid}": allowed_cpus(pid, tid) for pid in r.gw.pids for tid in _threads(pid)
    }
    parts = {
        "simulator": r.sim.proc.pid if r.sim.proc is not None else None,
        "mosquitto": r.broker.pid,
        "subscriber": r.sub.proc.pid,
        "harness": os.getpid(),
    }
    read: dict[str, Any] = {
        "gateway": allowed_cpus(r.gw.pids[0]),
        "gateway_threads": sorted({v for v in gw_threads.values() if v is not None}),
        "gateway_thread_count": len(gw_threads),
        **{name: allowed_cpus(pid) if pid else None for name, pid in parts.items()},
        "harness_threads": sorted(
            {v for t in _threads(os.getpid()) if (v := allowed_cpus(os.getpid(), t)) is not None}
        ),
    }
    ok = (
        read["gateway"] == plan["gateway"]
        and read["gateway_threads"] == [plan["gateway"]]
        and all(read[name] == plan["rest"] for name in parts)
        and read["harness_threads"] == [plan["rest"]]
    )
    return {**plan, "read": read, "ok": ok}


async def drain(
    r: Rig, expected_points: int, quiet_s: float = 10.0, limit_s: float = 180.0
) -> dict[str, Any]:
    """Wait until the subscriber has every expected point, or nothing has arrived for quiet_s
    (counted from the later of the last arrival and the start of the wait), or limit_s."""
    started = time.time()
    deadline = time.monotonic() + limit_s
    while True:
        st = r.sub.ask("stats")
        if st["points"] - st["dups"] - st["redelivered"] >= expected_points:
            return st
        if time.time() - max(st["last_arrival"], started) > quiet_s:
            return st
        if time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.25)  # polling another process: nothing to await


def account(r: Rig, polls: dict[int, int], st: dict[str, Any]) -> dict[str, Any]:
    """Lost and duplicated points against the polls the simulator answered."""
    got = r.sub.ask("polls")
    whole = {int(u): [c for c, _ts, _at in v] for u, v in got["whole"].items()}
    expected = sum(polls.values()) * r.registers
    lost_polls: dict[int, list[int]] = {}
    for u, n in polls.items():
        have = set(whole.get(u, []))
        missing = [c for c in range(1, n + 1) if c not in have]
        if missing:
            lost_polls[u] = missing
    distinct = st["points"] - st["dups"] - st["redelivered"]
    return {
        "polls_answered": sum(polls.values()),
        "points_expected": expected,
        "points_received": st["points"],
        "duplicates": st["dups"],
        "broker_redeliveries_to_subscriber": st["redelivered"],
        "lost": max(expected - distinct, 0),
        "polls_not_whole": sum(len(v) for v in lost_polls.values()),
        "lost_polls": {u: v[:10] for u, v in list(lost_polls.items())[:10]},
        "open_groups": got["open"],
        "errors": st["errors"],
        "_whole": got["whole"],
        "_lost_polls": lost_polls,  # all of them (the printed "lost_polls" is a sample)
    }


# -- scenarios ------------------------------------------------------------------------------


def commit_override(args: argparse.Namespace) -> dict[str, Any]:
    """fieldgate's ``[store] commit_interval_ms`` when ``--commit-ms`` is given."""
    return {"commit_interval_ms": args.commit_ms} if args.commit_ms else {}


def start_gateway(r: Rig) -> Sampler:
    """Start the gateway under test and sample its RSS and CPU from now on."""
    r.gw.start()
    sampler = Sampler(r.gw.pids)
    sampler.start()
    return sampler


async def scenario_run(which: str, args: argparse.Namespace) -> dict[str, Any]:
    extra = commit_override(args)
    async with rig(which, args, **extra) as r:
        sampler = start_gateway(r)
        await asyncio.sleep(args.warmup)  # let connections and caches settle before measuring
        pinned = pin_report(r)  # after the warm-up: the gateway's threads have all started
        r.sub.ask("mark")
        p0, c0, t0 = r.sub.ask("stats")["points"], sampler.cpu(), time.monotonic()
        rss_from = len(sampler.rss)
        spy = None
        if args.profile:
            # py-spy samples the running gateway from outside (collapsed stacks, GIL holder).
            # Popen is fine here: it returns at once and the harness waits on it below.
            spy = subprocess.Popen(  # noqa: ASYNC220
                [
                    str(Path(sys.executable).with_name("py-spy")),  # the venv's, as installed
                    "record",
                    "-p",
                    str(r.gw.pids[0]),
                    "-d",
                    str(int(args.seconds)),
                    "-f",
                    "raw",
                    "-o",
                    args.profile,
                    "-r",
                    "100",
                    "--gil",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        await asyncio.sleep(args.seconds)  # the measured window
        if spy is not None:
            await asyncio.to_thread(spy.wait)
        st1, c1, t1 = r.sub.ask("stats"), sampler.cpu(), time.monotonic()
        window = t1 - t0
        rss = sampler.rss[rss_from:] or sampler.rss
        polls = r.sim.hush()
        st = await drain(r, sum(polls.values()) * r.registers)
        await sampler.stop()
        acct = account(r, polls, st)
        rc = r.gw.stop()
        delivered = st1["points"] - p0
        cpu_pct = 100 * (c1 - c0) / window
        return {
            "gateway": which,
            "units": len(r.units),
            "registers": r.registers,
            "interval_s": r.interval,
            "offered_points_per_s": len(r.units) * r.registers / r.interval,
            "window_s": round(window, 1),
            "delivered_points_per_s": round(delivered / window),
            "cpu_pct_of_core": round(cpu_pct, 1),
            "cpu_us_per_point": round(1e6 * (c1 - c0) / max(delivered, 1), 2),
            "rss_mib": {"mean": round(sum(rss) / len(rss), 1), "max": round(max(rss), 1)},
            "latency_ms": st1["latency_ms"],
            **({"pinned": pinned} if pinned else {}),
            "exit_code": rc,
            **acct,
        }


async def scenario_idle(which: str, args: argparse.Namespace) -> dict[str, Any]:
    args = argparse.Namespace(**{**vars(args), "units": 1})
    extra = {"health": True} if args.health else {}
    async with rig(which, args, **extra) as r:
        sampler = start_gateway(r)
        await asyncio.sleep(args.seconds)  # idle: one device polled, nothing else happens
        pinned = pin_report(r)
        await sampler.stop()
        st = r.sub.ask("stats")
        return {
            "gateway": which,
            "health_endpoint": bool(extra),
            "units": 1,
            "registers": r.registers,
            "interval_s": r.interval,
            "seconds": args.seconds,
            "points_received": st["points"],
            "rss_mib": {"end": round(sampler.rss[-1], 1), "max": round(max(sampler.rss), 1)},
            **({"pinned": pinned} if pinned else {}),
        }


def first_delivery_median(each: Sequence[float | None]) -> float | None:
    """The median first delivery over outages; an outage with none before the next one counts
    as later than all the others (None when that is where the median falls)."""
    if not each:
        return None
    s = sorted(float("inf") if x is None else x for x in each)
    mid = len(s) // 2
    m = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
    return None if m == float("inf") else round(m, 3)


def outage_figures(
    whole: dict[str, list[list[int]]],
    down_ms: int,
    up_ms: int,
    until_ms: int | None,
    *,
    registers: int,
    live_points_per_s: float,
) -> dict[str, float | None]:
    """One outage's reconnect and catch-up, seen from the subscriber (arrival times, ms).

    First delivery: the first poll taken after the broker went down (so never a copy of an
    older message the broker redelivers from its saved queue) that arrived after the broker was
    back, before the next outage. Caught up: the last poll taken during the outage arrived
    (when that was only after the next outage, its figure includes that outage).

    Drain rate: points per second leaving the gateway while it catches up, i.e. the polls taken
    since the broker went down that arrived whole between the first delivery and the caught-up
    arrival (both included; the backlog plus the live polls taken meanwhile), ``registers``
    points each, over that span; ``drain_vs_live`` is that over ``live_points_per_s``, the
    offered rate. None when the span is empty or reaches into the next outage (a rate over a
    window with the broker down again would say nothing about draining). A small backlog
    leaves in one burst of a few ms: the figure is then that burst's rate, not a sustained one.
    """
    end = until_ms if until_ms is not None else 1 << 62
    polls = [(ts, at) for v in whole.values() for _c, ts, at in v]
    after = [at for ts, at in polls if ts >= down_ms and up_ms <= at < end]
    during = [at for ts, at in polls if down_ms <= ts < up_ms]
    first = round((min(after) - up_ms) / 1000, 2) if after else None
    caught = round((max(during) - up_ms) / 1000, 2) if during else None
    drain: float | None = None
    if after and during and min(after) < max(during) < end:
        first_at, caught_at = min(after), max(during)
        n = sum(1 for ts, at in polls if ts >= down_ms and first_at <= at <= caught_at)
        drain = n * registers / ((caught_at - first_at) / 1000)
    return {
        "first_delivery_after_broker_up_s": first,
        "caught_up_s": caught,
        "caught_up_after_reconnect_s": (
            round(caught - first, 2) if caught is not None and first is not None else None
        ),
        "drain_points_per_s": round(drain) if drain is not None else None,
        "drain_vs_live": (
            round(drain / live_points_per_s, 2) if drain is not None and live_points_per_s else None
        ),
    }


async def scenario_outage(which: str, args: argparse.Namespace) -> dict[str, Any]:
    """``--outages N`` broker outages of ``--down`` s each, ``--up`` s apart (default: as long
    as the outage): the first delivery after each return, and their median."""
    extra = commit_override(args)
    outages = max(1, args.outages)
    if args.kill and outages > 1:
        raise SystemExit("--kill takes one outage (--outages 1)")
    up_s = args.up if args.up is not None else args.down
    async with rig(which, args, **extra) as r:
        sampler = start_gateway(r)
        await asyncio.sleep(args.warmup)
        pinned = pin_report(r)
        durable: dict[int, int] = {}
        spans: list[tuple[float, float]] = []  # (down, up) wall times
        for i in range(outages):
            await r.broker.stop()  # SIGTERM: it saves the subscriber's session; clients lose it
            down_at = time.time()
            if args.kill:
                await asyncio.sleep(args.down / 2)  # the outage, half way
                r.gw.kill()
                if isinstance(r.gw, Fieldgate):
                    durable = r.gw.durable_counters()
                await sampler.stop()
                sampler = start_gateway(r)
                await asyncio.sleep(args.down / 2)
            else:
                await asyncio.sleep(args.down)  # the outage
            await r.broker.start()
            spans.append((down_at, time.time()))
            # Catching up, then live again, until the next outage (the last: as long as one).
            await asyncio.sleep(up_s if i + 1 < outages else max(up_s, args.down))
        if pinned is not None:
            # Again at the end: the broker restarted (and with --kill, the gateway).
            end = pin_report(r)
            assert end is not None
            pinned = {**pinned, "read_end": end["read"], "ok": pinned["ok"] and end["ok"]}
        polls = r.sim.hush()
        # A gateway may still be waiting out its reconnect backoff: allow it a long silence.
        st = await drain(r, sum(polls.values()) * r.registers, quiet_s=60.0)
        await sampler.stop()
        acct = account(r, polls, st)
        live = len(r.units) * r.registers / r.interval
        each = []
        for i, (down_at, up_at) in enumerate(spans):
            nxt = int(spans[i + 1][0] * 1000) if i + 1 < len(spans) else None
            figures = outage_figures(
                acct["_whole"],
                int(down_at * 1000),
                int(up_at * 1000),
                nxt,
                registers=r.registers,
                live_points_per_s=live,
            )
            each.append({"down_s": round(up_at - down_at, 1), **figures})
        each_first = [e["first_delivery_after_broker_up_s"] for e in each]
        firsts = [float(x) for x in each_first if x is not None]
        down_s = spans[0][1] - spans[0][0]
        out: dict[str, Any] = {
            "gateway": which,
            "units": len(r.units),
            "registers": r.registers,
            "interval_s": r.interval,
            "down_s": round(down_s, 1),
            "outages": outages,
            "up_between_s": up_s,
            "killed": args.kill,
            **({"commit_interval_ms": args.commit_ms} if extra else {}),
            "backlog_points": round(down_s * len(r.units) * r.registers / r.interval),
            # The first outage's figures under the names earlier runs used.
            **{k: each[0][k] for k in ("caught_up_s", "first_delivery_after_broker_up_s")},
            "caught_up_after_reconnect_s": each[0]["caught_up_after_reconnect_s"],
            "offered_points_per_s": live,
            "drain_points_per_s": each[0]["drain_points_per_s"],
            "drain_vs_live": each[0]["drain_vs_live"],
            "first_delivery_s_each": each_first,
            "first_delivery_s_median": first_delivery_median(each_first),
            "first_delivery_s_max": max(firsts) if firsts else None,
            "outages_without_delivery": len(each) - len(firsts),
            "caught_up_after_reconnect_s_each": [e["caught_up_after_reconnect_s"] for e in each],
            "drain_points_per_s_each": [e["drain_points_per_s"] for e in each],
            "drain_vs_live_each": [e["drain_vs_live"] for e in each],
            **({"pinned": pinned} if pinned else {}),
            "rss_mib_max": round(max(sampler.rss), 1) if sampler.rss else None,
            **acct,
        }
        if durable:
            lost_durable = sum(
                1 for u, cs in acct["_lost_polls"].items() for c in cs if c <= durable.get(u, 0)
            )
            out["lost_polls_that_were_durable"] = lost_durable
        out["exit_code"] = r.gw.stop()
        return out


async def scenario_suite(which: str, args: argparse.Namespace) -> dict[str, Any]:
    """Every figure BENCHMARKS.md reports, for one gateway."""

    def with_(**kw: Any) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), **kw})

    out: dict[str, Any] = {"gateway": which}
    out["idle"] = await scenario_idle(which, with_(seconds=args.idle_seconds, interval=1.0))
    if which == "fieldgate":
        out["idle_with_health"] = await scenario_idle(
            which, with_(seconds=args.idle_seconds, interval=1.0, health=True)
        )
    out["load_25k"] = await scenario_run(which, with_(units=200, interval=1.0))
    if len(os.sched_getaffinity(0)) >= 2 and shutil.which("taskset"):
        # The same load with the gateway alone on CPU 0 and the rig on the others (--pin).
        out["load_25k_pinned"] = await scenario_run(which, with_(units=200, interval=1.0, pin=True))
    out["load_high"] = await scenario_run(
        which, with_(units=args.high_units, interval=args.high_interval)
    )
    if which == "fieldgate":
        # The latency target with a shorter group commit (the peer has no such knob: its
        # storage commits every 100 ms). The default 250 ms spares an SD card fsyncs.
        out["latency_25k"] = await scenario_run(
            which, with_(units=200, interval=1.0, commit_ms=args.latency_commit_ms)
        )
    out["outage"] = await scenario_outage(which, with_(units=200, interval=1.0, kill=False))
    out["outage_kill"] = await scenario_outage(
        which, with_(units=200, interval=1.0, kill=True, outages=1)
    )
    for v in out.values():
        if isinstance(v, dict):
            v.pop("_whole", None)
            v.pop("_lost_polls", None)
    return out


SCENARIOS = {
    "run": scenario_run,
    "idle": scenario_idle,
    "outage": scenario_outage,
    "suite": scenario_suite,
}


async def main_async(args: argparse.Namespace) -> None:
    which = ["fieldgate", "peer"] if args.gateway == "both" else [args.gateway]
    results = []
    for w in which:
        res = await SCENARIOS[args.scenario](w, args)
        res.pop("_whole", None)
        res.pop("_lost_polls", None)
        print(json.dumps(res), flush=True)
        results.append(res)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")  # noqa: ASYNC240


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--gateway", choices=["fieldgate", "peer", "both"], default="fieldgate")
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--registers", type=int, default=125)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--down", type=float, default=30.0, help="outage: seconds the broker is down")
    ap.add_argument(
        "--outages", type=int, default=1, help="outage: how many outages, one after the other"
    )
    ap.add_argument(
        "--up",
        type=float,
        default=None,
        help="outage: seconds the broker stays up after each outage (default: --down)",
    )
    ap.add_argument("--kill", action="store_true")
    ap.add_argument("--health", action="store_true", help="idle: fieldgate with /health on")
    ap.add_argument("--commit-ms", type=int, default=None)
    ap.add_argument(
        "--peer-venv", default=str(Path.home() / ".cache" / "fieldgate-bench" / "tbgateway-3.8.5")
    )
    ap.add_argument("--idle-seconds", type=float, default=60.0, help="suite: the idle run")
    ap.add_argument(
        "--latency-commit-ms",
        type=int,
        default=25,
        help="suite: fieldgate's commit_interval_ms in the latency run",
    )
    ap.add_argument("--high-units", type=int, default=100, help="suite: the high-rate run")
    ap.add_argument("--high-interval", type=float, default=0.1, help="suite: the high-rate run")
    ap.add_argument("--profile", help="py-spy collapsed stacks of the gateway to this file")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the gateway alone on CPU 0, the simulator, mosquitto, subscriber and harness on "
        "the other CPUs (taskset; needs 2 CPUs or more)",
    )
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if args.pin:
        try:
            pin_plan(os.sched_getaffinity(0))
        except ValueError as e:
            ap.error(str(e))
        if shutil.which("taskset") is None:
            ap.error("--pin needs taskset (util-linux) on PATH")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
