"""Energydata.dk MQTT benchmark: acknowledged readings per second, windowed vs publish-and-wait.

    .venv/bin/python bench/bench_energydata.py [--readings 20000] [--rtt-ms 20] [--window 100]

A real mosquitto (gateway/sandbox/mosquitto.py) runs on a free port; every client reaches it
through a small MQTT-aware TCP proxy running in a child process, which adds half the round trip
in each direction (0 ms for "loopback") and counts, per connection, QoS 1 PUBLISH packets sent
by the client minus PUBACKs delivered back to it: the most ever outstanding is the "max unacked"
column, observed on the wire independently of the client's own bookkeeping.

Measured side by side in one run, per path (loopback, then the added round trip):

1. ``windowed``: the real pipeline - readings ingested into a store (SQLite), an UplinkRunner
   with the Energydata plugin, QoS 1 with at most ``--window`` unacknowledged, single-value
   messages (one reading per message, as the baseline); time from start until the store has
   nothing pending;
2. ``doc-loop``: the document's section 3.6 loop with paho-mqtt: ``publish(qos=1)`` then
   ``wait_for_publish()`` for each message, one at a time (``loop_start`` thread);
3. ``windowed multi``: as 1 with 20 series per instant in multi-value messages.

The ratio is windowed readings/s over doc-loop readings/s on the same path. Each side sends as
many readings as takes a few seconds (the doc-loop gets fewer over the slow path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import structlog

from gateway.configbase import Secret, StoreConfig
from gateway.models import Reading
from gateway.sandbox.energydata_broker import PUBACK, PUBLISH
from gateway.sandbox.mosquitto import Mosquitto
from gateway.store import Store
from gateway.uplinks.dispatch import UplinkRunner
from gateway.uplinks.energydata.config import EnergydataConfig
from gateway.uplinks.energydata.uplink import EnergydataUplink

TOKEN = "bench-token"

# -- the delaying proxy (child process) ---------------------------------------------------------


class _Proxy:
    def __init__(self, upstream: int, delay_s: float) -> None:
        self.upstream, self.delay_s = upstream, delay_s
        self.max_unacked = 0
        self.publishes = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        state = {"unacked": 0}
        # The process ends by cancelling what is left; a handler task ending cancelled makes
        # asyncio's stream callback print a traceback, so the end is taken quietly here.
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(reader, up_writer, state, to_broker=True))
                tg.create_task(self._pipe(up_reader, writer, state, to_broker=False))

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        state: dict[str, int],
        *,
        to_broker: bool,
    ) -> None:
        # Whole chunks travel with their arrival time; packets are only counted, never copied.
        queue: asyncio.Queue[tuple[float, bytes, int] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, chunk, acks = item
                if (wait := due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                state["unacked"] -= acks  # the client has its PUBACKs from now on
                writer.write(chunk)
            writer.close()

        task = asyncio.create_task(deliver())
        buf = b""
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                buf += chunk
                publishes, acks, buf = _count(buf)
                if to_broker:
                    self.publishes += publishes
                    state["unacked"] += publishes
                    self.max_unacked = max(self.max_unacked, state["unacked"])
                queue.put_nowait((time.monotonic() + self.delay_s, chunk, 0 if to_broker else acks))
        queue.put_nowait(None)
        await task


def _count(buf: bytes) -> tuple[int, int, bytes]:
    """(QoS 1/2 PUBLISH packets, PUBACK packets, the incomplete rest) of a byte stream."""
    publishes = acks = pos = 0
    while pos + 2 <= len(buf):
        first, length, mult, i = buf[pos], 0, 1, pos + 1
        while i < len(buf):
            length += (buf[i] & 0x7F) * mult
            mult *= 128
            i += 1
            if not buf[i - 1] & 0x80:
                break
        else:
            break
        if i + length > len(buf):
            break
        kind = first >> 4
        publishes += kind == PUBLISH and bool((first >> 1) & 3)
        acks += kind == PUBACK
        pos = i + length
    return publishes, acks, buf[pos:]


async def proxy_main(upstream: int, delay_ms: float) -> None:
    """Serve; print the port; on each stdin line print and reset the counters; EOF ends."""
    proxy = _Proxy(upstream, delay_ms / 1000)
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    loop = asyncio.get_running_loop()
    while await loop.run_in_executor(None, sys.stdin.readline):
        print(
            json.dumps({"max_unacked": proxy.max_unacked, "publishes": proxy.publishes}), flush=True
        )
        proxy.max_unacked = proxy.publishes = 0
    server.close()


class ProxyProcess:
    def __init__(self, upstream: int, delay_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--proxy", str(upstream), str(delay_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    def counters(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the two clients ----------------------------------------------------------------------------


def doc_loop(port: int, n: int) -> float:
    """The document's publish-then-wait loop with paho; seconds for ``n`` messages."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-doc-loop")
    client.username_pw_set(TOKEN)
    client.connect("127.0.0.1", port, 60)
    client.loop_start()
    try:
        t0 = time.perf_counter()
        for i in range(n):
            message = json.dumps({"timestamp": int(time.time() * 1000), "value": i})
            info = client.publish("bench/doc/value", message, qos=1)
            info.wait_for_publish(timeout=10)
        return time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()


