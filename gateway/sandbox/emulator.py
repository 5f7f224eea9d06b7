"""Shared machinery of the service emulators: a real HTTP server with recording and faults.

An emulator is a local stand-in for one remote service. It enforces the service document
(a stand-in that agrees with whatever the client sends proves nothing), records what it
accepted, and takes faults from tests. Each service subclasses :class:`Emulator`, adds its
routes in :meth:`Emulator.setup_routes` and uses the helpers here:

- :class:`Reject` - raise it anywhere in a handler to answer with the emulator's JSON error;
- :class:`BearerAuth` - ``Authorization: Bearer`` check, 401 unknown/missing, 403 no permission;
- :class:`SlidingWindowLimiter` - at most N requests in any P seconds per key, 429 + Retry-After;
- :func:`read_body`, :func:`read_part`, :func:`parse_json` - size-limited reads, strict JSON.

What a caller may rely on::

    async with QatiumEmulator(token="t") as emu:      # binds 127.0.0.1, an OS-chosen port
        emu.url                                       # "http://127.0.0.1:PORT", no slash
        emu.faults.fail_next(2, status=503, retry_after=5)
        await emu.wait_for(lambda: len(emu.rows) >= 3, timeout=5)
        emu.status_counts[200], emu.total_requests, emu.count(path="/ingest", status=429)
    # here the server is closed, its connections and background tasks are gone

    emu.ssl_context = ctx      # before start(): serve HTTPS with ctx; emu.url is then https://

Middleware order, outermost first: recording (sees every answer, including faults, 404s and
dropped connections), fault injection (before any auth, rate limit or state change), then the
translation of :class:`Reject` and aiohttp's own HTTP errors into the JSON error body.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Self

import structlog
from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler

from gateway.sandbox.faults import FAULT_KEY, FaultInjector

log = structlog.get_logger(__name__)

#: A monotonic clock in seconds; tests inject a :class:`ManualClock`.
Clock = Callable[[], float]

_CHUNK = 64 * 1024


class ManualClock:
    """A clock that only moves when told to, so rate-limit windows expire without sleeping."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Reject(Exception):
    """Answer the current request with ``status`` and the emulator's JSON error body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the emulator answered it; ``status`` is None when no answer was sent."""

    method: str
    path: str
    status: int | None
    fault: str | None
    at: float


