"""The parts bench/e2e.py trusts for its lost/duplicated counts, checked against real servers.

- the simulator's counter units (register 0 counts the polls that read it) over real Modbus TCP;
- the counting subscriber's bookkeeping: a poll is whole when every register arrived once,
  a second copy of any point is a duplicate, a missing register leaves the poll open;
- the outage figures computed from the subscriber's arrivals (first delivery, caught up, drain
  rate) and the --pin plan and taskset command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from gateway.sandbox.modbus_sim import ModbusSimulator

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from e2e import cpu_list, outage_figures, pin_plan, pinned_command
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


def test_outage_drain_rate_is_points_leaving_between_first_delivery_and_caught_up() -> None:
    # 2 units, 4 registers each, a poll per unit every 1 s: a live rate of 8 points/s. The broker
    # is down from 10 s to 20 s. Per poll: [counter, poll timestamp ms, arrival ms].
    down, up = 10_000, 20_000
    whole: dict[str, list[list[int]]] = {}
    for u in ("1", "2"):
        polls = [[1 + ts // 1000, ts, ts + 5] for ts in range(0, 10_000, 1000)]  # live
        # The backlog (polls of 10..19 s) leaves from 22.0 s to 23.8 s, 200 ms apart ...
        polls += [[11 + i, 10_000 + 1000 * i, 22_000 + 200 * i] for i in range(10)]
        # ... with the live polls of 20..23 s among them (at 23.5 s) ...
        polls += [[21 + i, 20_000 + 1000 * i, 23_500] for i in range(4)]
        # ... and live again from 24 s: after the caught-up moment, not counted.
        polls += [[1 + ts // 1000, ts, ts + 5] for ts in range(24_000, 30_000, 1000)]
        whole[u] = polls
    # A poll taken before the outage, arriving from the broker's saved queue: not counted.
    whole["1"].append([99, 9_500, 23_000])
    f = outage_figures(whole, down, up, None, registers=4, live_points_per_s=8.0)
    assert f["first_delivery_after_broker_up_s"] == 2.0
    assert f["caught_up_s"] == 3.8 and f["caught_up_after_reconnect_s"] == 1.8
    # (10 backlog + 4 live polls) x 2 units x 4 points over 1.8 s.
    assert f["drain_points_per_s"] == round(112 / 1.8) == 62
    assert f["drain_vs_live"] == round(112 / 1.8 / 8.0, 2) == 7.78


def test_outage_drain_rate_counts_live_polls_arriving_while_catching_up() -> None:
    # One unit, 125 registers, 1 poll/s (125 points/s live). Broker down 0..10 s; the gateway
    # delivers its first poll at 12 s and the last backlog poll (taken at 9 s) at 14 s; live
    # polls of 10..13 s arrive meanwhile (at 13 s), so 10 + 4 = 14 polls leave in 2 s.
    whole = {"1": [[1 + ts // 1000, ts, 12_000 + (ts * 2 // 9)] for ts in range(0, 10_000, 1000)]}
    whole["1"] += [[11 + i, 10_000 + 1000 * i, 13_000] for i in range(4)]
    f = outage_figures(whole, 0, 10_000, None, registers=125, live_points_per_s=125.0)
    assert f["first_delivery_after_broker_up_s"] == 2.0
    assert f["caught_up_s"] == 4.0 and f["caught_up_after_reconnect_s"] == 2.0
    assert f["drain_points_per_s"] == 14 * 125 / 2 == 875
    assert f["drain_vs_live"] == 7.0


def test_outage_drain_rate_is_none_without_a_span_or_past_the_next_outage() -> None:
    whole = {"1": [[1, 0, 12_000], [2, 1000, 15_000]]}
    # Caught up (15 s) only after the next outage began (14 s): no drain figure.
    f = outage_figures(whole, 0, 10_000, 14_000, registers=1, live_points_per_s=1.0)
    assert f["drain_points_per_s"] is None and f["drain_vs_live"] is None
    # One poll in the outage: first delivery and caught up are the same arrival.
    f = outage_figures({"1": [[1, 0, 12_000]]}, 0, 10_000, None, registers=1, live_points_per_s=1)
    assert f["caught_up_after_reconnect_s"] == 0.0 and f["drain_points_per_s"] is None
    # Nothing delivered after the broker came back.
    f = outage_figures({"1": []}, 0, 10_000, None, registers=1, live_points_per_s=1.0)
    assert f["first_delivery_after_broker_up_s"] is None and f["drain_vs_live"] is None


def test_pin_plan_gives_the_gateway_the_lowest_cpu_and_the_rig_the_rest() -> None:
    assert cpu_list([3, 0, 1, 2, 5]) == "0-3,5" and cpu_list([1]) == "1" and cpu_list([]) == ""
    plan = pin_plan({0, 1})
    assert plan.as_json() == {"gateway": "0", "rest": "1"}
    assert pin_plan(range(8)).as_json() == {"gateway": "0", "rest": "1-7"}
    assert pin_plan({2, 3, 6}).as_json() == {"gateway": "2", "rest": "3,6"}  # a cpuset
    with pytest.raises(ValueError, match="at least 2 CPUs"):
        pin_plan({0})
    cmd = ["python", "-m", "gateway", "run"]
    assert pinned_command(cmd, plan.gateway) == ["taskset", "-c", "0", *cmd]
