"""``fieldgate demo``: the gateway on its embedded default, fully offline.

Starts the local stand-ins of the services and the simulated devices, each on a port the OS
picks (so a busy port of another program never stops the demo), and runs the real gateway with
config/demo.toml, its addresses (the ports and pty paths written there are defaults) replaced by
the ones the stand-ins got (written to the temporary directory: a reload reads the config that
runs). The demo's tokens go through the environment (the same secret
mechanism a real install uses). Runs until Ctrl-C or SIGTERM (or ``--duration``), then exits 0.

The health endpoint (the status URL printed first) is on ``--health-port``, else
``FIELDGATE_HEALTH__PORT``, else the file's 8080, or a free port when 8080 is taken. A port asked
for explicitly that is busy ends the demo with a one-line error (exit 1). Only URLs the demo
owns are printed. Everything it creates lives in one temporary directory (the store too, unless
``--state-dir`` is given), removed on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from gateway import logs
from gateway.config import LoadedConfig, load_config
from gateway.errors import FieldgateError

if TYPE_CHECKING:
    from gateway.app import Gateway

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "config" / "demo.toml"
DEMO_TOKENS = {
    "FIELDGATE_DEMO_QATIUM_TOKEN": "demo-qatium-token",
    "FIELDGATE_DEMO_NILU_TOKEN": "demo-nilu-token",
    "FIELDGATE_DEMO_VANDA_CLIENT": "demo-client",
    "FIELDGATE_DEMO_VANDA_SECRET": "demo-vanda-secret",
    "FIELDGATE_DEMO_ENERGYDATA_TOKEN": "demo-energydata-token",
    "FIELDGATE_DEMO_DATACOOEE_KEY": "demo-datacooee-key",
}
#: The addresses config/demo.toml names, replaced by where each stand-in really is. The value is
#: how often each appears in the file (checked, so an edit of the file cannot silently miss one).
DEFAULT_ADDRESSES = {
    "qatium": ("http://127.0.0.1:8701", 1),
    "nilu": ("http://127.0.0.1:8703", 1),
    "vanda": ("http://127.0.0.1:8705", 2),
    "datacooee": ("http://127.0.0.1:8704", 1),
    "energydata": ("port = 8702", 1),
    "modbus": ("port = 5020", 1),
    "devices": ('"/tmp/fieldgate-demo/', 2),
    "profiles": ('"../hardware/profiles/', 1),
}
#: How long the serial sources may take to open their ptys before the devices start talking.
PORTS_OPEN_TIMEOUT_S = 15.0


class DemoError(Exception):
    """Ends the demo with this one-line message (exit 1)."""


def main(args: argparse.Namespace) -> int:
    # SIGTERM before the event loop takes over ends the demo like Ctrl-C (temp dir removed).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    scratch = Path(tempfile.mkdtemp(prefix="fieldgate-demo-"))
    try:
        return _main(args, scratch)
    except DemoError as exc:
        print(f"fieldgate demo: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _main(args: argparse.Namespace, scratch: Path) -> int:
    state_dir = Path(args.state_dir) if args.state_dir else scratch / "store"
    state_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FIELDGATE_STORE__PATH"] = str(state_dir / "fieldgate.db")
    os.environ.update(DEMO_TOKENS)
    health_port: int | None = getattr(args, "health_port", None)
    explicit = health_port is not None or "FIELDGATE_HEALTH__PORT" in os.environ
    if health_port is not None:
        os.environ["FIELDGATE_HEALTH__PORT"] = str(health_port)
    # Loaded once as written: its problems are reported before anything starts, and it says how
    # to log and where the health endpoint goes.
    loaded = load_config(DEMO_CONFIG)
    logs.setup(loaded.settings.log.level, loaded.settings.log.format)
    h = loaded.settings.health
    if h.enabled and h.port != 0 and not _port_free(h.host, h.port):
        if explicit:
            raise DemoError(_busy(h.host, h.port))
        os.environ["FIELDGATE_HEALTH__PORT"] = "0"  # the default is taken: any free port
    return asyncio.run(_run(scratch, args.state_dir is None, args.duration))


def _busy(host: str, port: int, error: str | None = None) -> str:
    why = f" ({error})" if error else ""
    return (
        f"health port {host}:{port} is in use{why}: pass --health-port or set "
        "FIELDGATE_HEALTH__PORT to a free port (0: any free port)"
    )


def _port_free(host: str, port: int) -> bool:
    """Whether the health server could bind (host, port) now (it binds with SO_REUSEADDR)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return True  # the gateway reports what it cannot resolve
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(addr)
            except OSError:
                return False
    return True


