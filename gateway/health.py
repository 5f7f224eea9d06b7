"""The local health endpoint (aiohttp): ``/health``, ``/status``, ``/metrics``, and the web
console: ``/`` (gateway/console/index.html) with ``/history`` for its plots.

It reads everything and changes nothing. ``/health`` answers 200 ``{"ok": true}`` when the event
loop turns (it answered), the store accepts writes and no uplink is stuck; else 503 with the
reasons. ``/status`` is the JSON snapshot of :meth:`gateway.app.Gateway.status`. ``/metrics`` is
Prometheus text, built on each scrape from the same snapshot (no second set of counters to
drift). ``/history`` is a bounded in-memory record of backlogs, deliveries and readings, sampled
here every :data:`gateway.console.history.INTERVAL_S` (the last hour), plus the current values.

With ``console_token`` set (required when bound beyond loopback: the config loader refuses
otherwise), every route but ``/health`` needs ``Authorization: Bearer <token>`` or
``?token=<token>``; ``/`` without it answers 401 with a form asking for the token.

A port that is taken at start-up does not leave the daemon without its endpoint for its whole
life: :meth:`HealthServer.start_or_retry` binds now or keeps trying in the background (1 s
doubling to 30 s). Failures are logged when the error changes and then every
:data:`LOG_EVERY_NTH_FAILURE`-th attempt (each one at debug), are put in the systemd status text
when there is a notifier, and once bound ``/status`` shows them under ``health``
(``bound_at``, ``bind_failures``, ``last_bind_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import console
from gateway.config import HealthConfig
from gateway.console.history import INTERVAL_S, History
from gateway.errors import ConfigError
from gateway.systemd import Notifier
from gateway.timefields import with_iso_times

log = structlog.get_logger(__name__)

UPLINK_STATES = ("ok", "backing_off", "auth_failed", "paused")

#: Bind retry: the first retry after this many seconds, doubling up to the cap.
BIND_RETRY_INITIAL_S = 1.0
BIND_RETRY_MAX_S = 30.0
#: A failure with the same error as the one before is logged (at error level) every Nth time.
LOG_EVERY_NTH_FAILURE = 10


class StatusProvider(Protocol):
    def status(self) -> dict[str, Any]: ...

    def health(self) -> tuple[bool, list[str]]: ...


class _Collector(Collector):
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        st = self._snapshot()
        store = st["store"]
        yield _counter(
            "fieldgate_readings_captured",
            "Readings committed to the store",
            store["captured_total"],
        )
        yield _counter(
            "fieldgate_store_evicted",
            "Readings evicted by quota or retention",
            store["evicted_total"],
        )
        yield _gauge("fieldgate_store_bytes", "Bytes of database pages in use", store["bytes"])
        yield _gauge("fieldgate_store_quota_bytes", "Configured store quota", store["quota_bytes"])
        yield _gauge(
            "fieldgate_store_buffered", "Readings waiting for the next commit", store["buffered"]
        )
        yield _gauge(
            "fieldgate_store_corrupt",
            "1 when corruption was found while running (restart to move aside and salvage)",
            1 if store.get("corrupt") else 0,
        )
        yield _counter(
            "fieldgate_store_rejected",
            "Readings the store could not keep (a value SQLite cannot bind)",
            store.get("rejected_total", 0),
        )
        if store["free_disk_bytes"] is not None:
            yield _gauge(
                "fieldgate_disk_free_bytes",
                "Free bytes on the store's filesystem",
                store["free_disk_bytes"],
            )
        clock = st["clock"]
        yield _gauge(
            "fieldgate_clock_synchronized",
            "1 when the system clock is synchronised",
            1 if clock["synchronized"] else 0,
        )
        health = st.get("health")
        if health is not None:
            yield _counter(
                "fieldgate_health_bind_failures",
                "Failed attempts to bind the health endpoint's port",
                health["bind_failures"],
            )
        yield _counter(
            "fieldgate_clock_steps", "Steps of the wall clock seen", clock.get("steps_total", 0)
        )
        rejected_ts = CounterMetricFamily(
            "fieldgate_clock_rejected_timestamps",
            "Readings refused for an implausible timestamp, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(clock.get("rejected_timestamps", {}).items()):
            rejected_ts.add_metric([reason], n)
        yield rejected_ts
        yield _gauge(
            "fieldgate_clock_unsynced_pending",
            "Stored readings stamped while the clock was unsynchronised, not yet repaired",
            clock.get("unsynced_pending", 0),
        )

        src = st["sources"]
        fams = {
            "readings": CounterMetricFamily(
                "fieldgate_source_readings", "Readings produced", labels=["source"]
            ),
            "errors": CounterMetricFamily(
                "fieldgate_source_errors", "Source faults", labels=["source"]
            ),
            "rejected": CounterMetricFamily(
                "fieldgate_source_rejected",
                "Input refused by a source (damaged lines, bad values)",
                labels=["source"],
            ),
        }
        for name, s in src.items():
            for key, fam in fams.items():
                fam.add_metric([name], s.get(key, 0))
        yield from fams.values()

        up = st["uplinks"]
        delivered = CounterMetricFamily(
            "fieldgate_uplink_delivered", "Readings delivered", labels=["uplink"]
        )
        rejected = CounterMetricFamily(
            "fieldgate_uplink_dead_lettered",
            "Readings dead-lettered with the service's reason",
            labels=["uplink"],
        )
        evicted = CounterMetricFamily(
            "fieldgate_uplink_evicted",
            "Readings evicted before this uplink took them",
            labels=["uplink"],
        )
        backlog = GaugeMetricFamily(
            "fieldgate_uplink_backlog", "Readings pending", labels=["uplink"]
        )
        oldest = GaugeMetricFamily(
            "fieldgate_uplink_oldest_pending_seconds",
            "Age of the oldest pending reading",
            labels=["uplink"],
        )
        dead = GaugeMetricFamily(
            "fieldgate_uplink_dead_letters", "Dead letters kept", labels=["uplink"]
        )
        state = GaugeMetricFamily(
            "fieldgate_uplink_state", "1 for the uplink's current state", labels=["uplink", "state"]
        )
        requests = CounterMetricFamily(
            "fieldgate_uplink_requests", "Requests by outcome", labels=["uplink", "outcome"]
        )
        for name, u in up.items():
            delivered.add_metric([name], u["delivered"])
            rejected.add_metric([name], u["rejected_total"])
            evicted.add_metric([name], u["evicted"])
            backlog.add_metric([name], u["backlog"])
            oldest.add_metric([name], u["oldest_pending_s"] or 0.0)
            dead.add_metric([name], u["dead_letters"])
            for s in UPLINK_STATES:
                state.add_metric([name, s], 1 if u["state"] == s else 0)
            for outcome, n in u["requests"].items():
                requests.add_metric([name, outcome], n)
        yield from (delivered, rejected, evicted, backlog, oldest, dead, state, requests)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class HealthServer:
    """Serves the three endpoints for a :class:`StatusProvider`. Async context manager."""

    def __init__(
        self,
        cfg: HealthConfig,
        provider: StatusProvider,
        *,
        notifier: Notifier | None = None,
        retry_initial_s: float = BIND_RETRY_INITIAL_S,
        retry_max_s: float = BIND_RETRY_MAX_S,
        history_interval_s: float = INTERVAL_S,
    ) -> None:
        problems = console.auth_problems(cfg)
        if problems:  # the loader refuses this config; a HealthServer built by hand, too
            raise ConfigError(problems)
        self.cfg = cfg
        self._token = (
            cfg.console_token.secret().reveal().encode() if cfg.console_token is not None else None
        )
        self.history = History(interval_s=history_interval_s)
        self._sampler: asyncio.Task[None] | None = None
        self.provider = provider
        self.notifier = notifier
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self.snapshot))
        self._runner: web.AppRunner | None = None
        self._retry: asyncio.Task[None] | None = None
        #: The bound port (with port 0, the one chosen); None until bound.
        self.port: int | None = None
        #: Set once bound (at once, or by a retry).
        self.listening = asyncio.Event()
        self.bound_at: float | None = None
        self.bind_failures = 0
        self.last_bind_error: str | None = None
        self.last_bind_error_at: float | None = None

    @property
    def bound(self) -> bool:
        return self._runner is not None

    @property
    def url(self) -> str | None:
        """The base URL (no slash) once bound."""
        return f"http://{self.cfg.host}:{self.port}" if self.bound else None

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/", self._console)
        app.router.add_get("/health", self._health)
        app.router.add_get("/status", self._status)
        app.router.add_get("/history", self._history)
        app.router.add_get("/metrics", self._metrics)
        return app

    def _authorized(self, request: web.Request) -> bool:
        if self._token is None:
            return True
        given = request.query.get("token")
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self._token)

    @web.middleware
    async def _auth(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path == "/health" or self._authorized(request):
            return await handler(request)
        if request.path == "/":
            return web.Response(
                body=console.LOGIN_PAGE, status=401, content_type="text/html", charset="utf-8"
            )
        return web.json_response(
            {"error": "console token required (Authorization: Bearer <token>)"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="fieldgate"'},
        )

    async def start(self) -> int:
        """Bind once; raises OSError when the address is taken (counted in the bind status)."""
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.host, self.cfg.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            self.bind_failures += 1
            self.last_bind_error = str(exc) or type(exc).__name__
            self.last_bind_error_at = time.time()
            raise
        except BaseException:  # cancelled while binding (shutdown): leave nothing behind
            await runner.cleanup()
            raise
        self._runner = runner
        self.bound_at = time.time()
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample(), name="health:history")
        # The bound addresses (host, port[, flowinfo, scope_id]): with port 0, the one chosen.
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else self.cfg.port
        self.listening.set()
        url = f"http://{self.cfg.host}:{self.port}/status"
        if self.bind_failures:
            log.info("health_listening", url=url, bind_failures=self.bind_failures)
        else:
            log.info("health_listening", url=url)
        if self.notifier is not None and self.bind_failures:
            self.notifier.status(
                f"health endpoint listening on {url} after {self.bind_failures} failed binds"
            )
        return self.port

    async def start_or_retry(self) -> bool:
        """Bind now (True), or log the failure and keep trying in the background (False)."""
        try:
            await self.start()
        except OSError:
            delay = self.retry_initial_s
            self._report_failure(None, delay)
            self._retry = asyncio.create_task(self._retry_bind(delay), name="health:bind")
            return False
        return True

    async def _retry_bind(self, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            previous = self.last_bind_error
            try:
                await self.start()
            except OSError:
                delay = min(self.retry_max_s, delay * 2)
                self._report_failure(previous, delay)
            else:
                return

    def _report_failure(self, previous: str | None, retry_in_s: float) -> None:
        n, error = self.bind_failures, self.last_bind_error
        fields = {
            "host": self.cfg.host,
            "port": self.cfg.port,
            "error": error,
            "attempt": n,
            "retry_in_s": retry_in_s,
        }
        if n == 1 or error != previous or n % LOG_EVERY_NTH_FAILURE == 0:
            log.error(
                "health_bind_failed",
                **fields,
                action="running without /health, /status, /metrics; retrying",
            )
        else:
            log.debug("health_bind_failed", **fields)
        if self.notifier is not None:
            self.notifier.status(
                f"health endpoint {self.cfg.host}:{self.cfg.port} not bound ({error}); "
                f"retrying, {n} failed attempts"
            )

    def bind_status(self) -> dict[str, Any]:
        """What /status shows under ``health`` (times as ISO text with ``X_epoch`` numbers)."""
        return with_iso_times(
            {
                "url": self.url,
                "bound_at": self.bound_at,
                "bind_failures": self.bind_failures,
                "last_bind_error": self.last_bind_error,
                "last_bind_error_at": self.last_bind_error_at,
            }
        )

    def snapshot(self) -> dict[str, Any]:
        """The provider's status with this endpoint's own under ``health``."""
        st = dict(self.provider.status())
        st["health"] = self.bind_status()
        return st

    async def _sample(self) -> None:
        """Record the history now and every interval while bound. A failing status is skipped
        (the console shows the gap), never the end of sampling."""
        while True:
            try:
                self.history.record(time.time(), self.provider.status())
            except Exception as exc:  # a half-built provider during start-up or a reload
                log.debug("health_history_sample_failed", error=repr(exc))
            await asyncio.sleep(self.history.interval_s)

    async def aclose(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        retry, self._retry = self._retry, None
        if retry is not None:
            retry.cancel()
            await asyncio.gather(retry, return_exceptions=True)
        runner, self._runner = self._runner, None
        self.listening.clear()
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _health(self, request: web.Request) -> web.Response:
        ok, reasons = self.provider.health()
        return web.json_response({"ok": ok, "reasons": reasons}, status=200 if ok else 503)

    async def _status(self, request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps(self.snapshot(), default=str, indent=1),
            content_type="application/json",
        )

    async def _console(self, request: web.Request) -> web.Response:
        return web.Response(
            body=console.page(),
            content_type="text/html",
            charset="utf-8",
            headers={
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def _history(self, request: web.Request) -> web.Response:
        now = self.history.sample(time.time(), self.provider.status())
        body = self.history.as_dict(now)
        name = request.query.get("series")
        if name is not None:  # a chosen series' recent values (None when not kept)
            body["recent"] = self.history.series.recent(name)
        return web.json_response(body)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})
