"""The health endpoint on its own: the port it reports is the one it is bound to."""

from __future__ import annotations

import socket
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import HealthConfig
from gateway.health import HealthServer


class Provider:
    def __init__(self) -> None:
        self.ok, self.reasons = True, list[str]()

    def status(self) -> dict[str, Any]:
        return {
            "store": {
                "captured_total": 7,
                "evicted_total": 0,
                "bytes": 4096,
                "quota_bytes": 1 << 20,
                "buffered": 0,
                "free_disk_bytes": None,
            },
            "clock": {"synchronized": True},
            "sources": {},
            "uplinks": {},
        }

    def health(self) -> tuple[bool, list[str]]:
        return self.ok, self.reasons


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_port_zero_reports_the_bound_port() -> None:
    provider = Provider()
    async with HealthServer(HealthConfig(host="127.0.0.1", port=0), provider) as server:
        assert server.port is not None and server.port != 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            r = await client.get("/health")
            assert (r.status_code, r.json()) == (200, {"ok": True, "reasons": []})
            provider.ok, provider.reasons = False, ["store not writable"]
            r = await client.get("/health")
            assert (r.status_code, r.json()["reasons"]) == (503, ["store not writable"])
            assert (await client.get("/status")).json()["store"]["captured_total"] == 7
            metrics = {
                f.name: f
                for f in text_string_to_metric_families((await client.get("/metrics")).text)
            }
            assert metrics["fieldgate_readings_captured"].samples[0].value == 7
    # Closed: the port is free again.
    with socket.socket() as s:
        s.bind(("127.0.0.1", server.port))


async def test_fixed_port_is_reported_as_configured() -> None:
    port = free_port()
    server = HealthServer(HealthConfig(host="127.0.0.1", port=port), Provider())
    assert await server.start() == port
    try:
        assert server.port == port
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    finally:
        await server.aclose()