class SlidingWindowLimiter:
    """At most ``limit`` admitted requests per key in any window of ``period_s`` seconds.

    Refused requests are not counted, so a client that waits the advertised time gets in.
    A request exactly ``period_s`` after an earlier one no longer sees it in the window.
    """

    def __init__(self, limit: int, period_s: float, clock: Clock = time.monotonic) -> None:
        if limit < 1 or period_s <= 0:
            raise ValueError("limit must be >= 1 and period_s > 0")
        self.limit = limit
        self.period_s = period_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}

    def acquire(self, key: str) -> float | None:
        """Admit and count one request (None), or return the seconds until one would fit."""
        now = self._clock()
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - self.period_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return hits[0] + self.period_s - now
        hits.append(now)
        return None

    def check(self, key: str) -> None:
        """Like :meth:`acquire`, but raise a 429 :class:`Reject` with an integer Retry-After."""
        wait = self.acquire(key)
        if wait is not None:
            retry_after = max(1, math.ceil(wait))
            raise Reject(
                429,
                f"rate limit of {self.limit} requests per {self.period_s:g} s exceeded",
                {"Retry-After": str(retry_after)},
            )

    def reset(self) -> None:
        self._hits.clear()


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None when absent/other."""
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class BearerAuth:
    """Bearer tokens and what each may do: ``BearerAuth({"tok": {"ingest", "jobs"}})``.

    :meth:`require` raises 401 (with ``WWW-Authenticate: Bearer``) when the token is missing
    or unknown and 403 when it is known but lacks the permission.
    """

    def __init__(self, grants: Mapping[str, Iterable[str]] | None = None) -> None:
        self._grants: dict[str, frozenset[str]] = {
            token: frozenset(perms) for token, perms in (grants or {}).items()
        }

    def grant(self, token: str, *permissions: str) -> None:
        self._grants[token] = self._grants.get(token, frozenset()) | frozenset(permissions)

    def revoke(self, token: str) -> None:
        """Forget ``token``: its next request gets 401 (a token revoked mid-run)."""
        self._grants.pop(token, None)

    def require(self, request: web.Request, permission: str) -> str:
        """Return the request's token when it may do ``permission``; else raise 401/403."""
        token = bearer_token(request)
        if token is None:
            raise Reject(401, "authentication token missing", {"WWW-Authenticate": "Bearer"})
        perms = self._grants.get(token)
        if perms is None:
            raise Reject(
                401,
                "authentication token invalid",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if permission not in perms:
            raise Reject(403, f"token lacks the '{permission}' permission")
        return token


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, or a 413 :class:`Reject` once it exceeds ``limit`` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise Reject(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise Reject(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_part(part: BodyPartReader, limit: int) -> bytes:
    """The decoded content of one multipart part, or a 413 :class:`Reject` past ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise Reject(413, f"file exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return part.decode(b"".join(chunks))


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> object:
    """Strict JSON (UTF-8, no NaN/Infinity, which Python's json.dumps emits by default).

    Raises a 400 :class:`Reject` naming the problem.
    """
    try:
        return json.loads(raw.decode("utf-8-sig"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise Reject(400, f"body is not UTF-8: {exc.reason}") from exc
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise Reject(400, f"body is not valid JSON: {exc}") from exc


class Emulator:
    """Base of every service emulator; see the module docstring for the contract.

    Subclasses set ``name``, implement :meth:`setup_routes`, may override :meth:`error_body`,
    and call ``await self.changed()`` after changing state outside a request (requests notify
    on their own once answered).
    """

    name: ClassVar[str] = "emulator"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Clock = time.monotonic,
        record_limit: int = 10_000,
        shutdown_timeout_s: float = 2.0,
    ) -> None:
        self.host = host
        self.clock = clock
        self.faults = FaultInjector(self.error_response, self.changed)
        #: The last ``record_limit`` requests, oldest first.
        self.requests: deque[RequestRecord] = deque(maxlen=record_limit)
        #: Every request ever answered, by status; None counts requests given no answer.
        self.status_counts: Counter[int | None] = Counter()
        self._requested_port = port
        self._port: int | None = None
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self._cond: asyncio.Condition | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Serve HTTPS with this context when set before :meth:`start` (TLS verification tests);
        #: an attribute, not an argument, so every subclass has it without passing it through.
        self.ssl_context: ssl.SSLContext | None = None

    # -- what subclasses provide ------------------------------------------------------------

    def setup_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def client_max_size(self) -> int:
        """aiohttp's own body cap; emulators read bodies with :func:`read_body` limits."""
        return 1024**2

    def error_body(self, status: int, message: str) -> object:
        """The JSON body of every error answer; override to match a service's error format."""
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        return {"error": reason, "message": message}

    def error_response(
        self, status: int, message: str, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.json_response(
            self.error_body(status, message), status=status, headers=dict(headers or {})
        )

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name} emulator is not running")
        return self._port

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:40123`` (``https://``
        when serving with :attr:`ssl_context`)."""
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; raises RuntimeError when already running, OSError when the port
        is taken. Starting again after :meth:`aclose` binds the port of the first start and
        keeps every record (a service restart, for outage tests)."""
        if self._runner is not None:
            raise RuntimeError(f"{self.name} emulator is already running")
        self._cond = asyncio.Condition()
        self.faults.open()
        app = web.Application(
            middlewares=[self._record, self.faults.middleware, self._translate_errors],
            client_max_size=self.client_max_size(),
        )
        self.setup_routes(app)
        # handler_cancellation: a client that gives up (timeout) cancels its delayed handler.
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, self.host, self._requested_port, ssl_context=self.ssl_context
            )
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        # A restart comes back on the same address, like a real service after an outage.
        self._requested_port = self._port
        log.info("emulator_started", emulator=self.name, url=self.url)

    async def aclose(self) -> None:
        """Stop serving, end delayed requests and background tasks; idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.faults.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Bounded: aiohttp waits shutdown_timeout per connection, our tasks only need a tick.
        async with asyncio.timeout(self._shutdown_timeout_s + 5.0):
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cleanup()
        log.info("emulator_stopped", emulator=self.name, url=self.url)
        self._port = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a named task owned by the emulator and cancelled by :meth:`aclose`."""
        if self._runner is None:
            coro.close()
            raise RuntimeError(f"{self.name} emulator is not running")
        task = asyncio.create_task(coro, name=f"{self.name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("emulator_task_failed", task=task.get_name(), error=repr(exc))

    # -- observation -------------------------------------------------------------------------

    @property
    def total_requests(self) -> int:
        return sum(self.status_counts.values())

    def count(
        self, *, method: str | None = None, path: str | None = None, status: int | None = None
    ) -> int:
        """Recorded requests matching every given filter (``path`` is a prefix)."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method)
            and (path is None or r.path.startswith(path))
            and (status is None or r.status == status)
        )

    async def changed(self) -> None:
        """Wake every :meth:`wait_for` so it re-checks its predicate."""
        if self._cond is None:
            return
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,
    ) -> None:
        """Return once ``predicate()`` is true; re-checked after every answered request and
        every state change. Raises TimeoutError after ``timeout`` seconds."""
        if self._cond is None:
            raise RuntimeError(f"{self.name} emulator is not running")
        try:
            async with asyncio.timeout(timeout), self._cond:
                await self._cond.wait_for(predicate)
        except TimeoutError:
            raise TimeoutError(f"{self.name}: condition not met within {timeout} s") from None

    # -- middlewares -------------------------------------------------------------------------

    def _note(self, request: web.Request, status: int | None) -> None:
        fault = request.get(FAULT_KEY)
        record = RequestRecord(request.method, request.path, status, fault, self.clock())
        self.requests.append(record)
        self.status_counts[status] += 1

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self._note(request, exc.status)
            await self.changed()
            raise
        except asyncio.CancelledError:
            # The client went away mid-request (or we are shutting down): nothing was answered.
            # Waking waiters takes the condition's lock, which is free unless a notify is
            # running this very tick, so this await does not hold up the cancellation.
            self._note(request, None)
            await self.changed()
            raise
        except Exception:
            self._note(request, 500)
            await self.changed()
            raise
        dropped = request.get(FAULT_KEY) == "drop"
        self._note(request, None if dropped else response.status)
        await self.changed()
        return response

    @web.middleware
    async def _translate_errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except Reject as exc:
            return self.error_response(exc.status, exc.message, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            # Router 404/405 and aiohttp's own 413 get the same JSON shape as ours.
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return self.error_response(exc.status, exc.reason, headers)
