"""SDI-12 replies whose CRC holds 0x7F (DEL), end to end (issue 12).

The real :class:`Sdi12Source` opens one end of a socat pty; socat relays every byte to the
simulated sensor bus (gateway/sandbox/serial_sim.py, which encodes replies from the SDI-12
specification), so the replies cross two tty line disciplines and a real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.sandbox.serial_sim import Sdi12BusSim, SimSensor, sdi12_data_reply
from gateway.sources.serial.sdi12 import Sdi12Source
from tests.integration.test_serial_sources import Collector, running, sdi_cfg, wait_until
from tests.test_sdi12_crc_del import DEL, values_with_del_in_crc


@contextlib.asynccontextmanager
async def socat_relay(device: Path, link: Path) -> AsyncIterator[Path]:
    """A socat pty at ``link`` whose bytes go both ways to the tty ``device``, both raw."""
    proc = subprocess.Popen(  # noqa: ASYNC220 -- asyncio subprocesses start a watcher thread
        ["socat", "-d", "-d", f"pty,raw,echo=0,link={link}", f"open:{device},raw,echo=0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(5):
            # socat says when both ends are open (its notice log, -d -d): wait for that line.
            while b"starting data transfer loop" not in (
                line := await asyncio.to_thread(proc.stderr.readline)
            ):
                if not line:
                    raise RuntimeError(f"socat exited with {proc.wait()}")
        yield link
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        proc.stderr.close()


async def test_sdi12_replies_whose_crc_holds_del_become_readings(tmp_path: Path) -> None:
    second = values_with_del_in_crc("0", 1, before=(21.5,))  # DEL as the second CRC character
    third = values_with_del_in_crc("1", 2, before=(21.5,))  # DEL as the third
    # Sensor 3 sends one value per reply; its second reply (aD1!) has DEL in its CRC.
    middle = values_with_del_in_crc("3", 2, before=(), after=())[0]
    sensors = [
        SimSensor("0", second, wait_s=0, ready_after_s=0),
        SimSensor("1", third, wait_s=0, ready_after_s=0),
        SimSensor("2", [4.25, -1.5], wait_s=0, ready_after_s=0),  # a CRC without DEL
        SimSensor("3", [0.5, middle, 7.0], wait_s=0, ready_after_s=0, values_per_reply=1),
    ]
    replies = {
        "0": sdi12_data_reply("0", second, crc=True),
        "1": sdi12_data_reply("1", third, crc=True),
        "2": sdi12_data_reply("2", [4.25, -1.5], crc=True),
        "3": sdi12_data_reply("3", [middle], crc=True),
    }
    assert replies["0"][-2] == DEL and replies["1"][-1] == DEL and replies["3"][-1] == DEL
    assert DEL not in replies["2"]

    cfg = sdi_cfg(
        tmp_path / "gw",
        [{"address": a, "crc": True} for a in "0123"],
        response_timeout_s=0.3,
        retries=1,
    )
    c = Collector()
    source = Sdi12Source(cfg)
    async with (
        Sdi12BusSim(tmp_path / "bus", sensors) as bus,
        socat_relay(tmp_path / "bus", tmp_path / "gw"),
        running(source, c.emit),
    ):
        # One batch per cycle, after every sensor was tried: sensor 2 always answers.
        await wait_until(lambda: bool(c.readings), c.changed)
    assert {r.series: r.value for r in c.readings} == {
        "bus.0.1": 21.5,
        "bus.0.2": second[1],
        "bus.1.1": 21.5,
        "bus.1.2": third[1],
        "bus.2.1": 4.25,
        "bus.2.2": -1.5,
        "bus.3.1": 0.5,
        "bus.3.2": middle,
        "bus.3.3": 7.0,
    }
    assert len(c.readings) == 9
    # Every reply was taken the first time: no retries, nothing rejected.
    assert bus.commands == [
        "0MC!",
        "0D0!",
        "1MC!",
        "1D0!",
        "2MC!",
        "2D0!",
        "3MC!",
        "3D0!",
        "3D1!",
        "3D2!",
    ]
    assert source.stats.rejected == 0 and source.stats.errors == 0
    assert source.stats.detail["faults"] == {}
    assert all(s["ok"] == 1 and s["failed"] == 0 for s in source.stats.detail["sensors"].values())
