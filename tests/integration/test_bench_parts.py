"""The parts bench/e2e.py trusts for its lost/duplicated counts, checked against real servers.

- the simulator's counter units (register 0 counts the polls that read it) over real Modbus TCP;
- the counting subscriber's bookkeeping: a poll is whole when every register arrived once,
  a second copy of any point is a duplicate, a missing register leaves the poll open.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pymodbus.client import AsyncModbusTcpClient

from gateway.sandbox.modbus_sim import ModbusSimulator

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from e2e_subscriber import Tally, fieldgate_parser


async def test_counter_units_count_polls_and_hold_fixed_values() -> None:
    async with ModbusSimulator({}, counters={7: 125, 8: 3}) as sim:
        client = AsyncModbusTcpClient(sim.host, port=sim.port)
        await client.connect()
        try:
            first = await client.read_holding_registers(0, count=125, device_id=7)
            second = await client.read_holding_registers(0, count=125, device_id=7)
            tail = await client.read_holding_registers(1, count=2, device_id=8)  # not register 0
            other = await client.read_holding_registers(0, count=3, device_id=8)
            beyond = await client.read_holding_registers(2, count=5, device_id=8)
        finally:
            client.close()
    assert first.registers[0] == 1 and second.registers[0] == 2
    assert first.registers[1:] == [(7000 + i) % 65536 for i in range(1, 125)]
    assert tail.registers == [8001, 8002]
    assert other.registers == [1, 8001, 8002]  # the read of 1..2 did not count as a poll
    assert beyond.isError()  # past the unit's registers: exception, as a device answers
    assert sim.units[7].polls == 2  # type: ignore[attr-defined]


def test_subscriber_tells_whole_duplicated_and_incomplete_polls() -> None:
    parse = fieldgate_parser(3, range(1, 3))
    tally = Tally(3)
    msg = b'{"timestamp": 1000, "value": {"u1/r0": 1, "u1/r1": 5, "u1/r2": 6, "u2/r0": 1}}'
    tally.add(parse(msg), now_ms=1010)
    assert tally.whole == {1: [(1, 1000, 1010)]}
    assert len(tally.open) == 1  # unit 2's poll lacks r1, r2
    tally.add(parse(b'{"timestamp": 1000, "value": {"u2/r1": 7, "u2/r2": 8}}'), now_ms=1030)
    assert tally.whole[2] == [(1, 1000, 1030)] and not tally.open
    assert tally.dups == 0 and tally.points == 6
    tally.add(parse(b'{"timestamp": 1000, "value": {"u1/r1": 5, "u1/r2": 6}}'), now_ms=1040)
    assert tally.dups == 2 and tally.points == 8
    assert tally.percentiles()["p50"] == 10.0
    # The broker resending to the subscriber (DUP flag) is not the gateway duplicating.
    tally.add(parse(b'{"timestamp": 1000, "value": {"u2/r1": 7}}'), now_ms=1050, redelivery=True)
    assert tally.dups == 2 and tally.redelivered == 1
