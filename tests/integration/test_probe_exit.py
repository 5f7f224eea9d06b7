"""``fieldgate check-config --probe`` exits non-zero when any probed device failed.

Real parts only: a pymodbus server (gateway/sandbox/modbus_sim.py) on a free loopback port, and
the CLI run as the operator runs it, a child process reading a config file. A device on a
closed port is pointed at a socket that is bound but never listens (held for the whole test, so
nothing else can take the port): connecting is refused at once. The time limit around the child
only stops a hung test.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.sandbox.modbus_sim import ModbusSimulator
from gateway.sources.modbus.decode import FieldSpec

HEAD = """
[store]
path = "{tmp}/fg.db"
[health]
enabled = false
[[sources]]
name = "plc"
type = "modbus"
transport = "tcp"
host = "127.0.0.1"
port = {port}
timeout_s = 0.25
connect_timeout_s = 5.0
"""


def device(name: str, unit: int, address: int = 0, *, port: int | None = None) -> str:
    """A ``[[sources.devices]]`` entry reading one uint16 holding register."""
    where = f'  host = "127.0.0.1"\n  port = {port}\n' if port is not None else ""
    return f"""
  [[sources.devices]]
  name = "{name}"
  unit = {unit}
  interval_s = 1
{where}  [[sources.devices.fields]]
  series = "{name}.level"
  table = "holding"
  address = {address}
  type = "uint16"
"""


def specs(name: str) -> list[FieldSpec]:
    """What the simulator serves for a unit: holding registers 0 and 1."""
    return [
        FieldSpec(f"{name}.level", "holding", 0, "uint16"),
        FieldSpec(f"{name}.spare", "holding", 1, "uint16"),
    ]


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound, never listening, held until the end."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@dataclass
class Result:
    code: int
    out: str
    err: str


async def probe(tmp: Path, sim: ModbusSimulator, *devices: str) -> Result:
    cfg = tmp / "fg.toml"
    cfg.write_text(HEAD.format(tmp=tmp, port=sim.port) + "".join(devices))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "check-config",
        "--probe",
        str(cfg),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def test_every_device_answers_exits_0(tmp_path: Path) -> None:
    async with ModbusSimulator({1: specs("dev-a"), 2: specs("dev-b")}) as sim:
        sim.set_value(1, "dev-a.level", 111)
        sim.set_value(2, "dev-b.level", 222)
        r = await probe(tmp_path, sim, device("dev-a", 1), device("dev-b", 2))
    assert r.code == 0, (r.out, r.err)
    assert f"plc:   dev-a (unit 1 on tcp {sim.host}:{sim.port}): answered" in r.out, r.out
    assert f"plc:   dev-b (unit 2 on tcp {sim.host}:{sim.port}): answered" in r.out, r.out
    assert "dev-a.level = 111" in r.out and "dev-b.level = 222" in r.out, r.out
    assert "failed" not in r.out + r.err, (r.out, r.err)
    assert sim.requests[1] >= 1 and sim.requests[2] >= 1


async def test_device_on_closed_port_beside_good_one_exits_1(tmp_path: Path) -> None:
    with closed_port() as port:
        async with ModbusSimulator({1: specs("dev-a")}) as sim:
            sim.set_value(1, "dev-a.level", 111)
            r = await probe(tmp_path, sim, device("dev-a", 1), device("dev-b", 1, port=port))
    assert r.code == 1, (r.out, r.err)
    # The good device is still read and shown; the bad one is named in the summary.
    assert "dev-a.level = 111" in r.out, r.out
    assert f"tcp 127.0.0.1:{port}: cannot connect" in r.out, r.out
    assert "probe: 1 failed: plc/dev-b (" in r.err, r.err
    assert "Connection refused" in r.err, r.err
    assert "dev-a (" not in r.err, r.err


async def test_exception_reply_exits_1(tmp_path: Path) -> None:
    async with ModbusSimulator({1: specs("dev-a"), 2: specs("dev-b")}) as sim:
        # dev-b asks for holding 50, which unit 2 does not serve: exception 2 in reply.
        r = await probe(tmp_path, sim, device("dev-a", 1), device("dev-b", 2, address=50))
    assert r.code == 1, (r.out, r.err)
    assert "dev-b.level: refused (exception 2 (illegal data address))" in r.out, r.out
    assert "probe: 1 failed: plc/dev-b (" in r.err and "illegal data address" in r.err, r.err
    assert sim.responses[2] >= 1  # the unit did answer: with an exception


async def test_no_answer_from_only_device_exits_1(tmp_path: Path) -> None:
    async with ModbusSimulator({1: specs("dev-a")}) as sim:
        # Unit 7 is not on this server: the request goes unanswered, as on a wrong unit id.
        r = await probe(tmp_path, sim, device("dev-x", 7))
    assert r.code == 1, (r.out, r.err)
    assert "dev-x (unit 7" in r.out and "no answer" in r.out, r.out
    assert "probe: 1 failed: plc/dev-x (no answer" in r.err, r.err
    assert sim.requests[7] >= 1 and sim.responses[7] == 0


async def test_malformed_reply_exits_1(tmp_path: Path) -> None:
    async with ModbusSimulator({1: specs("dev-a")}) as sim:
        sim.short_replies(1)  # the first answer loses its last register
        r = await probe(tmp_path, sim, device("dev-a", 1))
    assert r.code == 1, (r.out, r.err)
    assert "probe: 1 failed: plc/dev-a (" in r.err and "short reply" in r.err, r.err


async def test_every_failure_is_listed(tmp_path: Path) -> None:
    with closed_port() as port:
        async with ModbusSimulator({1: specs("dev-a"), 2: specs("dev-b")}) as sim:
            r = await probe(
                tmp_path,
                sim,
                device("dev-a", 1),
                device("dev-b", 2, address=50),
                device("dev-c", 7),
                device("dev-d", 1, port=port),
            )
    assert r.code == 1, (r.out, r.err)
    (summary,) = [line for line in r.err.splitlines() if line.startswith("probe: ")]
    assert summary.startswith("probe: 3 failed: "), summary
    for name in ("dev-b", "dev-c", "dev-d"):
        assert f"plc/{name} (" in summary, summary
    assert "dev-a" not in summary, summary
