"""``fieldgate demo``: the gateway on its embedded default, fully offline.

Starts the local stand-ins of the services on fixed loopback ports (so config/demo.toml can name
them), gives the demo its tokens through the environment (the same secret mechanism a real
install uses), keeps the store in a temporary directory unless ``--state-dir`` is given, and runs
the real gateway with config/demo.toml until Ctrl-C (or ``--duration``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway import logs
from gateway.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "demo.toml"
QATIUM_PORT = 8701
DEMO_TOKENS = {
    "FIELDGATE_DEMO_QATIUM_TOKEN": "demo-qatium-token",
    "FIELDGATE_DEMO_NILU_TOKEN": "demo-nilu-token",
    "FIELDGATE_DEMO_VANDA_CLIENT": "demo-client",
    "FIELDGATE_DEMO_VANDA_SECRET": "demo-vanda-secret",
    "FIELDGATE_DEMO_ENERGYDATA_TOKEN": "demo-energydata-token",
    "FIELDGATE_DEMO_DATACOOEE_KEY": "demo-datacooee-key",
}


def main(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="fieldgate-demo-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FIELDGATE_STORE__PATH"] = str(state_dir / "fieldgate.db")
    os.environ["FIELDGATE_HEALTH__PORT"] = str(args.health_port)
    os.environ.update(DEMO_TOKENS)
    loaded = load_config(DEMO_CONFIG)
    logs.setup(loaded.settings.log.level, loaded.settings.log.format)
    return asyncio.run(_run(loaded, args.duration))


REPO = Path(__file__).resolve().parents[2]
DEV_DIR = Path("/tmp/fieldgate-demo")
MODBUS_PORT = 5020
NILU_PORT = 8703
VANDA_PORT = 8705
MQTT_PORT = 8702
DATACOOEE_PORT = 8704


async def _stand_ins(
    stack: contextlib.AsyncExitStack,
) -> tuple[dict[str, str], Callable[[], Awaitable[None]]]:
    """Start every emulator and device simulator the demo config names. Returns where they are
    and a coroutine function that starts the serial devices' traffic (once the gateway listens).
    """
    from gateway.models import Position
    from gateway.sandbox.modbus_sim import ModbusSimulator, profile_specs
    from gateway.sandbox.nilu import NiluEmulator, demo_sensors
    from gateway.sandbox.qatium import QatiumEmulator
    from gateway.sandbox.serial_sim import GpsSim, LineLoggerSim
    from gateway.sandbox.vanda import VandaEmulator

    where: dict[str, str] = {}
    qatium = QatiumEmulator(token=DEMO_TOKENS["FIELDGATE_DEMO_QATIUM_TOKEN"], port=QATIUM_PORT)
    where["qatium"] = (await stack.enter_async_context(qatium)).url
    nilu = NiluEmulator(
        demo_sensors(), token=DEMO_TOKENS["FIELDGATE_DEMO_NILU_TOKEN"], port=NILU_PORT
    )
    where["nilu"] = (await stack.enter_async_context(nilu)).url
    vanda = VandaEmulator(
        {DEMO_TOKENS["FIELDGATE_DEMO_VANDA_CLIENT"]: DEMO_TOKENS["FIELDGATE_DEMO_VANDA_SECRET"]},
        port=VANDA_PORT,
    )
    where["vanda"] = (await stack.enter_async_context(vanda)).url
    from gateway.sandbox.datacooee import DatacooeeEmulator

    datacooee = DatacooeeEmulator(
        "demo-org",
        DEMO_TOKENS["FIELDGATE_DEMO_DATACOOEE_KEY"],
        inputs=["senriver1temp", "senvantemp"],
        port=DATACOOEE_PORT,
    )
    where["datacooee"] = (await stack.enter_async_context(datacooee)).url
    from gateway.sandbox.mosquitto import Mosquitto

    broker_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="fieldgate-demo-mqtt-"))
    broker = Mosquitto(broker_dir, port=MQTT_PORT)
    await stack.enter_async_context(broker)
    where["energydata"] = f"mqtt://127.0.0.1:{MQTT_PORT} (mosquitto)"
    specs = profile_specs(REPO / "hardware/profiles/sdm630.toml", prefix="meter")
    meter = ModbusSimulator({1: specs}, transport="tcp", port=MODBUS_PORT)
    await stack.enter_async_context(meter)
    where["modbus meter"] = f"tcp://{meter.host}:{meter.port} unit 1 (SDM630)"

    await asyncio.to_thread(DEV_DIR.mkdir, parents=True, exist_ok=True)
    logger = await stack.enter_async_context(LineLoggerSim(DEV_DIR / "ttyLOGGER"))
    gps = await stack.enter_async_context(GpsSim(DEV_DIR / "ttyGPS"))
    where["serial logger"] = str(logger.path)
    where["gps"] = str(gps.path)

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

    return where, start_feeds


async def _run(loaded: object, duration: float | None) -> int:
    from gateway.app import Gateway
    from gateway.config import LoadedConfig

    assert isinstance(loaded, LoadedConfig)
    async with contextlib.AsyncExitStack() as stack:
        where, start_feeds = await _stand_ins(stack)
        gw = Gateway(loaded)
        run = asyncio.create_task(gw.run(), name="gateway")
        ready = asyncio.create_task(gw.ready.wait(), name="ready-wait")
        await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if run.done():
            return run.result()
        # The serial sources open their ports as the gateway starts; give them a moment to.
        await asyncio.sleep(1.0)
        await start_feeds()
        h = loaded.settings.health
        base = f"http://{h.host}:{gw.health_server.port if gw.health_server else h.port}"
        stands = "\n".join(f"  {k:<14} {v}" for k, v in where.items())
        print(
            "\nfieldgate demo is running (Ctrl-C to stop)\n"
            f"  status   {base}/status\n"
            f"  health   {base}/health\n"
            f"  metrics  {base}/metrics\n"
            f"  store    {loaded.settings.store.path}\n"
            f"stand-ins:\n{stands}\n",
            file=sys.stderr,
            flush=True,
        )
        watchers = [asyncio.create_task(_summary(gw), name="demo-summary")]
        if duration is not None:
            watchers.append(asyncio.create_task(_stop_after(gw, duration), name="demo-timer"))
        try:
            return await run
        finally:
            for w in watchers:
                w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*watchers, return_exceptions=True)


async def _stop_after(gw: object, seconds: float) -> None:
    await asyncio.sleep(seconds)
    gw.stop_event.set()  # type: ignore[attr-defined]


async def _summary(gw: object) -> None:
    """A line every 10 s so a person at a terminal sees delivery happen."""
    while True:
        await asyncio.sleep(10)
        st = gw.status()  # type: ignore[attr-defined]
        parts = [
            f"{n}: {u['state']} delivered={u['delivered']} backlog={u['backlog']}"
            for n, u in st["uplinks"].items()
        ]
        print("demo | " + " | ".join(parts), file=sys.stderr, flush=True)
