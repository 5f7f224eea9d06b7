"""SDI-12 CRC characters are ``0x40 | 6 bits``: 0x7F (DEL) is one of them (issue 12).

The replies are made by the simulator's own transcription of the specification
(gateway/sandbox/serial_sim.py), not by the client's encoder, and go through the path the source
uses: :func:`decode_reply` (the line decoder) then :func:`parse_data`.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.sandbox.serial_sim import sdi12_crc, sdi12_crc_chars, sdi12_data_reply
from gateway.sources.serial.parsers import LineRejected, decode_line
from gateway.sources.serial.sdi12 import Sdi12Error, decode_reply, parse_data

DEL = "\x7f"


def values_with_del_in_crc(
    address: str, position: int, before: tuple[float, ...] = (), after: tuple[float, ...] = ()
) -> list[float]:
    """The first values ``[*before, k/1000, *after]`` whose data reply (with CRC) has DEL as CRC
    character ``position`` (1 or 2; the first character is ``0x40 | crc >> 12``, at most 0x4F)
    and nowhere else."""
    for k in range(1, 1_000_000):
        values = [*before, k / 1000, *after]
        reply = sdi12_data_reply(address, values, crc=True)
        crc = reply[-3:]
        if crc[position] == DEL and crc.count(DEL) == 1:
            return values
    raise AssertionError("no such values")  # pragma: no cover


def wire(reply: str) -> bytes:
    """A reply as framed off the wire: the line without its LF, CR still on."""
    return reply.encode("ascii") + b"\r"


def test_the_simulator_crc_is_the_specification_crc() -> None:
    assert sdi12_crc(b"123456789") == 0xBB3D  # CRC-16/ARC check value
    assert sdi12_crc_chars(sdi12_crc(b"0+3.14")) == "OqZ"  # the specification's example
    assert sdi12_crc_chars(0x0FFF) == "@\x7f\x7f"
    assert sdi12_crc_chars(0xFFFF) == "O\x7f\x7f"  # the first character never reaches DEL


@pytest.mark.parametrize("position", [1, 2])
def test_reply_whose_crc_holds_del_is_accepted(position: int) -> None:
    values = values_with_del_in_crc("0", position, before=(21.5,))
    reply = sdi12_data_reply("0", values, crc=True)
    assert reply[-3:][position] == DEL
    assert parse_data(decode_reply(wire(reply)), "0", crc=True) == values


def test_crc_of_two_dels_is_accepted() -> None:
    for k in range(1, 1_000_000):
        reply = sdi12_data_reply("0", [k / 1000], crc=True)
        if reply.endswith(DEL * 2):
            break
    assert parse_data(decode_reply(wire(reply)), "0", crc=True) == [k / 1000]


def test_wrong_crc_holding_del_is_a_crc_fault() -> None:
    values = values_with_del_in_crc("0", 2, before=(21.5,))
    good = sdi12_data_reply("0", values, crc=True)
    damaged = good.replace("+21.500", "+21.501")  # a bit flipped in a value
    with pytest.raises(Sdi12Error) as info:
        parse_data(decode_reply(wire(damaged)), "0", crc=True)
    assert info.value.kind == "crc"
    wrong_crc = good[:-3] + good[-3] + DEL + good[-2]  # DEL where it does not belong
    with pytest.raises(Sdi12Error) as info:
        parse_data(decode_reply(wire(wrong_crc)), "0", crc=True)
    assert info.value.kind == "crc"


@pytest.mark.parametrize("noise", ["\x01", "\x1b", "\x00", DEL])
def test_control_characters_before_the_crc_are_still_garbage(noise: str) -> None:
    reply = sdi12_data_reply("0", values_with_del_in_crc("0", 2, before=(21.5,)), crc=True)
    damaged = reply[:4] + noise + reply[4:]
    with pytest.raises(LineRejected) as info:
        decode_reply(wire(damaged))
    assert info.value.kind == "garbage"


def test_control_characters_other_than_del_in_the_crc_are_garbage() -> None:
    reply = sdi12_data_reply("0", values_with_del_in_crc("0", 2, before=(21.5,)), crc=True)
    with pytest.raises(LineRejected) as info:
        decode_reply(wire(reply[:-2] + "\x01" + reply[-1]))
    assert info.value.kind == "garbage"


def test_other_serial_lines_still_reject_del() -> None:
    """Only SDI-12 replies carry CRC characters; a logger line with DEL is line noise."""
    with pytest.raises(LineRejected) as info:
        decode_line(b"21.5,40\x7f\r")
    assert info.value.kind == "garbage"


@given(
    address=st.sampled_from("0123456789abzAZ"),
    values=st.lists(
        st.floats(min_value=-9999.0, max_value=9999.0, allow_nan=False).map(lambda v: round(v, 3)),
        max_size=5,
    ),
)
@example(address="0", values=[378.438])  # CRC "N\x7fl"
def test_every_reply_a_sensor_may_send_is_read_back(address: str, values: list[float]) -> None:
    reply = sdi12_data_reply(address, values, crc=True)
    got = parse_data(decode_reply(wire(reply)), address, crc=True)
    assert got == [float(f"{v:+.3f}") for v in values]


def test_a_reply_set_holding_every_crc_character_is_read_back() -> None:
    """Every CRC character 0x40..0x7F in the second and third position, DEL included."""
    seen: set[tuple[int, str]] = set()
    for k in range(5_000):
        values = [k * 0.37, 21.5]
        reply = sdi12_data_reply("1", values, crc=True)
        for pos in (1, 2):
            seen.add((pos, reply[-3:][pos]))
        expected = [float(f"{v:+.3f}") for v in values]
        assert parse_data(decode_reply(wire(reply)), "1", crc=True) == expected, repr(reply)
    assert seen == {(pos, chr(c)) for pos in (1, 2) for c in range(0x40, 0x80)}