async def windowed(
    port: int, n: int, window: int, concurrency: int, *, multi: bool, db: Path
) -> tuple[float, int]:
    """(seconds until the store has nothing pending, the plugin's max in flight)."""
    series = 20 if multi else 1
    cfg = EnergydataConfig.model_validate(
        {
            "name": "bench",
            "type": "energydata",
            "host": "127.0.0.1",
            "port": port,
            "tls": False,
            "token": {"env": "UNUSED"},
            "window": window,
            "concurrency": concurrency,
            "datasets": [
                {"name": "d", "prefix": "bench", "messages": "multi" if multi else "single"}
            ],
            "routes": [
                {"series": f"s{i}", "dataset": "d", "suffix": f"v/{i}"} for i in range(series)
            ],
        }
    )
    store = await Store.open(
        StoreConfig(path=db, commit_interval_ms=50, synchronous="normal"),
        {"bench": cfg.routed_series()},
    )
    writer = asyncio.create_task(store.run(), name="store:writer")
    t = int(time.time() * 1000)
    await store.ingest(
        [Reading(f"s{i % series}", t + i // series, float(i)) for i in range(n)], durable=True
    )
    uplink = EnergydataUplink(cfg, Secret(TOKEN, "bench"))
    runner = UplinkRunner(uplink, cfg, store)
    t0 = time.perf_counter()
    task = asyncio.create_task(runner.run(), name="uplink:bench")
    try:
        while True:
            await store.wait_for_data(0.02)
            if store.uplink_stats("bench")["backlog"] == 0:
                await store.refresh_stats()  # the counter, checked against the delivery state
                if store.uplink_stats("bench")["backlog"] == 0:
                    break
        elapsed = time.perf_counter() - t0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        in_flight = uplink.publisher.max_in_flight
        await uplink.aclose()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await store.aclose()
    return elapsed, in_flight


async def bench(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-edk-") as tmp:
        async with Mosquitto(Path(tmp) / "mq") as mq:
            for label, delay, n_doc in (
                ("loopback", 0.0, args.doc_readings),
                (f"+{args.rtt_ms:g} ms RTT", args.rtt_ms / 2, args.doc_readings_slow),
            ):
                proxy = ProxyProcess(mq.port, delay)
                try:
                    secs = await asyncio.to_thread(doc_loop, proxy.port, n_doc)
                    c = proxy.counters()
                    rows.append(
                        {
                            "path": label,
                            "mode": "doc-loop (paho, wait each)",
                            "readings": n_doc,
                            "s": secs,
                            "max_unacked": c["max_unacked"],
                            "in_flight": 1,
                        }
                    )
                    for multi in (False, True):
                        secs, in_flight = await windowed(
                            proxy.port,
                            args.readings,
                            args.window,
                            args.concurrency,
                            multi=multi,
                            db=Path(tmp) / f"{label[:4]}{multi}.db",
                        )
                        c = proxy.counters()
                        rows.append(
                            {
                                "path": label,
                                "readings": args.readings,
                                "s": secs,
                                "mode": f"windowed {'multi x20' if multi else 'single'}",
                                "max_unacked": c["max_unacked"],
                                "in_flight": in_flight,
                            }
                        )
                finally:
                    proxy.close()
    print(
        f"\nwindow={args.window} concurrency={args.concurrency} "
        f"readings={args.readings} (doc-loop: {args.doc_readings} / {args.doc_readings_slow})"
    )
    print(
        f"{'path':<14} {'mode':<28} {'readings':>9} {'seconds':>8} {'readings/s':>11} "
        f"{'max unacked':>12} {'ratio':>7}"
    )
    base: dict[str, float] = {}
    for r in rows:
        rate = r["readings"] / r["s"]
        base.setdefault(r["path"], rate)
        print(
            f"{r['path']:<14} {r['mode']:<28} {r['readings']:>9} {r['s']:>8.2f} {rate:>11.0f} "
            f"{r['max_unacked']:>12} {rate / base[r['path']]:>6.1f}x"
        )
    print(
        "max unacked: most QoS 1 publishes outstanding on one connection, seen by the proxy "
        "(the plugin's own count agreed: " + ", ".join(str(r["in_flight"]) for r in rows) + ")"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readings", type=int, default=20_000)
    p.add_argument("--doc-readings", type=int, default=3000)
    p.add_argument("--doc-readings-slow", type=int, default=200)
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--window", type=int, default=100)
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="uplink workers (1: see the Store.complete note in the report)",
    )
    p.add_argument("--proxy", nargs=2, metavar=("UPSTREAM", "DELAY_MS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.proxy:
        asyncio.run(proxy_main(int(args.proxy[0]), float(args.proxy[1])))
        return
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
