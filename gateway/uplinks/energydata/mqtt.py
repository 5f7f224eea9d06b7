"""The Energydata.dk MQTT side: one connection, a bounded window of unacknowledged publishes.

What callers rely on (:class:`WindowedPublisher`):

* ``publish(messages)`` returns ``(acked, failure)``: ``acked`` are the messages whose PUBACK
  arrived (and only those); every other message was not delivered and ``failure`` says why
  (None when all were acknowledged). Nothing is retried here: the dispatcher re-sends the rest.
* At most ``window`` publishes are unacknowledged at any moment across all concurrent callers
  (one :class:`asyncio.Semaphore`); paho's own in-flight limit is off, so paho never holds a
  publish back behind our window. ``max_in_flight`` records the most ever seen.
* One long-lived connection, opened lazily and shared. A lost connection is reopened by the next
  ``publish`` no sooner than a capped, jittered backoff allows (``RetrySchedule`` from
  gateway/backoff; reset once a new connection has had a PUBACK). Which cap depends on what
  happened: a connection that dropped or timed out, or a broker that could not be reached
  (refused, reset, DNS, timeout), is the link or the broker being down, retried on the short
  schedule (up to ``reconnect_max_s``, default 5 s: the first delivery comes within seconds of
  the broker's return); a broker that answered and refused (a CONNACK refusal other than auth, a
  certificate that does not verify) backs off up to ``backoff_max_s``; refused credentials wait
  ``auth_retry_s``. The failure handed to the dispatcher carries the wait as ``retry_after``, so
  the runner waits exactly that long, once, for all its workers. Each connection is a fresh
  ``aiomqtt.Client`` with a clean session: messages unacknowledged when it dropped are not
  replayed by paho but re-sent by the dispatcher.

Recognising "not authorised" (document 3.6): the broker handles a client's publishes in order,
acknowledges the authorised ones and, on the first it may not accept, disconnects the client and
discards the rest. MQTT 3.1.1 carries no reason on that disconnect, and a network failure looks
the same, so:

1. when a connection drops with publishes unacknowledged, the topic of the oldest one becomes a
   *suspect*;
2. the next send publishes everything else first, then one message of each suspect topic alone
   (holding the whole window, so nothing else is in flight): a PUBACK clears the suspect; the
   connection dropping instead confirms it. A confirmed topic fails with ``auth`` naming the
   topic, and its messages are held back (not published at all) for ``auth_retry_s`` while
   other topics keep flowing; then it is probed again.

A CONNACK refusal with code 4 or 5 (bad credentials, not authorised) is ``auth`` too. (Mosquitto
2.0 instead acknowledges and silently drops an unauthorised 3.1.1 publish, which no client can
see; gateway/sandbox/energydata_broker.py stands in for the service's documented behaviour.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import aiomqtt
import structlog
from aiomqtt import MqttError
from aiomqtt.exceptions import MqttConnectError

from gateway.backoff import RetrySchedule
from gateway.configbase import Secret
from gateway.uplinks.base import Failure, Outcome
from gateway.uplinks.energydata.config import EnergydataConfig
from gateway.uplinks.energydata.messages import Message

log = structlog.get_logger(__name__)

#: CONNACK codes (3.1.1) and their MQTT 5 reason codes that mean the token was refused.
_AUTH_CONNACK = frozenset({4, 5, 134, 135})


class _Link:
    """One connection: its client, the watcher task and what is unacknowledged on it."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.dead = asyncio.Event()
        self.failure: Failure | None = None
        #: seq -> topic of every publish not yet acknowledged, in the order they were sent.
        self.unacked: dict[int, str] = {}
        self.suspect: str | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.acked_any = False
        #: The connection ended under us (not a publish error, not our own close).
        self.lost = False
        self.watcher: asyncio.Task[None] | None = None

    def kill(self, failure: Failure) -> bool:
        """Mark dead (first reason wins) and cancel its waiting publishes; False if already."""
        if self.dead.is_set():
            return False
        self.failure = failure
        self.suspect = next(iter(self.unacked.values()), None)
        self.dead.set()
        for task in list(self.tasks):
            task.cancel()
        return True


def _unreachable(exc: BaseException) -> bool:
    """A failed connect that never reached the broker (refused, reset, DNS, timeout): aiomqtt
    raises MqttError from paho's OSError. False for a TLS refusal (a certificate that does not
    verify, a handshake the broker refused): the broker answered, retried slowly."""
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return isinstance(cause, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError))
    return isinstance(cause, OSError)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc)
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text[:200]


