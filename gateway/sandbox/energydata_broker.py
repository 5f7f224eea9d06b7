"""The Energydata.dk MQTT broker's documented rules, in front of a real mosquitto.

Document 3.2 and 3.6: the token is the username; each client's publishes enter an incoming queue
of at most 1000 messages, dequeued serially (FIFO); a dequeued publish is checked for
authorisation: if allowed it is stored, forwarded to subscribers and (QoS 1) acknowledged; if not,
the client is disconnected at once and every message left in its queue is discarded. Publishes
arriving while the queue is full are dropped without a word.

Mosquitto 2.0 acknowledges an unauthorised MQTT 3.1.1 publish and silently drops it, and has no
per-client incoming queue, so this front enforces those rules and hands everything else (the
MQTT session, pings, delivery to subscribers) to mosquitto: a client connects here, each dequeued
publish goes to mosquitto and the next is dequeued only once mosquitto acknowledged it (serial,
as documented), and mosquitto's PUBACK travels back to the client.

What a caller may rely on::

    async with EnergydataBroker(("127.0.0.1", mq.port), tokens={"tok": ["siteA", "siteA/#"]},
                                queue_limit=1000) as front:
        front.port                        # 127.0.0.1, OS-chosen
        front.hold(); front.release()     # stop / resume dequeuing: queues fill up
        front.grant("tok", "siteB"); front.revoke("tok", "siteB/#")
        front.stored                      # [(topic, payload)] acknowledged: what the service keeps
        front.dropped, front.discarded    # overflow drops; queue left behind at a denial
        front.denied                      # [(client_id, topic)] unauthorised publishes
        front.max_queue, front.max_unacked, front.queued()   # deepest queue / most unacked seen
        front.connects, front.refused     # CONNECT packets seen; refused with a CONNACK code
        await front.wait_for(lambda: len(front.stored) >= 10, timeout=5)

Refusals: an unknown token gets CONNACK 5 (not authorised); mosquitto unreachable gets CONNACK 3
(server unavailable). Only MQTT 3.1.1 and plain TCP are spoken here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Self

import structlog

log = structlog.get_logger(__name__)

CONNECT, CONNACK, PUBLISH, PUBACK, DISCONNECT = 1, 2, 3, 4, 14


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest, including the parent)."""
    pat, top = pattern.split("/"), topic.split("/")
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(top) or (p != "+" and p != top[i]):
            return False
    return len(pat) == len(top)


