"""The supervisor: builds every part from the config, owns every task in one TaskGroup, and
shuts down in order.

Start-up: open the store (moving an unusable file aside), attach the clock to it, start the
health server, tell systemd READY. Tasks: ``store:writer`` (group commits and maintenance),
``clock`` (sync state, steps, timestamp repair), ``poll:<source>`` per source, ``uplink:<name>``
per uplink, ``watchdog``. Every reading a source emits is stamped by the clock on its way into
the store (gateway/clock.py). A source or uplink task that raises is restarted with capped,
jittered backoff and reported in /status; it never takes the process down. Only a corrupt store
is fatal (exit 1: the next start moves the file aside).

Reload (SIGHUP, the unit's ``ExecReload=``): the config file is read again (:meth:`Gateway.reload`).
A file with problems is refused, each problem logged as ``check-config`` prints it, and the
running config goes on. Otherwise sources and uplinks are compared by name: removed and changed
ones stop, added and changed ones start, unchanged ones are not touched. A source stops at once
(what it emitted is already in the store's hands and is committed as usual); an uplink first
finishes the request it has in flight and records its outcome (what it had not sent stays
pending), so a reload neither loses nor repeats a reading; then the store's routing follows the
new routes and the new runner starts with the newly loaded secrets. ``[store]``, ``[health]``,
``[log]`` and ``[clock]`` cannot change while running: a change there is logged and shown as
needing a restart. /status ``config`` shows the file's SHA-256, when it was loaded and the last
refusal.

Shutdown (SIGTERM/SIGINT): STOPPING; stop polling; commit what the sources handed over; cancel
the uplinks (in-flight sends are abandoned and their readings stay pending); close the store
(clean-shutdown mark) and the health server. Exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway import __version__, heap
from gateway.backoff import Backoff
from gateway.clock import Clock
from gateway.config import LoadedConfig, Settings, SourceConfig, load_config
from gateway.errors import ConfigError, StoreCorrupt
from gateway.models import Position, Reading
from gateway.sources.base import Emit, Source
from gateway.sources.position import PositionBoard, positioned_emit
from gateway.sources.registry import build_source
from gateway.sources.serial.config import NmeaConfig
from gateway.store import Store
from gateway.systemd import Notifier, watchdog_interval
from gateway.timefields import with_iso_times
from gateway.uplinks.base import Uplink
from gateway.uplinks.dispatch import UplinkRunner
from gateway.uplinks.registry import build_uplink

if TYPE_CHECKING:  # imported when enabled (see Gateway.run): aiohttp weighs ~10 MiB of RSS
    from gateway.health import HealthServer

log = structlog.get_logger(__name__)

#: How long shutdown waits for the last commit before giving up on it (it stays buffered).
SHUTDOWN_FLUSH_S = 5.0
#: Sections a reload cannot apply (the store is open, the endpoint bound, logging and the clock
#: set up): a change there waits for a restart.
RESTART_SECTIONS = ("store", "health", "log", "clock")
#: A reload waits this long past an uplink's own send limit (3 x ``timeout_s``) for its request
#: in flight to be answered and recorded; then it is abandoned (its readings stay pending).
UPLINK_STOP_SLACK_S = 10.0


@dataclass(slots=True)
class TaskInfo:
    state: str = "starting"
    restarts: int = 0
    last_error: str | None = None
    last_error_at: float | None = None


@dataclass(slots=True)
class ConfigInfo:
    """What /status shows under ``config``: the file the running config came from."""

    path: Path | None
    sha256: str | None
    loaded_at: float = field(default_factory=time.time)
    #: Reloads applied since start (a file found unchanged counts too).
    reloads: int = 0
    last_reload_at: float | None = None
    #: Why the last reload was refused (None once one is applied).
    last_reload_error: str | None = None
    #: Sections whose change in the file waits for a restart.
    pending_restart: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path is not None else None,
            "sha256": self.sha256,
            "loaded_at": self.loaded_at,
            "reloads": self.reloads,
            "last_reload_at": self.last_reload_at,
            "last_reload_error": self.last_reload_error,
            "pending_restart": list(self.pending_restart),
        }


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
        path = loaded.path
        self.config = ConfigInfo(path, _sha256(path) if path is not None else None)
        #: Set by SIGHUP; the ``reload`` task applies the file (several signals, one reload).
        self.reload_wanted = asyncio.Event()
        #: Set when a reload failed part-way (not a refused file): /health is 503 until restart.
        self.reload_failed: str | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._source_cfgs: dict[str, SourceConfig] = {}
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self._uplink_tasks: dict[str, asyncio.Task[None]] = {}

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
            # SIGHUP (systemctl reload) reloads the config file; its default would end the
            # process at once, unclean.
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

                # A busy port is retried in the background (logged, in /status once bound).
                self.health_server = HealthServer(self.cfg.health, self, notifier=self.notifier)
                await self.health_server.start_or_retry()
            return await self._supervise_all(store)
        finally:
            await self._close(store)

    def _on_hangup(self) -> None:
        log.info("config_reload_requested", signal="SIGHUP", config=str(self.loaded.path))
        self.reload_wanted.set()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("shutdown_requested", signal=sig.name)
        self.stop_event.set()

    async def _supervise_all(self, store: Store) -> int:
        exit_code = 0
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            writer = tg.create_task(self._store_writer(store), name="store:writer")
            clock = tg.create_task(self._supervise("clock", self.clock.run), name="clock")
            for s in self.sources:
                self._start_source(s)
            for r in self.runners:
                self._start_runner(r)
            watchdog = tg.create_task(self._watchdog(store), name="watchdog")
            reloader = tg.create_task(self._reloader(), name="reload")
            heap.settle()  # what start-up built lives as long as the process (gateway/heap.py)
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
            # A reload in progress stops where it is: everything it started is in the task
            # tables below, everything it stopped is done.
            await _cancel_all([reloader])
            await _cancel_all(list(self._source_tasks.values()))
            if not writer.done():
                try:
                    async with asyncio.timeout(SHUTDOWN_FLUSH_S):
                        await store.flush()
                except TimeoutError:
                    log.error("shutdown_flush_timeout", buffered=store.stats()["buffered"])
            # The clock writes repairs through the store: stopped before the store's writer.
            await _cancel_all([*self._uplink_tasks.values(), clock])
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
            if self.health_server is not None:  # the console's per-series last values
                self.health_server.history.series.note(source.name, readings)

        p = cfg.position
        fixed = Position(p.lat, p.lon, p.alt) if p is not None else None
        if cfg.stamps_own_position:
            fixed = None  # e.g. the synthetic source stamps its fixed position itself
        return positioned_emit(
            emit,
            self.positions,
            position_from=cfg.position_from,
            fixed=fixed,
            max_age_s=_max_fix_age(cfg, self.cfg),
        )

    # ------------------------------------------------------------------------------------------
    # Source and uplink tasks: started at start-up and by a reload, stopped by a reload

    def _start_source(self, source: Source) -> None:
        assert self._tg is not None
        name = f"poll:{source.name}"
        self.tasks.pop(name, None)  # a replaced source starts with a clean record
        self._source_tasks[source.name] = self._tg.create_task(
            self._supervise(name, self._source_runner(source)), name=name
        )

    def _start_runner(self, runner: UplinkRunner) -> None:
        assert self._tg is not None
        name = f"uplink:{runner.name}"
        self.tasks.pop(name, None)
        self._uplink_tasks[runner.name] = self._tg.create_task(
            self._supervise(name, runner.run), name=name
        )

    async def _stop_source(self, source: Source) -> None:
        """Stop polling ``source`` and close it. What it emitted is already queued in the store
        and is committed as usual (a batch still waiting for room in a full buffer is not
        captured, as at shutdown)."""
        task = self._source_tasks.get(source.name)
        if task is not None:
            await _cancel_all([task])
            self._source_tasks.pop(source.name, None)
        self.tasks.pop(f"poll:{source.name}", None)
        with contextlib.suppress(Exception):
            await source.aclose()

    async def _stop_runner(self, runner: UplinkRunner, store: Store) -> None:
        """Stop ``runner`` between requests: it starts none; the one in flight is answered and
        recorded (what its lease had not sent stays pending); then its task is cancelled where
        it waits. Past the uplink's own send limit the request is abandoned, as at shutdown:
        its readings stay pending and may be sent twice."""
        runner.stop_sending()
        limit = 3 * runner.cfg.timeout_s + UPLINK_STOP_SLACK_S
        try:
            async with asyncio.timeout(limit):
                await runner.wait_idle()
        except TimeoutError:
            log.warning(
                "uplink_stop_abandoned",
                uplink=runner.name,
                waited_s=limit,
                detail="its request in flight got no answer: those readings stay pending "
                "and may be sent twice",
            )
        task = self._uplink_tasks.get(runner.name)
        if task is not None:
            await _cancel_all([task])  # cancelled at once: no await since wait_idle returned
            self._uplink_tasks.pop(runner.name, None)
        self.tasks.pop(f"uplink:{runner.name}", None)
        store.drop_leases(runner.name)
        with contextlib.suppress(Exception):
            await runner.uplink.aclose()

    # ------------------------------------------------------------------------------------------
    # Reload (SIGHUP)

    async def _reloader(self) -> None:
        while True:
            await self.reload_wanted.wait()
            self.reload_wanted.clear()  # signals during this reload: one more reload after it
            try:
                await self.reload()
            except Exception as exc:  # a bug here must not end the daemon
                # Maybe half applied (some parts stopped, not restarted): /health says so.
                self.reload_failed = f"{type(exc).__name__}: {exc}"
                self.config.last_reload_error = f"reload failed: {self.reload_failed}"
                log.exception(
                    "config_reload_failed",
                    error=self.config.last_reload_error,
                    action="restart fieldgate to apply the file",
                )

    async def reload(self) -> bool:
        """Apply the config file as it is now; True when applied. A file with problems is
        refused (each logged as ``config_reload_refused``, as ``check-config`` prints it) and
        the running config goes on. See the module docstring for what changes how."""
        store = self.store
        assert store is not None
        path = self.loaded.path
        self.config.last_reload_at = time.time()
        if path is None:
            self._refuse("<config>", [("", "the running config was not loaded from a file")])
            return False
        try:
            # On the event loop, not in a thread: loading registers the secrets it resolves in
            # the log redaction set, which every log line iterates. It takes milliseconds.
            loaded, digest = _load_hashed(path)
        except ConfigError as exc:
            self._refuse(exc.source or str(path), exc.problems)
            return False
        old, new = self.cfg, loaded.settings
        pending = [k for k in RESTART_SECTIONS if getattr(new, k) != getattr(old, k)]
        # What runs from now on: the new file, but those sections as they are running.
        settings = new.model_copy(update={k: getattr(old, k) for k in RESTART_SECTIONS})

        src_cfgs = {s.name: s for s in settings.sources if s.enabled}
        old_src = {n: (c, _max_fix_age(c, old)) for n, c in self._source_cfgs.items()}
        new_src = {n: (c, _max_fix_age(c, settings)) for n, c in src_cfgs.items()}
        up_cfgs = {u.name: u for u in settings.uplinks if u.enabled}
        old_up = {r.name: r.cfg for r in self.runners}
        # Equal configs hold equal resolved secrets too: a replaced token file is a change.
        src_diff = _diff(old_src, new_src)
        up_diff = _diff(old_up, dict(up_cfgs))

        # Build every new plugin before stopping anything: one that cannot be built refuses
        # the whole file and nothing has changed.
        base_dir = path.parent
        new_sources: dict[str, Source] = {}
        new_uplinks: dict[str, Uplink] = {}
        where = ""
        try:
            for n in [*src_diff.added, *src_diff.changed]:
                where = f"source {n}"
                new_sources[n] = build_source(
                    src_cfgs[n], base_dir=base_dir, positions=self.positions
                )
            for n in [*up_diff.added, *up_diff.changed]:
                where = f"uplink {n}"
                new_uplinks[n] = build_uplink(up_cfgs[n])
        except Exception as exc:
            built: list[Source | Uplink] = [*new_sources.values(), *new_uplinks.values()]
            for plugin in built:
                with contextlib.suppress(Exception):
                    await plugin.aclose()
            self._refuse(str(path), [("", f"{where} cannot be built: {type(exc).__name__}: {exc}")])
            return False

        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            going = {*src_diff.removed, *src_diff.changed}
            for s in [s for s in self.sources if s.name in going]:
                await self._stop_source(s)
            self.sources = [s for s in self.sources if s.name not in going]
            going = {*up_diff.removed, *up_diff.changed}
            stopping = [r for r in self.runners if r.name in going]
            await asyncio.gather(*(self._stop_runner(r, store) for r in stopping))
            self.runners = [r for r in self.runners if r.name not in going]
            # No runner of a removed or re-routed uplink is left: the store follows the routes.
            await store.set_routes({n: u.routed_series() for n, u in up_cfgs.items()})

            loaded.settings = settings
            self.loaded, self.cfg, self._source_cfgs = loaded, settings, src_cfgs
            runners = {r.name: r for r in self.runners}
            for n, uplink in new_uplinks.items():
                runners[n] = UplinkRunner(uplink, up_cfgs[n], store, self.clock)
                self._start_runner(runners[n])
            self.runners = [runners[n] for n in up_cfgs]
            # Sources last: a new uplink takes what is committed once the routes are set.
            sources = {s.name: s for s in self.sources}
            for n, source in new_sources.items():
                sources[n] = source
                self._start_source(source)
            self.sources = [sources[n] for n in src_cfgs]
            heap.settle()  # what the reload dropped is collected; what it built, kept
        finally:
            self.notifier.ready()

        self.config = ConfigInfo(
            path,
            digest,
            reloads=self.config.reloads + 1,
            last_reload_at=self.config.last_reload_at,
            pending_restart=pending,
        )
        for w in loaded.warnings:
            log.warning("config_warning", detail=w)
        if pending:
            log.warning(
                "config_needs_restart",
                sections=pending,
                detail="these sections changed in the file; they apply at the next restart",
            )
        log.info(
            "config_reloaded",
            config=str(path),
            sha256=digest,
            sources_added=src_diff.added,
            sources_removed=src_diff.removed,
            sources_changed=src_diff.changed,
            uplinks_added=up_diff.added,
            uplinks_removed=up_diff.removed,
            uplinks_changed=up_diff.changed,
        )
        return True

    def _refuse(self, where: str, problems: Iterable[tuple[str, str]]) -> None:
        lines = [f"{tpath} -> {msg}" if tpath else msg for tpath, msg in problems]
        for line in lines:
            log.error(
                "config_reload_refused",
                config=where,
                problem=line,
                problems=len(lines),
                action="the running config goes on; fix the file and reload again",
            )
        self.config.last_reload_error = f"{where}: configuration is invalid: " + "; ".join(lines)

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
        """The /status snapshot: times as ISO 8601 UTC text, each with its ``X_epoch`` number
        (:func:`gateway.timefields.with_iso_times`; the parts keep epoch seconds)."""
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
        return with_iso_times(
            {
                "version": __version__,
                "started_at": self.started_at,
                "uptime_s": round(time.time() - self.started_at, 3),
                "ready": self.ready.is_set(),
                "sources": sources,
                "uplinks": uplinks,
                "store": store.stats() if store else {},
                "clock": self.clock.status(),
                "config": self.config.as_dict(),
            }
        )

    def health(self) -> tuple[bool, list[str]]:
        reasons: list[str] = []
        problem = self.store.healthy() if self.store is not None else "store not open"
        if problem is not None:
            reasons.append(problem)
        if self.reload_failed is not None:
            reasons.append(
                f"a config reload failed part-way ({self.reload_failed}): restart fieldgate"
            )
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


@dataclass(slots=True)
class _Diff:
    added: list[str]
    removed: list[str]
    changed: list[str]


def _diff(old: dict[str, Any], new: dict[str, Any]) -> _Diff:
    """Names added, removed, and present in both with a different value."""
    return _Diff(
        added=[n for n in new if n not in old],
        removed=[n for n in old if n not in new],
        changed=[n for n in new if n in old and new[n] != old[n]],
    )


def _max_fix_age(cfg: SourceConfig, settings: Settings) -> float:
    """How old a fix of the GPS source ``cfg`` takes its position from may be."""
    gps = next(
        (s for s in settings.sources if isinstance(s, NmeaConfig) and s.name == cfg.position_from),
        None,
    )
    return gps.max_fix_age_s if gps is not None else 10.0


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _load_hashed(path: Path) -> tuple[LoadedConfig, str | None]:
    """``load_config(path)`` and the SHA-256 of the bytes it loaded: read again while the file
    changes under the load (an editor still writing it), at most three times."""
    digest = _sha256(path)
    for _ in range(3):
        loaded = load_config(path)
        after = _sha256(path)
        if after == digest:
            break
        digest = after
    return loaded, digest


async def _cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks)
