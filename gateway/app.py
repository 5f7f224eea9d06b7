"""The supervisor: builds every part from the config, owns every task in one TaskGroup, and
shuts down in order.

Start-up: open the store (moving an unusable file aside), attach the clock to it, start the
health server, tell systemd READY. Tasks: ``store:writer`` (group commits and maintenance),
``clock`` (sync state, steps, timestamp repair), ``poll:<source>`` per source, ``uplink:<name>``
per uplink, ``watchdog``. Every reading a source emits is stamped by the clock on its way into
the store (gateway/clock.py). A source or uplink task that raises is restarted with capped,
jittered backoff and reported in /status; it never takes the process down. Only a corrupt store
is fatal (exit 1: the next start moves the file aside).

Shutdown (SIGTERM/SIGINT): STOPPING; stop polling; commit what the sources handed over; cancel
the uplinks (in-flight sends are abandoned and their readings stay pending); close the store
(clean-shutdown mark) and the health server. Exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway import __version__
from gateway.backoff import Backoff
from gateway.clock import Clock
from gateway.config import LoadedConfig
from gateway.errors import StoreCorrupt
from gateway.models import Position, Reading
from gateway.sources.base import Emit, Source
from gateway.sources.position import PositionBoard, positioned_emit
from gateway.sources.registry import build_source
from gateway.sources.serial.config import NmeaConfig
from gateway.store import Store
from gateway.systemd import Notifier, watchdog_interval
from gateway.uplinks.dispatch import UplinkRunner
from gateway.uplinks.registry import build_uplink

if TYPE_CHECKING:  # imported when enabled (see Gateway.run): aiohttp weighs ~10 MiB of RSS
    from gateway.health import HealthServer

log = structlog.get_logger(__name__)

#: How long shutdown waits for the last commit before giving up on it (it stays buffered).
SHUTDOWN_FLUSH_S = 5.0


@dataclass(slots=True)
class TaskInfo:
    state: str = "starting"
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


class Gateway:
    """One gateway process. ``await run()`` until ``stop`` is set (or a signal arrives)."""

    def __init__(
        self, loaded: LoadedConfig, *, notifier: Notifier | None = None, clock: Clock | None = None
    ) -> None:
        """``clock``: tests pass one with fake clocks and sync probe; else built from [clock]."""
        self.loaded = loaded
        self.cfg = loaded.settings
        self.notifier = notifier or Notifier()
        self.clock = clock or Clock(self.cfg.clock)
        self.store: Store | None = None
        self.sources: list[Source] = []
        self.positions = PositionBoard()
        self.runners: list[UplinkRunner] = []
        self.health_server: HealthServer | None = None
        self.tasks: dict[str, TaskInfo] = {}
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.fatal: str | None = None

    # ------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until stopped. Returns the process exit code."""
        for w in self.loaded.warnings:
            log.warning("config_warning", detail=w)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            # SIGHUP's default would end the process at once, unclean. There is no reload
            # yet (the unit has no ExecReload=): say so and go on.
            loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        uplink_cfgs = [(i, u) for i, u in enumerate(self.cfg.uplinks) if u.enabled]
        routes = {u.name: u.routed_series() for _, u in uplink_cfgs}
        self.store = store = await Store.open(self.cfg.store, routes)
        try:
            await self.clock.start(store)  # before any source runs: it stamps every reading
            source_cfgs = [s for s in self.cfg.sources if s.enabled]
            base_dir = self.loaded.path.parent if self.loaded.path else Path.cwd()
            self.sources = [
                build_source(s, base_dir=base_dir, positions=self.positions) for s in source_cfgs
            ]
            self._source_cfgs = {s.name: s for s in source_cfgs}
            uplinks = [build_uplink(u) for _, u in uplink_cfgs]
            self.runners = [
                UplinkRunner(up, cfg, store, self.clock)
                for up, (_, cfg) in zip(uplinks, uplink_cfgs, strict=True)
            ]
            if self.cfg.health.enabled:
                # Imported only when enabled: aiohttp and prometheus-client weigh ~15 MiB of RSS.
                from gateway.health import HealthServer  # noqa: PLC0415

                self.health_server = HealthServer(self.cfg.health, self)
                try:
                    await self.health_server.start()
                except OSError as exc:
                    log.error(
                        "health_bind_failed",
                        host=self.cfg.health.host,
                        port=self.cfg.health.port,
                        error=str(exc),
                    )
                    self.health_server = None
            return await self._supervise_all(store)
        finally:
            await self._close(store)

    def _on_hangup(self) -> None:
        log.warning(
            "sighup_ignored",
            detail="reloading the config is not supported: restart fieldgate to apply changes",
        )

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("shutdown_requested", signal=sig.name)
        self.stop_event.set()

    async def _supervise_all(self, store: Store) -> int:
        exit_code = 0
        async with asyncio.TaskGroup() as tg:
            writer = tg.create_task(self._store_writer(store), name="store:writer")
            clock = tg.create_task(self._supervise("clock", self.clock.run), name="clock")
            source_tasks = [
                tg.create_task(
                    self._supervise(f"poll:{s.name}", self._source_runner(s)), name=f"poll:{s.name}"
                )
                for s in self.sources
            ]
            uplink_tasks = [
                tg.create_task(self._supervise(f"uplink:{r.name}", r.run), name=f"uplink:{r.name}")
                for r in self.runners
            ]
            watchdog = tg.create_task(self._watchdog(store), name="watchdog")
            self.notifier.ready()
            self.ready.set()
            log.info(
                "gateway_ready",
                version=__version__,
                sources=len(self.sources),
                uplinks=len(self.runners),
                store=str(store.path),
            )

            stop = asyncio.create_task(self.stop_event.wait(), name="stop-wait")
            await asyncio.wait([stop, writer], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if self.fatal is not None:
                exit_code = 1
            self.notifier.stopping()
            await _cancel_all(source_tasks)
            if not writer.done():
                try:
                    async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                        await store.flush()
                except TimeoutError:
                    log.error("shutdown_flush_timeout", buffered=store.stats()["buffered"])
            # The clock writes repairs through the store: stopped before the store's writer.
            await _cancel_all([*uplink_tasks, clock])
            await _cancel_all([writer, watchdog])
        return exit_code

    async def _store_writer(self, store: Store) -> None:
        try:
            await store.run()
        except StoreCorrupt as exc:
            # Exit non-zero; systemd restarts us and the next open moves the file aside.
            log.error(
                "store_corrupt",
                error=str(exc),
                action="exiting; the next start moves the database aside",
            )
            self.fatal = str(exc)
            self.stop_event.set()

    def _source_runner(self, source: Source) -> Callable[[], Awaitable[None]]:
        emit = self._emit_for(source)

        async def run() -> None:
            await source.run(emit)

        return run

    def _emit_for(self, source: Source) -> Emit:
        assert self.store is not None
        store = self.store
        stamp = self.clock.stamp
        cfg = self._source_cfgs[source.name]
        prompt = cfg.commit == "prompt"

        async def emit(readings: Sequence[Reading]) -> None:
            # The clock stamps right before the readings join the queue (ids known, in order).
            await store.ingest(readings, prepare=stamp, prompt=prompt)

        p = cfg.position
        fixed = Position(p.lat, p.lon, p.alt) if p is not None else None
        if cfg.stamps_own_position:
            fixed = None  # e.g. the synthetic source stamps its fixed position itself
        gps = next(
            (
                s
                for s in self.cfg.sources
                if isinstance(s, NmeaConfig) and s.name == cfg.position_from
            ),
            None,
        )
        max_age = gps.max_fix_age_s if gps is not None else 10.0
        return positioned_emit(
            emit, self.positions, position_from=cfg.position_from, fixed=fixed, max_age_s=max_age
        )

    async def _supervise(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        info = self.tasks.setdefault(name, TaskInfo())
        backoff = Backoff(1.0, 60.0)
        while True:
            started = time.monotonic()
            info.state = "running"
            try:
                await run()
                info.state = "finished"
                return
            except asyncio.CancelledError:
                info.state = "stopped"
                raise
            except Exception as exc:
                if time.monotonic() - started > 60:
                    backoff.reset()
                delay = backoff.next()
                info.state = "restarting"
                info.restarts += 1
                info.last_error = f"{type(exc).__name__}: {exc}"[:500]
                info.last_error_at = time.time()
                log.error(
                    "task_failed",
                    task=name,
                    error=info.last_error,
                    restart_in_s=round(delay, 2),
                    exc_info=exc,
                )
                await asyncio.sleep(delay)

    async def _watchdog(self, store: Store) -> None:
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            # Pinged from the loop itself: a wedged loop or a store that cannot write stops the
            # pings and systemd restarts us. A cloud outage does neither.
            if store.writable():
                self.notifier.watchdog()
            else:
                log.error(
                    "watchdog_withheld", reason="store not writable", error=store.last_commit_error
                )
            await asyncio.sleep(interval)

    async def _close(self, store: Store) -> None:
        async def close_all() -> None:
            for r in self.runners:
                with contextlib.suppress(Exception):
                    await r.uplink.aclose()
            for s in self.sources:
                with contextlib.suppress(Exception):
                    await s.aclose()
            try:
                await store.aclose()
            except Exception as exc:
                log.error("store_close_failed", error=str(exc))
            if self.health_server is not None:
                await self.health_server.aclose()

        # Cleanup must finish even when we got here by cancellation, and must not hang.
        try:
            async with asyncio.timeout(SHUTDOWN_FLUSH_S * 2):
                await asyncio.shield(close_all())
        except TimeoutError:
            log.error("shutdown_close_timeout")
        self.notifier.close()
        log.info("gateway_stopped")

    # ------------------------------------------------------------------------------------------
    # Status and health (read-only)

    def status(self) -> dict[str, Any]:
        store = self.store
        sources = {}
        for s in self.sources:
            d = s.stats.as_dict()
            t = self.tasks.get(f"poll:{s.name}")
            if t is not None and t.state != "running":
                d["state"] = t.state
            if t is not None:
                d["restarts"] = t.restarts
                d["task_error"] = t.last_error
            sources[s.name] = d
        uplinks = {}
        for r in self.runners:
            d = r.status()
            t = self.tasks.get(f"uplink:{r.name}")
            if t is not None:
                d["restarts"] = t.restarts
                d["task_error"] = t.last_error
            uplinks[r.name] = d
        return {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "ready": self.ready.is_set(),
            "sources": sources,
            "uplinks": uplinks,
            "store": store.stats() if store else {},
            "clock": self.clock.status(),
        }

    def health(self) -> tuple[bool, list[str]]:
        reasons: list[str] = []
        problem = self.store.healthy() if self.store is not None else "store not open"
        if problem is not None:
            reasons.append(problem)
        after = self.cfg.health.stuck_after_s
        for r in self.runners:
            if r.stuck(after):
                # Holding for an unsynchronised clock is not a service fault: say which it is.
                why = (
                    "holding readings until the clock is synchronised"
                    if self.store is not None and self.store.held_from(r.name) is not None
                    else f"{r.state.value}: {r.last_error}"
                )
                reasons.append(f"uplink {r.name} has delivered nothing for {after:g}s ({why})")
        return (not reasons, reasons)


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks)
