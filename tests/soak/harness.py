"""The soak: ``fieldgate run`` as a child process, killed with SIGKILL at random moments while
every service fails at random, then a final drain and the verdict.

Shared by the CI test (tests/soak/test_soak_short.py) and the long run (bench/soak.py)::

    report = await Soak(tmp_path, SoakPlan(kills=8, seed=3)).run()
    print(report.format()); assert report.lost == 0

One run:

1. the stand-ins start (tests/soak/stand.py) and the store is created with its capture log
   (tests/soak/verify.py explains how that tells what was captured);
2. ``kills`` cycles, chaos on: start the daemon, wait for a moment chosen by a seeded RNG (a
   service has received k more items, a request is held in flight, an import is running, the
   daemon just opened its store or became ready, Vanda stored a batch whose answer was lost),
   then SIGKILL. Every ``drain_every``-th cycle runs with the sources off until the store has
   delivered and pruned everything, and kills it then: the next start finds an empty store;
3. chaos off, a last run with the sources off until every uplink's backlog is 0, SIGTERM;
4. compare the capture log with what each service holds.

Moments are picked by waiting on conditions (emulator ``wait_for``, the daemon's log events,
/status), each bounded by ``kill_wait_s``: if the moment does not come (the uplink is backing
off), the daemon is killed anyway and the cycle counts as "(timeout)".
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil  # type: ignore[import-untyped]  # no stubs in the venv (types-psutil)

from ..integration.daemon import Daemon
from .soakconfig import TOKEN_ENV, UPLINKS, SoakPlan, render
from .stand import TIMEOUT_DELAY_S, Stand
from .verify import UplinkResult, prepare_store, read_captured, verify

#: Kill moments and how often each is drawn.
MOMENTS: dict[str, int] = {
    "startup": 2,
    "qatium-rows": 2,
    "mqtt-acks": 2,
    "datacooee-uploads": 1,
    "nilu-packets": 1,
    "vanda-items": 1,
    "in-flight": 3,
    "import-running": 1,
    "stored-unanswered": 1,
}


@dataclass(frozen=True, slots=True)
class RssSample:
    at_s: float  # since the soak started
    run: int
    rss: int


@dataclass(slots=True)
class Report:
    plan: SoakPlan
    kills: int = 0
    kill_moments: Counter[str] = field(default_factory=Counter)
    runs: int = 0
    captured: int = 0
    captured_by_source: dict[str, int] = field(default_factory=dict)
    captured_twice: int = 0
    uplinks: list[UplinkResult] = field(default_factory=list)
    chaos: Counter[str] = field(default_factory=Counter)
    answers: dict[str, dict[str, int]] = field(default_factory=dict)
    log_errors: Counter[str] = field(default_factory=Counter)
    unexpected_exits: list[str] = field(default_factory=list)
    rss: list[RssSample] = field(default_factory=list)
    drain_left: dict[str, int] = field(default_factory=dict)
    final_rc: int | None = None
    duration_s: float = 0.0

    @property
    def lost(self) -> int:
        return sum(u.lost for u in self.uplinks)

    @property
    def mismatched(self) -> int:
        return sum(u.mismatched for u in self.uplinks)

    def format(self) -> str:
        lines = [
            f"soak: seed {self.plan.seed}, {len(self.plan.fast_series)} series at "
            f"{self.plan.fast_hz:g} Hz + 2 at {self.plan.slow_hz:g} Hz + river logger "
            f"({self.plan.logger_hz:g} records/s), {self.duration_s:.0f} s",
            f"kills survived: {self.kills} (SIGKILL) in {self.runs} runs; moments: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.kill_moments.items())),
            f"readings captured: {self.captured} ("
            + ", ".join(f"{k} {v}" for k, v in sorted(self.captured_by_source.items()))
            + f"); committed twice: {self.captured_twice}",
            f"readings lost: {self.lost}   values mismatched: {self.mismatched}",
            f"{'uplink':<11}{'unit':<22}{'expected':>9}{'delivered':>10}{'lost':>6}"
            f"{'dupl.':>7}{'mism.':>6}{'unexp.':>7}{'dead':>6}",
        ]
        for u in self.uplinks:
            lines.append(
                f"{u.name:<11}{u.unit:<22}{u.expected:>9}{u.delivered:>10}{u.lost:>6}"
                f"{u.duplicates:>7}{u.mismatched:>6}{u.unexpected:>7}{u.dead_letters:>6}"
            )
            if u.lost_examples:
                lines.append(f"    lost e.g. {', '.join(u.lost_examples)}")
            if u.mismatch_examples:
                lines.append(f"    mismatched e.g. {'; '.join(u.mismatch_examples)}")
            if u.dead_letters:
                lines.append(f"    dead-letter reason e.g. {u.dead_letter_reason[:160]}")
        lines.append(
            "faults injected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.chaos.items()))
        )
        lines.append(
            "service answers: "
            + "; ".join(
                f"{name} " + " ".join(f"{s}:{n}" for s, n in sorted(c.items()))
                for name, c in self.answers.items()
            )
        )
        if self.log_errors:
            lines.append(
                "daemon error events: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.log_errors.items()))
            )
        if self.unexpected_exits:
            lines.append("unexpected daemon exits: " + "; ".join(self.unexpected_exits))
        if self.drain_left:
            lines.append(f"final drain incomplete, backlog left: {self.drain_left}")
        lines.append(f"final run exit code (SIGTERM): {self.final_rc}")
        if self.rss:
            mib = [s.rss / 2**20 for s in self.rss]
            peaks: dict[int, float] = {}
            for s in self.rss:
                peaks[s.run] = max(peaks.get(s.run, 0.0), s.rss / 2**20)
            lines.append(
                f"daemon RSS (psutil, every {self.plan.rss_every_s:g} s, {len(mib)} samples): "
                f"first {mib[0]:.1f} MiB, max {max(mib):.1f} MiB, last {mib[-1]:.1f} MiB; "
                "peak per run: " + " ".join(f"{v:.0f}" for v in peaks.values())
            )
        return "\n".join(lines)


class Soak:
    """One soak run (module docstring). ``say`` receives a progress line per cycle."""

    def __init__(
        self, workdir: Path, plan: SoakPlan, say: Callable[[str], None] | None = None
    ) -> None:
        self.workdir = workdir
        self.plan = plan
        self.say = say or (lambda _line: None)
        self.rng = random.Random(plan.seed)
        self.db = workdir / "fg.db"
        self.report = Report(plan)
        self._t0 = time.monotonic()
        self._run_no = 0
        #: The stand-ins of the last run, kept (stopped) for a post-mortem of what they recorded.
        self.stand: Stand | None = None

    async def run(self) -> Report:
        self._t0 = time.monotonic()
        async with Stand(self.workdir, self.plan) as stand:
            self.stand = stand
            await prepare_store(self.db, self.plan.routes())
            live = self.workdir / "live.toml"
            drain = self.workdir / "drain.toml"
            live.write_text(render(self.plan, stand.endpoints, self.db, sources=True))
            drain.write_text(render(self.plan, stand.endpoints, self.db, sources=False))
            stand.start_chaos()
            started = time.monotonic()
            every = self.plan.drain_every
            for cycle in range(1, self.plan.kills + 1):
                if (
                    self.plan.max_kill_loop_s
                    and time.monotonic() - started > self.plan.max_kill_loop_s
                ):
                    break
                if every and cycle % every == 0:
                    moment = await self._cycle(drain, stand, drained=True)
                else:
                    moment = await self._cycle(live, stand, drained=False)
                self.say(
                    f"kill {cycle}/{self.plan.kills}: {moment} "
                    f"(t={time.monotonic() - self._t0:.0f} s)"
                )
            await stand.calm()
            await self._final(drain)
            self._collect(stand)
        self.report.duration_s = time.monotonic() - self._t0
        return self.report

    # -- one daemon run ----------------------------------------------------------------------

    async def _start(self, config: Path) -> tuple[Daemon, asyncio.Task[None]]:
        self._run_no += 1
        self.report.runs += 1
        d = Daemon(config, env=TOKEN_ENV)
        await d.start()
        sampler = asyncio.create_task(self._sample_rss(d, self._run_no), name="soak:rss")
        return d, sampler

    async def _end(self, d: Daemon, sampler: asyncio.Task[None], *, kill: bool) -> int:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError, AssertionError):
            await sampler  # AssertionError: the daemon died before READY (reported below)
        if d.proc is not None and d.proc.returncode is not None:
            self.report.unexpected_exits.append(
                f"run {self._run_no} exited {d.proc.returncode}: {d.raw[-3:]}"
            )
        rc = await (d.kill() if kill else d.terminate())
        # Kept for a post-mortem (the workdir is the test's tmp_path).
        (self.workdir / f"daemon-{self._run_no:03d}.log").write_text("\n".join(d.raw) + "\n")
        for e in d.events:
            if e.get("level") in ("error", "critical"):
                self.report.log_errors[str(e.get("event"))] += 1
        if kill and rc == -9:
            self.report.kills += 1
        return rc

    async def _cycle(self, config: Path, stand: Stand, *, drained: bool) -> str:
        d, sampler = await self._start(config)
        try:
            if drained:
                moment = await self._until_drained(d, empty_store=True)
            else:
                moment = await self._moment(d, stand)
        except AssertionError as exc:  # the daemon exited on its own (Daemon.wait_event)
            moment = f"daemon gone: {str(exc)[:200]}"
        finally:
            await self._end(d, sampler, kill=True)
        self.report.kill_moments[moment.split(" ")[0]] += 1
        return moment

    async def _final(self, drain: Path) -> None:
        d, sampler = await self._start(drain)
        try:
            left = await self._wait_drained(d, empty_store=False, timeout=self.plan.drain_timeout_s)
            self.report.drain_left = left
        finally:
            self.report.final_rc = await self._end(d, sampler, kill=False)

    async def _sample_rss(self, d: Daemon, run: int) -> None:
        # From READY on: before it the child is still importing (a few MiB, not the daemon).
        await d.wait_event("gateway_ready", timeout=60)
        assert d.proc is not None
        proc = psutil.Process(d.proc.pid)
        while True:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                return
            self.report.rss.append(RssSample(time.monotonic() - self._t0, run, rss))
            await asyncio.sleep(self.plan.rss_every_s)

    # -- kill moments ------------------------------------------------------------------------

    async def _moment(self, d: Daemon, stand: Stand) -> str:
        """Wait for a randomly chosen moment; returns its name ("... (timeout)" if it never
        came within ``kill_wait_s``)."""
        rng = self.rng
        name = rng.choices(list(MOMENTS), weights=list(MOMENTS.values()))[0]
        limit = self.plan.kill_wait_s
        if name == "startup":
            # Right after the store opened (preflight, quick_check done), or at READY.
            event = rng.choice(["health_listening", "gateway_ready"])
            await d.wait_event(event, timeout=30)
            return f"startup ({event})"
        await d.wait_event("gateway_ready", timeout=30)
        q, nilu, vanda, dc = stand.qatium, stand.nilu, stand.vanda, stand.datacooee
        front, imp = stand.broker, stand.importer
        try:
            match name:
                case "qatium-rows":
                    n = len(q.rows) + rng.randint(1, 6000)
                    await q.wait_for(lambda: len(q.rows) >= n, timeout=limit)
                case "mqtt-acks":
                    n = len(front.stored) + rng.randint(1, 150)
                    await front.wait_for(lambda: len(front.stored) >= n, timeout=limit)
                case "datacooee-uploads":
                    n = len(dc.accepted) + rng.randint(1, 60)
                    await dc.wait_for(lambda: len(dc.accepted) >= n, timeout=limit)
                case "nilu-packets":
                    n = len(nilu.packets) + rng.randint(1, 8)
                    await nilu.wait_for(lambda: len(nilu.packets) >= n, timeout=limit)
                case "vanda-items":
                    n = len(vanda.received) + rng.randint(1, 80)
                    await vanda.wait_for(lambda: len(vanda.received) >= n, timeout=limit)
                case "in-flight":
                    # Hold one request past the uplink's timeout; kill while it waits.
                    target = rng.choice(["qatium", "nilu", "vanda", "datacooee"])
                    emu = stand.http_emulators[target]
                    before = emu.faults.injected["delay"]
                    emu.faults.delay_next(1, TIMEOUT_DELAY_S)
                    name = f"in-flight:{target}"
                    await emu.wait_for(lambda: emu.faults.injected["delay"] > before, timeout=limit)
                case "import-running":
                    seen = set(imp.imports)
                    await imp.wait_for(
                        lambda: any(
                            j.status in ("validating", "ingesting")
                            for i, j in imp.imports.items()
                            if i not in seen
                        ),
                        timeout=limit,
                    )
                case "stored-unanswered":
                    before = vanda.status_counts[None]
                    vanda.drop_answer_next(1)
                    await vanda.wait_for(lambda: vanda.status_counts[None] > before, timeout=limit)
        except TimeoutError:
            return f"{name} (timeout)"
        return name

    async def _until_drained(self, d: Daemon, *, empty_store: bool) -> str:
        left = await self._wait_drained(
            d, empty_store=empty_store, timeout=self.plan.drain_timeout_s
        )
        return "drained-store" if not left else f"drained-store (timeout, left {left})"

    async def _wait_drained(
        self, d: Daemon, *, empty_store: bool, timeout: float
    ) -> dict[str, int]:
        """Poll /status until the five uplinks have no backlog (and, with ``empty_store``, the
        store pruned every reading). Returns what is left at the deadline (empty: drained)."""
        base = await d.health_url()
        left: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            while True:
                st: dict[str, Any] = (await client.get("/status")).json()
                left = {
                    n: int(st["uplinks"][n]["backlog"])
                    for n in UPLINKS
                    if st["uplinks"][n]["backlog"]
                }
                if empty_store and st["store"]["readings_stored"]:
                    left["store"] = int(st["store"]["readings_stored"])
                if not left or time.monotonic() > deadline:
                    return left
                await asyncio.sleep(0.2)  # polling a condition: /status is the daemon's view

    # -- the verdict -------------------------------------------------------------------------

    def _collect(self, stand: Stand) -> None:
        captured = read_captured(self.db)
        r = self.report
        r.captured = len(captured.readings)
        r.captured_twice = captured.twice
        by_source: Counter[str] = Counter()
        for series, n in captured.per_series.items():
            by_source[series.split(".", 1)[0]] += n
        r.captured_by_source = dict(by_source)
        r.uplinks = verify(self.plan, stand, captured, self.db)
        r.chaos = Counter(stand.chaos_counts)
        for name, emu in stand.http_emulators.items():
            r.answers[name] = {str(k): v for k, v in emu.status_counts.items()}
        r.answers["mqtt"] = {
            "connects": stand.broker.connects,
            "broker-starts": stand.mosquitto.starts,
            "stored": len(stand.broker.stored),
        }
