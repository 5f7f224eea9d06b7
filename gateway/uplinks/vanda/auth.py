"""OAuth2 client-credentials tokens (RFC 6749 section 4.4), as the Vanda uplink needs them.

Danmarks Miljøportal's IdP publishes its token endpoint as ``/runtime/oauth2/token.idp``
(``https://log-in.miljoeportal.dk`` in production, ``https://log-in.test.miljoeportal.dk`` for
TEST and DEMO) and the Hydro API wants scope ``openid``. A :class:`TokenSource` asks for a token
only when it has none or the one it has is about to expire, and one caller at a time (the others
wait for that answer), so concurrent workers never stampede the IdP.

Failures are raised as the gateway's own errors (``raise ... from exc`` at the httpx boundary)::

    FieldgateError
     ├── TransientError   network error, timeout, 408/429/5xx from the IdP (retry_after set)
     └── AuthError        400/401/403 from the IdP: invalid_client, a revoked or wrong secret,
                          invalid_scope; retrying the same credentials cannot help

No message ever holds the client id, the client secret or a token: the IdP's
``error_description`` is copied only after both credentials are masked out of it.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable
from typing import Literal
from urllib.parse import quote_plus

import httpx
import structlog

from gateway.configbase import Secret
from gateway.errors import AuthError, TransientError
from gateway.uplinks import http

log = structlog.get_logger(__name__)

#: Assumed lifetime when the IdP's answer has no ``expires_in`` (a 401 refreshes it earlier).
DEFAULT_LIFETIME_S = 300.0
MASK = "***"


class TokenSource:
    """Bearer tokens for one client, cached until ``margin_s`` before they expire.

    ``clock`` is a monotonic clock in seconds (tests pass a manual one to expire a token
    without waiting). :meth:`get` returns a token or raises AuthError/TransientError;
    :meth:`invalidate` forgets a token the API refused so the next :meth:`get` fetches anew.
    """

    def __init__(
        self,
        token_url: str,
        client_id: Secret,
        client_secret: Secret,
        *,
        scope: str = "openid",
        client_auth: Literal["post", "basic"] = "post",
        margin_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "vanda",
    ) -> None:
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self.scope = scope
        self.client_auth = client_auth
        self.margin_s = margin_s
        self._clock = clock
        self._name = name
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        #: Tokens obtained so far (observability; tests compare it with the IdP's count).
        self.issued = 0

    def _fresh(self) -> str | None:
        if self._token is not None and self._clock() < self._refresh_at:
            return self._token
        return None

    async def get(self, client: httpx.AsyncClient) -> str:
        """A token valid for at least ``margin_s`` more seconds (or half its lifetime)."""
        if (token := self._fresh()) is not None:
            return token
        async with self._lock:
            # Another caller may have fetched one while we waited for the lock.
            if (token := self._fresh()) is not None:
                return token
            return await self._fetch(client)

    def invalidate(self, token: str | None = None) -> None:
        """Forget ``token`` (or whatever is cached): the API refused it."""
        if token is None or token == self._token:
            self._token = None
            self._refresh_at = 0.0

    def scrub(self, text: str) -> str:
        """``text`` with the client id, the secret and the current token masked."""
        for s in (self._client_secret.reveal(), self._client_id.reveal(), self._token):
            if s:
                text = text.replace(s, MASK)
        return text

    async def _fetch(self, client: httpx.AsyncClient) -> str:
        data = {"grant_type": "client_credentials", "scope": self.scope}
        headers = {"Accept": "application/json"}
        cid, secret = self._client_id.reveal(), self._client_secret.reveal()
        if self.client_auth == "basic":
            # RFC 6749 2.3.1: both parts are form-urlencoded before the Basic encoding.
            pair = f"{quote_plus(cid)}:{quote_plus(secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        else:
            data["client_id"] = cid
            data["client_secret"] = secret
        try:
            resp = await client.post(self.token_url, data=data, headers=headers)
        except httpx.HTTPError as exc:
            failure = http.transport_failure(exc).failure
            msg = failure.message if failure else type(exc).__name__
            raise TransientError(f"token endpoint: {self.scrub(msg)}") from exc
        if resp.status_code != 200:
            raise self._refusal(resp)
        try:
            answer = resp.json()
            token = answer["access_token"]
            kind = str(answer.get("token_type") or "Bearer")
            raw_life = answer.get("expires_in")
            lifetime = float(raw_life) if raw_life is not None else DEFAULT_LIFETIME_S
        except (ValueError, KeyError, TypeError, AttributeError):
            raise TransientError("token endpoint: unreadable answer (no access_token)") from None
        if not isinstance(token, str) or not token or kind.lower() != "bearer":
            raise TransientError(f"token endpoint: no usable bearer token (token_type {kind!r})")
        now = self._clock()
        self._token = token
        self._refresh_at = now + max(0.0, lifetime - min(self.margin_s, lifetime / 2))
        self.issued += 1
        log.info("oauth_token_issued", uplink=self._name, expires_in_s=lifetime)
        return token

    def _refusal(self, resp: httpx.Response) -> AuthError | TransientError:
        code = resp.status_code
        detail = ""
        try:
            body = resp.json()
            if isinstance(body, dict):
                detail = " ".join(str(body.get(k) or "") for k in ("error", "error_description"))
        except ValueError:
            detail = resp.text
        detail = self.scrub(" ".join(detail.split()))[:200]
        msg = f"token endpoint answered HTTP {code}" + (f": {detail}" if detail else "")
        if code in (400, 401, 403):
            log.warning("oauth_token_refused", uplink=self._name, status=code, error=detail)
            return AuthError(msg)
        return TransientError(msg, retry_after=http.retry_after(resp.headers))