def demo_config_text(addresses: Mapping[str, str]) -> str:
    """config/demo.toml with each default address replaced by ``addresses[name]``."""
    text = DEMO_CONFIG.read_text(encoding="utf-8")
    for name, (default, count) in DEFAULT_ADDRESSES.items():
        found = text.count(default)
        if found != count:
            raise DemoError(f"{DEMO_CONFIG} names {default!r} {found} times, expected {count}")
        text = text.replace(default, addresses[name])
    return text


def _toml_str(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


async def _stand_ins(
    stack: contextlib.AsyncExitStack, scratch: Path
) -> tuple[dict[str, str], dict[str, str], Callable[[], Awaitable[None]]]:
    """Start every emulator and device simulator the demo config names, each on a free port.

    Returns what to print (name: URL or path), the replacements for :func:`demo_config_text`,
    and a coroutine function that starts the serial devices' traffic (once their ports are open).
    """
    from gateway.models import Position
    from gateway.sandbox.datacooee import DatacooeeEmulator
    from gateway.sandbox.modbus_sim import ModbusSimulator, profile_specs
    from gateway.sandbox.mosquitto import Mosquitto
    from gateway.sandbox.nilu import NiluEmulator, demo_sensors
    from gateway.sandbox.qatium import QatiumEmulator
    from gateway.sandbox.serial_sim import GpsSim, LineLoggerSim
    from gateway.sandbox.vanda import VandaEmulator

    where: dict[str, str] = {}
    qatium = QatiumEmulator(token=DEMO_TOKENS["FIELDGATE_DEMO_QATIUM_TOKEN"])
    where["qatium"] = (await stack.enter_async_context(qatium)).url
    nilu = NiluEmulator(demo_sensors(), token=DEMO_TOKENS["FIELDGATE_DEMO_NILU_TOKEN"])
    where["nilu"] = (await stack.enter_async_context(nilu)).url
    vanda = VandaEmulator(
        {DEMO_TOKENS["FIELDGATE_DEMO_VANDA_CLIENT"]: DEMO_TOKENS["FIELDGATE_DEMO_VANDA_SECRET"]}
    )
    where["vanda"] = (await stack.enter_async_context(vanda)).url
    datacooee = DatacooeeEmulator(
        "demo-org",
        DEMO_TOKENS["FIELDGATE_DEMO_DATACOOEE_KEY"],
        inputs=["senriver1temp", "senvantemp"],
    )
    where["datacooee"] = (await stack.enter_async_context(datacooee)).url
    broker_dir = scratch / "mosquitto"
    await asyncio.to_thread(broker_dir.mkdir)
    broker = await stack.enter_async_context(Mosquitto(broker_dir))
    where["energydata"] = f"mqtt://{broker.host}:{broker.port} (mosquitto)"
    specs = profile_specs(REPO / "hardware/profiles/sdm630.toml", prefix="meter")
    meter = await stack.enter_async_context(ModbusSimulator({1: specs}, transport="tcp"))
    where["modbus meter"] = f"tcp://{meter.host}:{meter.port} unit 1 (SDM630)"

    dev_dir = scratch / "dev"
    await asyncio.to_thread(dev_dir.mkdir)
    logger = await stack.enter_async_context(LineLoggerSim(dev_dir / "ttyLOGGER"))
    gps = await stack.enter_async_context(GpsSim(dev_dir / "ttyGPS"))
    where["serial logger"] = str(logger.path)
    where["gps"] = str(gps.path)

    addresses = {
        "qatium": qatium.url,
        "nilu": nilu.url,
        "vanda": vanda.url,
        "datacooee": datacooee.url,
        "energydata": f"port = {broker.port}",
        "modbus": f"port = {meter.port}",
        "devices": f'"{_toml_str(str(dev_dir))}/',
        "profiles": f'"{_toml_str(str(REPO / "hardware" / "profiles"))}/',
    }

    # The logger first dumps its stored hour (one record a minute), then goes live.

    def record(t: float, k: int) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
        level = 120.0 + 15.0 * math.sin(t / 1800.0) + (k % 7) * 0.1
        temp = 9.0 + 2.0 * math.sin(t / 7200.0)
        return f"{stamp},{level:.1f},{temp:.2f}"

    # A van driving a slow circle around Oslo.
    def place(t: float) -> Position:
        a = t / 600.0
        return Position(59.91 + 0.01 * math.sin(a), 10.75 + 0.02 * math.cos(a), 12.0)

    async def drive() -> None:
        while True:
            gps.set_fix(place(time.time()))
            await asyncio.sleep(5)

    async def start_feeds() -> None:
        now = time.time()
        start = int(now // 60 * 60) - 3600
        for k, t in enumerate(range(start, int(now), 60)):
            await logger.write_line(record(t, k))
        logger.start_periodic(5.0, lambda k: record(time.time(), k))
        task = asyncio.create_task(drive(), name="demo-van")
        stack.callback(task.cancel)
        gps.start_periodic(1.0)

    return where, addresses, start_feeds


async def _run(scratch: Path, temp_store: bool, duration: float | None) -> int:
    from gateway.app import Gateway
    from gateway.sandbox.mosquitto import MosquittoError

    # Until the gateway installs its own handlers, SIGINT/SIGTERM cancel the start-up.
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    assert me is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, me.cancel)
    try:
        async with contextlib.AsyncExitStack() as stack:
            try:
                where, addresses, start_feeds = await _stand_ins(stack, scratch)
            except (OSError, MosquittoError) as exc:
                raise DemoError(f"a stand-in did not start: {exc}") from None
            # The config as run, in a file of its own: a reload (SIGHUP) reads what is running.
            config = scratch / "demo.toml"
            await asyncio.to_thread(config.write_text, demo_config_text(addresses), "utf-8")
            try:
                loaded = load_config(config)
            except FieldgateError as exc:
                raise DemoError(str(exc)) from None
            gw = Gateway(loaded)
            store = str(loaded.settings.store.path) + (" (removed on exit)" if temp_store else "")
            where = {"store": store, "config": str(config), **where}
            return await _serve(gw, loaded, where, start_feeds, duration)
    except asyncio.CancelledError:
        return 0  # interrupted while starting


async def _serve(
    gw: Gateway,
    loaded: LoadedConfig,
    where: dict[str, str],
    start_feeds: Callable[[], Awaitable[None]],
    duration: float | None,
) -> int:
    run = asyncio.create_task(gw.run(), name="gateway")
    ready = asyncio.create_task(gw.ready.wait(), name="ready-wait")
    await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if run.done():
        return run.result()
    h = loaded.settings.health
    server = gw.health_server
    if server is not None and server.url is None:
        # Taken between the demo's check and the gateway's bind: this demo would show nothing.
        gw.stop_event.set()
        await run
        raise DemoError(_busy(h.host, h.port, server.last_bind_error))
    try:
        await _ports_open(gw)
    except TimeoutError:
        gw.stop_event.set()
        await run
        raise DemoError(
            f"the serial sources did not open their ports within {PORTS_OPEN_TIMEOUT_S:g} s"
        ) from None
    await start_feeds()
    lines = ["", "fieldgate demo is running (Ctrl-C to stop)"]
    if server is not None and server.url is not None:
        lines.append(f"  {'console':<8} {server.url}/")  # the web console first
        lines += [f"  {p:<8} {server.url}/{p}" for p in ("status", "health", "metrics")]
    else:
        lines.append("  status   (health endpoint disabled: FIELDGATE_HEALTH__ENABLED)")
    lines.append(f"  store    {where.pop('store')}")
    lines.append(f"  config   {where.pop('config')}")
    lines.append("stand-ins:")
    lines += [f"  {k:<14} {v}" for k, v in where.items()]
    print("\n".join(lines) + "\n", file=sys.stderr, flush=True)
    watchers = [asyncio.create_task(_summary(gw), name="demo-summary")]
    if duration is not None:
        watchers.append(asyncio.create_task(_stop_after(gw, duration), name="demo-timer"))
    try:
        return await run
    finally:
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)


async def _ports_open(gw: Gateway) -> None:
    """Until every serial source has its port open: bytes written earlier may be flushed by the
    open (the logger's stored hour would be lost)."""
    serial = [s.stats.detail for s in gw.sources if "port_open" in s.stats.detail]
    async with asyncio.timeout(PORTS_OPEN_TIMEOUT_S):
        while True:
            if all(d["port_open"] for d in serial):
                return
            await asyncio.sleep(0.05)  # polling the gateway's own state: paces the checks only


async def _stop_after(gw: Gateway, seconds: float) -> None:
    await asyncio.sleep(seconds)
    gw.stop_event.set()


async def _summary(gw: Gateway) -> None:
    """A line every 10 s so a person at a terminal sees delivery happen."""
    while True:
        await asyncio.sleep(10)
        st = gw.status()
        parts = [
            f"{n}: {u['state']} delivered={u['delivered']} backlog={u['backlog']}"
            for n, u in st["uplinks"].items()
        ]
        print("demo | " + " | ".join(parts), file=sys.stderr, flush=True)
