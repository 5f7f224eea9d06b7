"""The end-to-end benchmark's counting subscriber (a process of its own; see bench/e2e.py).

    python bench/e2e_subscriber.py --port P --format fieldgate|peer --registers 125 --units 1-200

Subscribes (QoS 1, persistent session) to what a gateway publishes and keeps, per unit, which
registers of which poll arrived. A poll is identified by (unit, timestamp): every register of one
Modbus read carries the read's timestamp, and register 0 carries the simulator's poll counter,
so at the end the harness can tell, per unit, which polls arrived whole, which in part, which
not at all, and which points arrived more than once.

Commands on stdin, one per line, each answered by one JSON line on stdout:

- ``stats``: totals, duplicates, latency percentiles since the last ``mark``, last arrival;
- ``mark``: start a new latency window (the harness marks after warm-up);
- ``polls``: per unit, the polls received whole as sorted [counter, timestamp, arrival ms],
  and the number of (unit, timestamp) groups still incomplete and how many points they hold;
- ``quit``.

Latency is arrival time (this host's wall clock) minus the reading's timestamp, per point
(a message carrying 100 values counts 100 times), in 1 ms buckets.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Parsed = Iterator[tuple[int, int, int | None, dict[int, int]]]
_BUCKETS = 600_000  # 1 ms buckets: 10 minutes


class Tally:
    def __init__(self, registers: int) -> None:
        self.full = (1 << registers) - 1
        self.open: dict[tuple[int, int], list[int]] = {}  # (unit, ts) -> [mask, counter]
        #: unit -> [counter, timestamp, arrival ms] of each poll that arrived whole
        self.whole: dict[int, list[tuple[int, int, int]]] = {}
        self.points = 0
        self.dups = 0
        self.redelivered = 0
        self.messages = 0
        self.last_arrival = 0.0
        #: Polls already whole: a later copy of any of their points is a duplicate.
        self.closed: set[tuple[int, int]] = set()
        self.hist = [0] * _BUCKETS
        self.lock = threading.Lock()

    def add(self, parsed: Parsed, now_ms: int, redelivery: bool = False) -> None:
        """Count one message's points. ``redelivery``: the broker resent it to us (MQTT DUP
        flag, after a broker restart with our session kept); a copy we already have is then the
        broker's doing, not the gateway's, and is counted in ``redelivered``, not ``dups``."""
        with self.lock:
            self.messages += 1
            self.last_arrival = time.time()
            for unit, ts, counter, regs in parsed:
                n = len(regs)
                self.points += n
                lat = now_ms - ts
                self.hist[min(max(lat, 0), _BUCKETS - 1)] += n
                key = (unit, ts)
                if key in self.closed:
                    if redelivery:
                        self.redelivered += n
                    else:
                        self.dups += n
                    continue
                entry = self.open.get(key)
                if entry is None:
                    entry = self.open[key] = [0, -1]
                mask = entry[0]
                for r in regs:
                    bit = 1 << r
                    if mask & bit:
                        if redelivery:
                            self.redelivered += 1
                        else:
                            self.dups += 1
                    mask |= bit
                entry[0] = mask
                if counter is not None:
                    entry[1] = counter
                if mask == self.full and entry[1] >= 0:
                    self.whole.setdefault(unit, []).append((entry[1], ts, now_ms))
                    del self.open[key]
                    self.closed.add(key)

    def percentiles(self) -> dict[str, float | None]:
        total = sum(self.hist)
        out: dict[str, float | None] = {"n": total}
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)):
            if total == 0:
                out[name] = None
                continue
            want = q * total
            acc = 0
            for i, c in enumerate(self.hist):
                acc += c
                if acc >= want and c:
                    out[name] = float(i)
                    break
        return out


def fieldgate_parser(registers: int, units: range) -> Callable[[bytes], Parsed]:
    keys = {f"u{u}/r{r}": (u, r) for u in units for r in range(registers)}

    def parse(payload: bytes) -> Parsed:
        d = json.loads(payload)
        ts = d["timestamp"]
        value = d["value"]
        if not isinstance(value, dict):
            raise ValueError("single-value message: the benchmark expects multi-value")
        by_unit: dict[int, dict[int, int]] = {}
        for k, v in value.items():
            u, r = keys[k]
            regs = by_unit.get(u)
            if regs is None:
                regs = by_unit[u] = {}
            regs[r] = v
        for u, regs in by_unit.items():
            yield u, ts, regs.get(0), regs

    return parse


def peer_parser() -> Callable[[bytes], Parsed]:
    from bench.peer_tbgateway import parse_peer_message

    def parse(payload: bytes) -> Parsed:
        for unit, ts, counter, regs in parse_peer_message(payload):
            yield unit, ts, (counter if 0 in regs else None), regs

    return parse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--format", choices=["fieldgate", "peer"], required=True)
    ap.add_argument("--registers", type=int, required=True)
    ap.add_argument("--units", required=True, help="FIRST-LAST")
    args = ap.parse_args()
    first, _, last = args.units.partition("-")
    units = range(int(first), int(last or first) + 1)
    parse = fieldgate_parser(args.registers, units) if args.format == "fieldgate" else peer_parser()
    tally = Tally(args.registers)
    errors: list[str] = []

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        now_ms = int(time.time() * 1000)
        try:
            items = list(parse(bytes(msg.payload)))
        except Exception as exc:  # report, never die: the harness reads errors from stats
            if len(errors) < 20:
                errors.append(f"{msg.topic}: {exc!r}")
            return
        tally.add(iter(items), now_ms, redelivery=bool(msg.dup))

    connected = threading.Event()
    api = mqtt.CallbackAPIVersion.VERSION2  # type: ignore[attr-defined]
    # A persistent session with a QoS 1 subscription: across a broker restart (bench/e2e.py
    # outage, broker with persistence) messages published before this client is back are queued.
    client = mqtt.Client(api, client_id=f"e2e-sub-{time.time_ns()}", clean_session=False)
    client.max_inflight_messages_set(1000)
    # Back within a quarter second of the broker: the outage benchmark's first-delivery figure
    # is the gateway's reconnect, not this client's (paho doubles its delay up to max_delay).
    client.reconnect_delay_set(min_delay=0.1, max_delay=0.25)
    client.on_message = on_message

    def on_connect(c: mqtt.Client, *_a: Any) -> None:
        c.subscribe(args.topic, qos=1)
        connected.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", args.port, keepalive=30)
    client.loop_start()
    connected.wait(10)
    print(json.dumps({"ready": True}), flush=True)

    for line in sys.stdin:
        cmd = line.strip()
        with tally.lock:
            if cmd == "stats":
                out: dict[str, Any] = {
                    "points": tally.points,
                    "dups": tally.dups,
                    "redelivered": tally.redelivered,
                    "messages": tally.messages,
                    "last_arrival": tally.last_arrival,
                    "open": len(tally.open),
                    "latency_ms": tally.percentiles(),
                    "errors": errors,
                }
            elif cmd == "mark":
                tally.hist = [0] * _BUCKETS
                out = {"marked": True}
            elif cmd == "polls":
                out = {
                    "whole": {u: sorted(c) for u, c in tally.whole.items()},
                    "open": len(tally.open),
                    "open_points": sum(bin(m).count("1") for m, _ in tally.open.values()),
                    "open_units": sorted({u for u, _ in tally.open}),
                }
            elif cmd == "quit":
                break
            else:
                out = {"error": f"unknown command {cmd!r}"}
        print(json.dumps(out), flush=True)
    client.loop_stop()
    client.disconnect()


if __name__ == "__main__":
    main()
