"""The README's first command: `fieldgate demo` delivers to the emulated services within seconds."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_demo_delivers_and_stops_cleanly(tmp_path: object) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "demo",
        "--health-port",
        str(port),
        "--state-dir",
        str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    status: dict[str, Any] = {}
    try:
        # The demo prints its banner once the gateway listens.
        async with asyncio.timeout(60):
            while b"fieldgate demo is running" not in await proc.stderr.readline():
                pass
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(60):
                while True:
                    status = (await client.get("/status")).json()
                    up = status["uplinks"]
                    if all(
                        up[n]["delivered"] > 0
                        for n in ("qatium", "vanda", "energydata", "datacooee")
                    ):
                        break
                    # Polling another process's endpoint: the interval only paces the requests.
                    await asyncio.sleep(0.25)
            assert (await client.get("/health")).status_code == 200
        assert all(s["state"] == "ok" for s in status["sources"].values()), status["sources"]
        assert status["sources"]["substation"]["readings"] > 0  # the Modbus simulator
        assert status["sources"]["river"]["readings"] >= 60  # the logger's stored hour
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            rc = await proc.wait()
    assert rc == 0
