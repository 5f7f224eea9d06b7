"""What the HTTP uplinks share: one way to build a client, call a service and classify the answer.

Every httpx error is translated here into a transient :class:`~gateway.uplinks.base.SendResult`
(no exception crosses into the dispatcher, no request header, so no token, reaches a message).
Status codes map to DESIGN.md's outcome classes; a plugin looks at the body only where its
service puts per-item results there.
"""

from __future__ import annotations

import email.utils
import ssl
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import httpx

from gateway.configbase import RouteBase, mask_secrets
from gateway.uplinks.base import Outcome, SendResult

R = TypeVar("R", bound=RouteBase)

#: Longest service error text kept in a dead letter or status line.
MAX_REASON = 500


def make_client(
    timeout_s: float, *, verify: bool = True, ca_file: Path | None = None
) -> httpx.AsyncClient:
    """An AsyncClient with explicit per-phase timeouts and TLS verification on by default."""
    tls: ssl.SSLContext | bool
    if not verify:
        tls = False
    else:
        tls = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
    return httpx.AsyncClient(
        timeout=timeout,
        verify=tls,
        follow_redirects=False,
        headers={"User-Agent": "fieldgate/0.1"},
        limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
    )


class LazyClient:
    """An uplink's one HTTP client: made on first use (so loading a config opens nothing),
    closed by :meth:`aclose`, which is idempotent; a later :meth:`get` makes a fresh one."""

    __slots__ = ("_ca_file", "_client", "_timeout_s", "_verify")

    def __init__(self, timeout_s: float, *, verify: bool = True, ca_file: Path | None = None):
        self._timeout_s = timeout_s
        self._verify = verify
        self._ca_file = ca_file
        self._client: httpx.AsyncClient | None = None

    def get(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = make_client(self._timeout_s, verify=self._verify, ca_file=self._ca_file)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


class HttpSettings(Protocol):
    """The config fields every HTTP plugin's client is built from."""

    name: str
    timeout_s: float
    verify_tls: bool
    ca_file: Path | None


class HttpPlugin(Generic[R]):
    """What every HTTP plugin has in common: its name, its routes by series (the ``routes`` of
    the :class:`~gateway.uplinks.base.Uplink` protocol) and one lazily made client, closed by
    :meth:`aclose`. Plugins subclass it and add their wire format."""

    def __init__(self, cfg: HttpSettings, routes: Iterable[R]) -> None:
        self.name = cfg.name
        self._routes: dict[str, R] = {r.series: r for r in routes}
        self._client = LazyClient(cfg.timeout_s, verify=cfg.verify_tls, ca_file=cfg.ca_file)

    @property
    def routes(self) -> Mapping[str, R]:
        return self._routes

    def _http(self) -> httpx.AsyncClient:
        return self._client.get()

    async def aclose(self) -> None:
        await self._client.aclose()


def retry_after(headers: Any) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date), or None."""
    raw = headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def reason_text(response: httpx.Response) -> str:
    text = mask_secrets(response.text.strip().replace("\n", " "))
    return (
        f"HTTP {response.status_code}: {text[:MAX_REASON]}"
        if text
        else f"HTTP {response.status_code}"
    )


def classify(response: httpx.Response) -> SendResult:
    """The outcome of a non-success answer, by status code alone."""
    code = response.status_code
    msg = reason_text(response)
    if code in (401, 403):
        return SendResult.failed(Outcome.AUTH, msg, status=code)
    if code == 413:
        return SendResult.failed(Outcome.TOO_LARGE, msg, status=code)
    if code in (408, 425, 429) or code >= 500:
        return SendResult.failed(
            Outcome.TRANSIENT, msg, retry_after=retry_after(response.headers), status=code
        )
    if code in (400, 422):
        return SendResult.failed(Outcome.REJECTED, msg, status=code)
    # 404, 405, 409 ...: a wrong URL or a service change. Nothing the data did: keep it.
    return SendResult.failed(Outcome.TRANSIENT, msg, status=code)


#: TLS errors that are a connection ending mid-handshake (the link), not a refusal.
_TLS_DROPS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def unreachable(exc: BaseException) -> bool:
    """True when ``exc`` means the service was not reached or the connection dropped: connect
    refused, reset, DNS, a timeout, a server that closed without answering. The link or the
    service is down and may be back within seconds (the short retry schedule). False when the
    service answered in a way a quick retry cannot change: a TLS certificate or handshake we
    refuse, a protocol error on our side, too many redirects."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, _TLS_DROPS):
            return False
        cause = cause.__cause__ or cause.__context__
    return isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError))


def transport_failure(exc: Exception) -> SendResult:
    """A network-level failure (refused, reset, timeout, TLS) as a transient result, marked
    ``unreachable`` unless the service answered (:func:`unreachable`)."""
    if isinstance(exc, httpx.TimeoutException):
        kind = "timeout"
    elif isinstance(exc, httpx.ConnectError):
        kind = "connect failed"
    else:
        kind = "transport error"
    # The exception text names host and port but never headers; keep it short.
    return SendResult.failed(
        Outcome.TRANSIENT,
        f"{kind}: {type(exc).__name__}: {str(exc)[:200]}",
        unreachable=unreachable(exc),
    )