def encode_packet(first: int, body: bytes) -> bytes:
    n = len(body)
    out = bytearray([first])
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out + body)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body). Raises IncompleteReadError at the end."""
    head = await reader.readexactly(2)
    first, length, mult, byte = head[0], 0, 1, head[1]
    for _ in range(4):
        length += (byte & 0x7F) * mult
        if not byte & 0x80:
            break
        mult *= 128
        byte = (await reader.readexactly(1))[0]
    return first, await reader.readexactly(length) if length else b""


def _string(body: bytes, pos: int) -> tuple[bytes, int]:
    n = int.from_bytes(body[pos : pos + 2], "big")
    return body[pos + 2 : pos + 2 + n], pos + 2 + n


def parse_connect(body: bytes) -> tuple[str, str | None]:
    """(client id, username) of a CONNECT body (3.1 or 3.1.1)."""
    _, pos = _string(body, 0)  # protocol name
    flags = body[pos + 1]
    pos += 4  # level, flags, keepalive
    client_id, pos = _string(body, pos)
    if flags & 0x04:  # will topic and message
        _, pos = _string(body, pos)
        _, pos = _string(body, pos)
    username = _string(body, pos)[0].decode() if flags & 0x80 else None
    return client_id.decode(errors="replace"), username


@dataclass(slots=True)
class _Publish:
    first: int
    body: bytes
    topic: str
    pid: int | None
    payload: bytes


def parse_publish(first: int, body: bytes) -> _Publish:
    topic, pos = _string(body, 0)
    qos = (first >> 1) & 3
    pid = None
    if qos:
        pid = int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
    return _Publish(first, body, topic.decode(errors="replace"), pid, body[pos:])


@dataclass(eq=False)
class _Client:
    client_id: str
    token: str
    writer: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    queue: deque[_Publish | None] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    acked: dict[int, asyncio.Event] = field(default_factory=dict)
    unacked: int = 0
    closed: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class EnergydataBroker:
    """The front (module docstring). One instance per test; not reusable after ``aclose``."""

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        tokens: Mapping[str, Iterable[str]],
        queue_limit: int = 1000,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.upstream = upstream
        self.tokens = {t: list(filters) for t, filters in tokens.items()}
        self.queue_limit = queue_limit
        self.host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[_Client] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._tick = asyncio.Event()
        self.stored: list[tuple[str, bytes]] = []
        self.denied: list[tuple[str, str]] = []
        self.dropped = 0
        self.discarded = 0
        self.max_queue = 0
        self.max_unacked = 0
        self.connects = 0
        self.refused: Counter[int] = Counter()

    # -- control -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the broker front is not running")
        return self._port

    def hold(self) -> None:
        """Stop dequeuing: publishes wait in their queues (a broker that cannot keep up)."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def grant(self, token: str, topic_filter: str) -> None:
        self.tokens.setdefault(token, []).append(topic_filter)

    def revoke(self, token: str, topic_filter: str) -> None:
        self.tokens[token] = [f for f in self.tokens.get(token, []) if f != topic_filter]

    def queued(self) -> int:
        """Publishes waiting in all client queues right now."""
        return sum(len(c.queue) for c in self._clients)

    def _changed(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Return once ``predicate()`` holds; re-checked after every change. TimeoutError."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._tick.wait()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self._port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.info("energydata_broker_started", port=self._port, upstream=self.upstream)

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Ending every connection ends its handler normally (a cancelled handler task makes
        # asyncio's stream callback log an error); cancelling is only the fallback.
        for c in list(self._clients):
            self._close(c)
        for w in list(self._writers):
            w.close()
        if self._handlers:
            _, late = await asyncio.wait(list(self._handlers), timeout=5)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- one client --------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            await self._session(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, IndexError):
            pass
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _refuse(self, writer: asyncio.StreamWriter, code: int) -> None:
        self.refused[code] += 1
        writer.write(encode_packet(CONNACK << 4, bytes([0, code])))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        self._changed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(10):
            first, body = await read_packet(reader)
        if first >> 4 != CONNECT:
            return
        client_id, token = parse_connect(body)
        self.connects += 1
        if token is None or token not in self.tokens:
            await self._refuse(writer, 5)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            await self._refuse(writer, 3)
            return
        c = _Client(client_id, token, writer, up_writer)
        self._clients.add(c)
        self._changed()
        up_writer.write(encode_packet(first, body))
        try:
            async with asyncio.TaskGroup() as tg:
                c.tasks = [
                    tg.create_task(self._from_client(c, reader)),
                    tg.create_task(self._dequeue(c)),
                    tg.create_task(self._from_broker(c, up_reader)),
                ]
                for t in c.tasks:  # the first to end (EOF, denial) ends the session
                    t.add_done_callback(lambda _t: self._close(c))
        finally:
            self._close(c)
            self._clients.discard(c)
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()
            self._changed()

    def _close(self, c: _Client) -> None:
        if c.closed:
            return
        c.closed = True
        c.writer.close()
        c.upstream.close()
        for task in c.tasks:  # a dequeuer held by hold() wakes only so
            if task is not asyncio.current_task():
                task.cancel()

    async def _from_client(self, c: _Client, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while not c.closed:
                first, body = await read_packet(reader)
                kind = first >> 4
                if kind == PUBLISH:
                    msg = parse_publish(first, body)
                    if len(c.queue) >= self.queue_limit:
                        self.dropped += 1  # "discards any messages it receives"
                        self._changed()
                        continue
                    c.queue.append(msg)
                    if msg.pid is not None:
                        c.unacked += 1
                        self.max_unacked = max(self.max_unacked, c.unacked)
                    self.max_queue = max(self.max_queue, len(c.queue))
                    c.wake.set()
                    self._changed()
                elif kind == DISCONNECT:
                    c.queue.append(None)  # after what is already queued
                    c.wake.set()
                else:
                    c.upstream.write(encode_packet(first, body))

    async def _dequeue(self, c: _Client) -> None:
        while not c.closed:
            if not c.queue:
                c.wake.clear()
                await c.wake.wait()
                continue
            await self._flowing.wait()
            if c.closed:
                return
            msg = c.queue.popleft()
            self._changed()
            if msg is None:
                c.upstream.write(encode_packet(DISCONNECT << 4, b""))
                return
            if not any(topic_matches(f, msg.topic) for f in self.tokens.get(c.token, ())):
                self.denied.append((c.client_id, msg.topic))
                self.discarded += len(c.queue)
                log.info(
                    "energydata_broker_denied",
                    client_id=c.client_id,
                    topic=msg.topic,
                    discarded=len(c.queue),
                )
                self._close(c)
                self._changed()
                return
            if msg.pid is None:
                c.upstream.write(encode_packet(msg.first, msg.body))
                self.stored.append((msg.topic, msg.payload))
                continue
            done = asyncio.Event()
            c.acked[msg.pid] = done
            c.upstream.write(encode_packet(msg.first, msg.body))
            await done.wait()  # serial: the next one only after this one is acknowledged
            if c.closed:
                return
            self.stored.append((msg.topic, msg.payload))
            c.unacked -= 1
            # The PUBACK is passed on by _from_broker only now, after the record.
            c.writer.write(encode_packet(PUBACK << 4, msg.pid.to_bytes(2, "big")))
            self._changed()

    async def _from_broker(self, c: _Client, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while not c.closed:
                first, body = await read_packet(reader)
                if first >> 4 == PUBACK:
                    pid = int.from_bytes(body[:2], "big")
                    ev = c.acked.pop(pid, None)
                    if ev is not None:
                        ev.set()
                        continue
                c.writer.write(encode_packet(first, body))
                if first >> 4 == CONNACK:
                    await c.writer.drain()
