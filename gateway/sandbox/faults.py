"""Fault injection for the sandbox emulators: make the next requests fail, stall or vanish.

Every emulator built on :class:`gateway.sandbox.emulator.Emulator` has one
:class:`FaultInjector` as ``emu.faults``; its middleware runs before authentication, rate
limiting and the handler, so a faulted request changes no emulator state and does not count
towards a rate limit. Callers may rely on:

- faults are queued first in, first out; each request consumes at most one fault, the oldest
  queued one whose ``prefix`` the request path starts with (default ``"/"``: any path);
- ``fail_next`` answers ``status`` without running the handler (default body: the emulator's
  JSON error body), ``delay_next`` waits ``seconds`` and then handles the request normally,
  ``drop_next`` closes the connection without writing any response;
- a delay is cut short when the emulator shuts down, and when the client disconnects (the
  server runs with handler cancellation), so a client timeout never stalls teardown;
- ``injected`` counts the faults applied, by kind; ``pending`` is what is still queued; the
  emulator's ``wait_for`` is woken when a fault is applied.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

log = structlog.get_logger(__name__)

FaultKind = Literal["fail", "delay", "drop"]

#: Builds the emulator's own error response: (status, message, extra headers) -> response.
ErrorResponder = Callable[[int, str, Mapping[str, str]], web.Response]

#: Request key under which the middleware leaves the kind of fault it applied.
FAULT_KEY = web.RequestKey("sandbox_fault", str)


@dataclass(slots=True)
class _Fault:
    kind: FaultKind
    remaining: int
    prefix: str
    status: int = 500
    headers: Mapping[str, str] | None = None
    body: bytes | None = None
    content_type: str = "application/json"
    seconds: float = 0.0


def _retry_after_header(retry_after: float | str | None) -> dict[str, str]:
    if retry_after is None:
        return {}
    if isinstance(retry_after, str):
        # An HTTP-date or a deliberately malformed value: the caller tests the client's parser.
        return {"Retry-After": retry_after}
    return {"Retry-After": str(max(0, math.ceil(retry_after)))}


class FaultInjector:
    """Queue of faults the next matching requests will suffer; see the module docstring."""

    def __init__(
        self,
        error_response: ErrorResponder,
        on_apply: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """``on_apply`` is awaited once a fault is taken (the emulator wakes its waiters, so a
        test can wait until a delayed request has arrived)."""
        self._error_response = error_response
        self._on_apply = on_apply
        self._queue: deque[_Fault] = deque()
        self._closing: asyncio.Event | None = None
        self.injected: Counter[str] = Counter()

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        retry_after: float | str | None = None,
        body: str | bytes | Mapping[str, object] | list[object] | None = None,
        content_type: str | None = None,
        prefix: str = "/",
    ) -> None:
        """Answer the next ``n`` matching requests with ``status`` instead of handling them.

        ``retry_after`` (seconds, rounded up, or a raw header string) adds a ``Retry-After``
        header. ``body`` replaces the default JSON error body: a str or bytes is sent as is
        (``text/plain`` unless ``content_type`` says otherwise), a dict or list as JSON.
        """
        raw: bytes | None
        if body is None:
            raw, ctype = None, "application/json"
        elif isinstance(body, bytes):
            raw, ctype = body, content_type or "text/plain; charset=utf-8"
        elif isinstance(body, str):
            raw, ctype = body.encode(), content_type or "text/plain; charset=utf-8"
        else:
            raw, ctype = json.dumps(body).encode(), content_type or "application/json"
        self._push(
            _Fault(
                "fail",
                n,
                prefix,
                status=status,
                headers=_retry_after_header(retry_after),
                body=raw,
                content_type=ctype,
            )
        )

    def delay_next(self, n: int = 1, seconds: float = 30.0, *, prefix: str = "/") -> None:
        """Hold the next ``n`` matching requests for ``seconds`` before handling them."""
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self._push(_Fault("delay", n, prefix, seconds=seconds))

    def drop_next(self, n: int = 1, *, prefix: str = "/") -> None:
        """Close the connection of the next ``n`` matching requests without any response."""
        self._push(_Fault("drop", n, prefix))

    def clear(self) -> None:
        """Forget every queued fault (the ``injected`` counts stay)."""
        self._queue.clear()

    @property
    def pending(self) -> int:
        """How many requests are still to be faulted."""
        return sum(f.remaining for f in self._queue)

    def _push(self, fault: _Fault) -> None:
        if fault.remaining < 1:
            raise ValueError("n must be at least 1")
        self._queue.append(fault)
        log.debug("fault_queued", kind=fault.kind, n=fault.remaining, prefix=fault.prefix)

    def _take(self, path: str) -> _Fault | None:
        for fault in self._queue:
            if path.startswith(fault.prefix):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._queue.remove(fault)
                return fault
        return None

    def open(self) -> None:
        """Called by the emulator when it starts serving (binds the event to the running loop)."""
        self._closing = asyncio.Event()

    def close(self) -> None:
        """Called by the emulator when it stops: wake every delayed request at once."""
        if self._closing is not None:
            self._closing.set()

    async def _sleep(self, seconds: float) -> None:
        closing = self._closing
        if closing is None or closing.is_set():
            return
        # Waiting on the event instead of asyncio.sleep lets shutdown end a long delay.
        try:
            async with asyncio.timeout(seconds):
                await closing.wait()
        except TimeoutError:
            pass

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The aiohttp middleware applying the queued faults (installed by the emulator)."""
        fault = self._take(request.path)
        if fault is None:
            return await handler(request)
        self.injected[fault.kind] += 1
        request[FAULT_KEY] = fault.kind
        log.debug("fault_applied", kind=fault.kind, method=request.method, path=request.path)
        if self._on_apply is not None:
            await self._on_apply()
        match fault.kind:
            case "delay":
                await self._sleep(fault.seconds)
                return await handler(request)
            case "drop":
                # Closing the transport first makes aiohttp discard the response below unsent;
                # the client sees the connection end with no status line.
                request.protocol.force_close()
                return web.Response(status=fault.status)
            case "fail":
                headers = dict(fault.headers or {})
                if fault.body is None:
                    response = self._error_response(fault.status, "injected fault", headers)
                    return response
                headers["Content-Type"] = fault.content_type
                return web.Response(status=fault.status, body=fault.body, headers=headers)
