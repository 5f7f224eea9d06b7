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
import os
import sys
import tempfile
from pathlib import Path

from gateway import logs
from gateway.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "demo.toml"
QATIUM_PORT = 8701
DEMO_TOKENS = {"FIELDGATE_DEMO_QATIUM_TOKEN": "demo-qatium-token"}


def main(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="fieldgate-demo-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FIELDGATE_STORE__PATH"] = str(state_dir / "fieldgate.db")
    os.environ["FIELDGATE_HEALTH__PORT"] = str(args.health_port)
    os.environ.update(DEMO_TOKENS)
    loaded = load_config(DEMO_CONFIG)
    logs.setup(loaded.settings.log.level, loaded.settings.log.format)
    return asyncio.run(_run(loaded, args.duration))


async def _run(loaded: object, duration: float | None) -> int:
    from gateway.app import Gateway
    from gateway.config import LoadedConfig
    from gateway.sandbox.qatium import QatiumEmulator

    assert isinstance(loaded, LoadedConfig)
    async with QatiumEmulator(
        token=DEMO_TOKENS["FIELDGATE_DEMO_QATIUM_TOKEN"], port=QATIUM_PORT
    ) as qatium:
        gw = Gateway(loaded)
        run = asyncio.create_task(gw.run(), name="gateway")
        ready = asyncio.create_task(gw.ready.wait(), name="ready-wait")
        await asyncio.wait([run, ready], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if run.done():
            return run.result()
        h = loaded.settings.health
        base = f"http://{h.host}:{gw.health_server.port if gw.health_server else h.port}"
        print(
            "\nfieldgate demo is running (Ctrl-C to stop)\n"
            f"  status   {base}/status\n"
            f"  health   {base}/health\n"
            f"  metrics  {base}/metrics\n"
            f"  store    {loaded.settings.store.path}\n"
            f"  emulated services: qatium {qatium.url}\n",
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