class WindowedPublisher:
    """Publishes with QoS 1 keeping at most ``cfg.window`` unacknowledged (module docstring)."""

    def __init__(self, cfg: EnergydataConfig, token: Secret) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._token = token
        self.client_id = cfg.resolved_client_id()
        self._window = asyncio.Semaphore(cfg.window)
        self._link: _Link | None = None
        self._connect_lock = asyncio.Lock()
        self._probe_lock = asyncio.Lock()
        self._retry = RetrySchedule(cfg.backoff_initial_s, cfg.backoff_max_s, cfg.reconnect_max_s)
        self._connect_after = 0.0  # monotonic
        self._last_error = ""
        #: Whether the last failure was the broker not reached (the short schedule).
        self._last_unreachable = False
        #: topic -> monotonic time from which it may be tried again (0: probe at next send).
        self._suspects: dict[str, float] = {}
        self._seq = itertools.count()
        self._tls: _TrackingContext | None = None
        self.in_flight = 0
        self.max_in_flight = 0
        self.connects = 0
        self.acked = 0

    def status(self) -> dict[str, object]:
        link = self._link
        return {
            "connected": link is not None and not link.dead.is_set(),
            "client_id": self.client_id,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "window": self.cfg.window,
            "connects": self.connects,
            "acked": self.acked,
            "forbidden_topics": sorted(t for t, at in self._suspects.items() if at > 0),
            "last_error": self._last_error or None,
        }

    def forgive(self) -> None:
        """Probe every topic refused so far at the next send (an operator fixed the token)."""
        for topic in self._suspects:
            self._suspects[topic] = 0.0
        self._connect_after = 0.0

    # -- publishing ------------------------------------------------------------------------------

    async def publish(self, messages: Sequence[Message]) -> tuple[list[Message], Failure | None]:
        """Publish ``messages``; see the module docstring for what comes back."""
        now = time.monotonic()
        held = [m for m in messages if self._suspects.get(m.topic, -1.0) > now]
        probing = {t for t, at in self._suspects.items() if at <= now}
        normal = [m for m in messages if m.topic not in self._suspects]
        suspect = [m for m in messages if m.topic in probing]
        if not normal and not suspect:
            return [], self._held_failure(held) if held else None
        link = await self._connected()
        if isinstance(link, Failure):
            return [], link
        acked = await self._pump(link, normal)
        if link.dead.is_set():
            return acked, self._death(link)
        for topic in dict.fromkeys(m.topic for m in suspect):
            msgs = [m for m in suspect if m.topic == topic]
            if not await self._probe(link, msgs[0]):
                return acked, self._death(link)  # auth when the probe confirmed the topic
            acked.append(msgs[0])
            acked.extend(await self._pump(link, msgs[1:]))
            if link.dead.is_set():
                return acked, self._death(link)
        return acked, self._held_failure(held) if held else None

    def _held_failure(self, held: Sequence[Message]) -> Failure:
        topic = held[0].topic
        return Failure(
            Outcome.AUTH,
            f"not authorised to publish to topic {topic!r} "
            "(the broker disconnected on it; retried after auth_retry_s)",
        )

    def _death(self, link: _Link) -> Failure:
        failure = link.failure or Failure(Outcome.TRANSIENT, "connection lost", unreachable=True)
        if failure.outcome is not Outcome.TRANSIENT:
            return failure
        # The reconnect's own wait (set when the link died): the runner takes it as it is.
        return replace(failure, retry_after=max(0.0, self._connect_after - time.monotonic()))

    async def _pump(self, link: _Link, messages: Sequence[Message]) -> list[Message]:
        """Publish in order, at most ``window`` unacknowledged; the acknowledged ones."""
        acked: list[Message] = []
        if not messages:
            return acked
        async with asyncio.TaskGroup() as tg:
            for m in messages:
                await self._window.acquire()
                if link.dead.is_set():
                    self._window.release()
                    break
                task = tg.create_task(self._one(link, m, acked), name=f"uplink:{self.name}:pub")
                link.tasks.add(task)
                task.add_done_callback(link.tasks.discard)
        return acked

    async def _one(self, link: _Link, m: Message, acked: list[Message]) -> None:
        """One publish holding one window permit (released here, whatever happens)."""
        seq = next(self._seq)
        link.unacked[seq] = m.topic
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await link.client.publish(m.topic, m.payload, qos=1, timeout=self.cfg.ack_timeout_s)
        except MqttError as exc:
            # Not connected any more, or no PUBACK within ack_timeout_s: either way the state
            # of the connection is unknown, so it is dropped and everything unacked re-sent.
            await self._kill_soon(
                link,
                Failure(Outcome.TRANSIENT, f"publish failed: {_describe(exc)}", unreachable=True),
            )
        else:
            del link.unacked[seq]
            acked.append(m)
            self.acked += 1
            if not link.acked_any:
                link.acked_any = True
                self._retry.reset()
        finally:
            self.in_flight -= 1
            self._window.release()

    async def _probe(self, link: _Link, m: Message) -> bool:
        """Publish ``m`` with nothing else in flight. True: acknowledged."""
        acked: list[Message] = []
        task: asyncio.Task[None] | None = None
        async with self._probe_lock:
            taken = 0
            try:
                while taken < self.cfg.window:  # the whole window: nothing else in flight
                    await self._window.acquire()
                    taken += 1
                if link.dead.is_set():
                    return False
                taken -= 1  # _one releases this one
                task = asyncio.create_task(
                    self._one(link, m, acked), name=f"uplink:{self.name}:probe"
                )
                link.tasks.add(task)
                task.add_done_callback(link.tasks.discard)
                try:
                    # wait() rather than await: the link cancels the task when it drops.
                    await asyncio.wait([task])
                except asyncio.CancelledError:
                    task.cancel()
                    raise
            finally:
                for _ in range(taken):
                    self._window.release()
        if acked:
            self._suspects.pop(m.topic, None)
            log.info("energydata_topic_cleared", uplink=self.name, topic=m.topic)
            return True
        # Confirmed only when the broker ended the connection while this message was alone in
        # flight; a publish error, an ack timeout or our own close proves nothing.
        if task is not None and task.cancelled() and link.lost and link.suspect == m.topic:
            retry_at = time.monotonic() + self.cfg.auth_retry_s
            self._suspects[m.topic] = retry_at
            link.failure = Failure(
                Outcome.AUTH,
                f"not authorised to publish to topic {m.topic!r} (the broker disconnected "
                "on it alone)",
            )
            log.warning(
                "energydata_topic_not_authorised",
                uplink=self.name,
                topic=m.topic,
                retry_in_s=self.cfg.auth_retry_s,
            )
        return False

    # -- the connection --------------------------------------------------------------------------

    async def _connected(self) -> _Link | Failure:
        link = self._link
        if link is not None and not link.dead.is_set():
            return link
        async with self._connect_lock:
            link = self._link
            if link is not None and not link.dead.is_set():
                return link
            if link is not None:
                self._link = None
                await self._close_link(link)
            wait = self._connect_after - time.monotonic()
            if wait > 0:
                return Failure(
                    Outcome.TRANSIENT,
                    f"reconnect in {wait:.1f} s after: {self._last_error}",
                    retry_after=wait,
                    unreachable=self._last_unreachable,
                )
            result = await self._open()
            if isinstance(result, Failure):
                delay = (
                    self.cfg.auth_retry_s
                    if result.outcome is Outcome.AUTH
                    else self._retry.next(unreachable=result.unreachable)
                )
                self._last_unreachable = result.unreachable
                self._connect_after = time.monotonic() + delay
                # The first failure loudly, repeats quietly until a connection succeeds.
                level = log.debug if self._last_error == result.message else log.warning
                self._last_error = result.message
                level(
                    "energydata_connect_failed",
                    uplink=self.name,
                    outcome=result.outcome.value,
                    error=result.message,
                    retry_in_s=round(delay, 2),
                )
                if result.outcome is Outcome.AUTH:
                    return result
                # The connection's own backoff decides when to try again: the runner waits
                # exactly that long instead of stacking its backoff on top (with several workers
                # each failing, a 30 s outage used to leave a minute or more of waiting behind it).
                return replace(result, retry_after=delay)
            self._link = result
            return result

    async def _tls_context(self) -> _TrackingContext:
        if self._tls is None:
            # Loading the system CA store reads many files: not on the event loop.
            self._tls = await asyncio.to_thread(_TrackingContext.verifying, self.cfg.ca_file)
        return self._tls

    async def _open(self) -> _Link | Failure:
        cfg = self.cfg
        tls = await self._tls_context() if cfg.tls else None
        if tls is not None:
            tls.orphans.clear()
        client = aiomqtt.Client(
            cfg.host,
            cfg.resolved_port(),
            username=self._token.reveal(),
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            clean_session=True,
            keepalive=cfg.keepalive_s,
            timeout=cfg.connect_timeout_s,
            # 0: paho never queues a publish (our window is the only bound), and skips its
            # O(in-flight) scan of queued messages on every PUBACK.
            max_inflight_messages=0,
            tls_context=tls,
            # paho leaves Nagle on: small publishes would wait for the peer's delayed ACK
            # (up to 40 ms each time), which halves a window's throughput on a slow link.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # aiomqtt logs a warning per publish beyond this many pending; our window is the bound.
        client.pending_calls_threshold = cfg.window + 1
        self.connects += 1
        try:
            async with asyncio.timeout(cfg.connect_timeout_s + 5):
                await client.__aenter__()
        except (aiomqtt.MqttError, TimeoutError) as exc:
            _abandon(client)
            if tls is not None:
                tls.close_orphans()
            await _misc_task_done(client)
            if isinstance(exc, MqttConnectError):
                # The broker answered: a CONNACK refusal is never "down", retried slowly.
                code = getattr(exc.rc, "value", exc.rc)
                outcome = Outcome.AUTH if code in _AUTH_CONNACK else Outcome.TRANSIENT
                return Failure(outcome, f"broker refused the connection: {exc}")
            if isinstance(exc, TimeoutError):
                return Failure(Outcome.TRANSIENT, "connect timed out", unreachable=True)
            return Failure(
                Outcome.TRANSIENT,
                f"connect failed: {_describe(exc)}",
                unreachable=_unreachable(exc),
            )
        link = _Link(client)
        link.watcher = asyncio.create_task(self._watch(link), name=f"uplink:{self.name}:mqtt")
        log.info(
            "energydata_connected",
            uplink=self.name,
            host=cfg.host,
            port=cfg.resolved_port(),
            tls=cfg.tls,
            client_id=self.client_id,
        )
        return link

    async def _watch(self, link: _Link) -> None:
        """Wait for the connection to drop (aiomqtt ends its message iterator then)."""
        try:
            async for _ in link.client.messages:
                pass  # nothing is subscribed
        except MqttError as exc:
            link.lost = True
            await self._kill_soon(
                link,
                Failure(Outcome.TRANSIENT, f"connection lost: {_describe(exc)}", unreachable=True),
            )

    async def _kill_soon(self, link: _Link, failure: Failure) -> None:
        # PUBACKs read before the connection ended have set their publishers' events, but
        # those publishers resume a few loop turns later; let them record their acknowledgement
        # before the rest are cancelled (else they would only be sent twice, never lost).
        for _ in range(8):
            await asyncio.sleep(0)
        self._kill(link, failure)

    def _kill(self, link: _Link, failure: Failure) -> None:
        if not link.kill(failure):
            return
        self._last_error = failure.message
        # A connection that dropped (or stopped acknowledging) is the link or the broker going
        # away: reconnect on the short schedule. (A broker that drops us on purpose, for a
        # topic we may not publish to, is caught by the suspect probe below and auth_retry_s.)
        self._last_unreachable = True
        delay = self._retry.next(unreachable=True)
        self._connect_after = max(self._connect_after, time.monotonic() + delay)
        if link.suspect is not None and link.suspect not in self._suspects:
            self._suspects[link.suspect] = 0.0
        log.warning(
            "energydata_disconnected",
            uplink=self.name,
            error=failure.message,
            unacked=len(link.unacked),
            suspect_topic=link.suspect,
        )

    async def _close_link(self, link: _Link) -> None:
        link.kill(Failure(Outcome.TRANSIENT, "connection closed"))
        if link.watcher is not None:
            link.watcher.cancel()
            await asyncio.gather(link.watcher, return_exceptions=True)
        try:
            async with asyncio.timeout(5):
                await link.client.__aexit__(None, None, None)
        except (MqttError, TimeoutError, OSError):
            _abandon(link.client)
        await _misc_task_done(link.client)

    async def aclose(self) -> None:
        """Close the connection (idempotent). Unacknowledged publishes stay pending."""
        async with self._connect_lock:
            link, self._link = self._link, None
            if link is not None:
                await self._close_link(link)


class _TrackingContext(ssl.SSLContext):
    """A verifying client context that remembers the sockets it wraps.

    paho does the TLS handshake inside ``connect``; when the handshake fails (an unknown CA, a
    wrong host name) it raises without closing the wrapped socket, which nobody else can reach.
    Remembering them lets a failed connect close them (else a socket leaks per attempt).
    """

    orphans: list[ssl.SSLSocket]

    @classmethod
    def verifying(cls, ca_file: object | None) -> _TrackingContext:
        """Certificates and host names verified: against ``ca_file`` only, when given, else
        against the system store (what ``ssl.create_default_context`` sets up)."""
        ctx = cls(ssl.PROTOCOL_TLS_CLIENT)
        if ca_file is not None:
            ctx.load_verify_locations(cafile=str(ca_file))
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        ctx.orphans = []
        return ctx

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.orphans.append(sock)
        return sock

    def close_orphans(self) -> None:
        while self.orphans:
            with contextlib.suppress(OSError):
                self.orphans.pop().close()


def _abandon(client: aiomqtt.Client) -> None:
    """Close the socket of a client that never finished connecting (aiomqtt leaves it open)."""
    paho: Any = client._client
    sock = paho.socket()
    if sock is not None:
        paho._sock_close()


async def _misc_task_done(client: aiomqtt.Client) -> None:
    # aiomqtt cancels its keepalive task through call_soon_threadsafe; wait for it so that no
    # task outlives the connection (tests fail on leaked tasks, and so should a daemon).
    task: asyncio.Task[None] | None = getattr(client, "_misc_task", None)
    if task is not None and not task.done():
        await asyncio.wait([task], timeout=2)
