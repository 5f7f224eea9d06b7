"""A device described by a hardware profile: probed by the CLI, polled, delivered by an uplink."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from gateway.app import Gateway
from gateway.config import load_config
from gateway.sandbox.modbus_sim import ModbusSimulator, profile_specs
from gateway.sandbox.qatium import QatiumEmulator

REPO = Path(__file__).resolve().parents[2]
TOKEN = "modbus-e2e-token"

CONFIG = """
[store]
path = "{tmp}/fg.db"
commit_interval_ms = 20
[health]
enabled = false
[[sources]]
name = "wells"
type = "modbus"
transport = "tcp"
host = "127.0.0.1"
port = {port}
timeout_s = 1.0
  [[sources.devices]]
  name = "well3"
  unit = 2
  interval_s = 0.1
  profile = "{repo}/hardware/profiles/keller-series30.toml"
  include = ["level_m", "temperature"]
[[uplinks]]
name = "qatium"
type = "qatium"
url = "{url}/ingest"
token = {{ value = "{token}", plain_text = true }}
  [[uplinks.routes]]
  series = "well3.level_m"
  asset = "Tank3"
  metric = "level"
  unit = "m"
"""


async def test_profile_device_is_probed_polled_and_delivered(tmp_path: Path) -> None:
    specs = profile_specs(REPO / "hardware/profiles/keller-series30.toml", prefix="well3", unit=2)
    async with (
        ModbusSimulator({2: specs}, transport="tcp") as sim,
        QatiumEmulator(token=TOKEN) as qatium,
    ):
        sim.units[2].set_value("well3.level_m", 3.25)
        cfg = tmp_path / "fg.toml"
        cfg.write_text(
            CONFIG.format(tmp=tmp_path, port=sim.port, repo=REPO, url=qatium.url, token=TOKEN)
        )

        probe = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "check-config",
            "--probe",
            str(cfg),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await probe.communicate()
        assert probe.returncode == 0, err.decode()
        text = out.decode()
        assert "well3.level_m" in text and "3.25" in text, text

        gw = Gateway(load_config(cfg))
        run = asyncio.create_task(gw.run())
        try:
            await qatium.wait_for(lambda: len(qatium.rows) >= 5, timeout=20)
        finally:
            gw.stop_event.set()
            assert await run == 0
        assert {r["asset"] for r in qatium.rows} == {"Tank3"}
        assert all(abs(float(r["value"]) - 3.25) < 1e-6 for r in qatium.rows)  # type: ignore[arg-type]
        assert gw.sources[0].stats.readings >= 10  # level and temperature both polled
