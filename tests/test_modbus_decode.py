"""Property tests of the Modbus decoder and read planner (gateway.sources.modbus.decode).

The gateway only decodes; the simulator's encoder (gateway.sandbox.modbus_encode) is written
apart from it. Both are held against register vectors written here by hand from the byte-order
definitions, then against each other (decode what the simulator encodes, encode what the
gateway decodes), so neither can agree with the other by construction.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from pymodbus.framer.rtu import FramerRTU

from gateway.sandbox.modbus_encode import (
    bytes_to_words,
    encode_raw,
    registers_of,
    set_bit,
    unscaled,
)
from gateway.sources.modbus.decode import (
    BIT_TABLES,
    DATA_TYPES,
    ORDERS,
    TABLES,
    DataType,
    FieldSpec,
    Order,
    ReadRequest,
    Span,
    Table,
    crc16,
    decode_raw,
    make_decoder,
    plan_reads,
    register_count,
    reorder,
    rtu_frame_problem,
    scaled,
    shortest_float32,
    words_to_bytes,
)

NUMERIC: tuple[DataType, ...] = (
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
)
INT_RANGES: dict[DataType, tuple[int, int]] = {
    "int16": (-(2**15), 2**15 - 1),
    "uint16": (0, 2**16 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}
orders = st.sampled_from(ORDERS)
word = st.integers(0, 0xFFFF)


# ----------------------------------------------------------------------------------------------
# Fixed vectors, by hand from the definitions: A is the most significant byte of the value, the
# letters list the bytes in wire (address) order, a register travels high byte first. Neither
# the simulator's encoder nor the gateway's decoder was used to write them.

#: (type, value, order, registers in address order, length for strings)
VECTORS: list[tuple[DataType, object, Order, list[int], int | None]] = [
    # float32 1.0 = 0x3F800000: A=3F B=80 C=00 D=00
    ("float32", 1.0, "ABCD", [0x3F80, 0x0000], None),
    ("float32", 1.0, "CDAB", [0x0000, 0x3F80], None),
    ("float32", 1.0, "BADC", [0x803F, 0x0000], None),
    ("float32", 1.0, "DCBA", [0x0000, 0x803F], None),
    # float32 -2.5 = 0xC0200000
    ("float32", -2.5, "ABCD", [0xC020, 0x0000], None),
    ("float32", -2.5, "DCBA", [0x0000, 0x20C0], None),
    # int32 -2 = 0xFFFFFFFE (two's complement): only D differs
    ("int32", -2, "ABCD", [0xFFFF, 0xFFFE], None),
    ("int32", -2, "CDAB", [0xFFFE, 0xFFFF], None),
    ("int32", -2, "BADC", [0xFFFF, 0xFEFF], None),
    ("int32", -2, "DCBA", [0xFEFF, 0xFFFF], None),
    # uint32 0x01020304
    ("uint32", 0x01020304, "ABCD", [0x0102, 0x0304], None),
    ("uint32", 0x01020304, "CDAB", [0x0304, 0x0102], None),
    ("uint32", 0x01020304, "BADC", [0x0201, 0x0403], None),
    ("uint32", 0x01020304, "DCBA", [0x0403, 0x0201], None),
    # 64 bits: A..H = 01..08
    ("uint64", 0x0102030405060708, "ABCD", [0x0102, 0x0304, 0x0506, 0x0708], None),
    ("uint64", 0x0102030405060708, "CDAB", [0x0708, 0x0506, 0x0304, 0x0102], None),
    ("uint64", 0x0102030405060708, "BADC", [0x0201, 0x0403, 0x0605, 0x0807], None),
    ("uint64", 0x0102030405060708, "DCBA", [0x0807, 0x0605, 0x0403, 0x0201], None),
    # float64 1.0 = 0x3FF0000000000000
    ("float64", 1.0, "ABCD", [0x3FF0, 0, 0, 0], None),
    ("float64", 1.0, "CDAB", [0, 0, 0, 0x3FF0], None),
    ("float64", 1.0, "BADC", [0xF03F, 0, 0, 0], None),
    ("float64", 1.0, "DCBA", [0, 0, 0, 0xF03F], None),
    # int64 -2 = 0xFFFFFFFFFFFFFFFE
    ("int64", -2, "CDAB", [0xFFFE, 0xFFFF, 0xFFFF, 0xFFFF], None),
    # one register: only the byte choice counts
    ("int16", -2, "ABCD", [0xFFFE], None),
    ("int16", -2, "CDAB", [0xFFFE], None),
    ("int16", -2, "BADC", [0xFEFF], None),
    ("int16", -2, "DCBA", [0xFEFF], None),
    ("uint16", 0x1234, "BADC", [0x3412], None),
    # strings: "AB1" = 41 42 31 in 4 bytes, NUL-padded; the word choice never reverses text
    ("string", "AB1", "ABCD", [0x4142, 0x3100], 4),
    ("string", "AB1", "CDAB", [0x4142, 0x3100], 4),
    ("string", "AB1", "BADC", [0x4241, 0x0031], 4),
    ("string", "AB1", "DCBA", [0x4241, 0x0031], 4),
    ("string", "SDM630", "ABCD", [0x5344, 0x4D36, 0x3330, 0x0000, 0x0000], 10),
]


def _wire(words: list[int]) -> bytes:
    """Registers as they travel: high byte first (written out here, not the gateway's helper)."""
    return b"".join(bytes([w >> 8, w & 0xFF]) for w in words)


@pytest.mark.parametrize(("dtype", "value", "order", "words", "length"), VECTORS)
def test_simulator_encoder_matches_hand_written_vectors(
    dtype: DataType, value: object, order: Order, words: list[int], length: int | None
) -> None:
    assert encode_raw(dtype, value, order, length) == words  # type: ignore[arg-type]
    assert registers_of(dtype, length) == len(words)


@pytest.mark.parametrize(("dtype", "value", "order", "words", "length"), VECTORS)
def test_gateway_decoder_matches_hand_written_vectors(
    dtype: DataType, value: object, order: Order, words: list[int], length: int | None
) -> None:
    got = decode_raw(dtype, _wire(words), order)
    assert got == value and type(got) is type(value)
    assert register_count(dtype, length) == len(words)


def test_bit_vectors() -> None:
    # Bit 0 is the least significant bit of the register value: 0x8001 has bits 0 and 15.
    assert set_bit(0, 0, True) == 0x0001 and set_bit(0, 15, True) == 0x8000
    assert set_bit(0x8001, 15, False) == 0x0001
    assert [decode_raw("bit", _wire([0x8001]), bit=b) for b in (0, 1, 15)] == [True, False, True]


# ----------------------------------------------------------------------------------------------
# Known answers pin the meaning of each byte order


@pytest.mark.parametrize(
    ("order", "words"),
    [
        ("ABCD", [0x1234, 0x5678]),
        ("CDAB", [0x5678, 0x1234]),
        ("BADC", [0x3412, 0x7856]),
        ("DCBA", [0x7856, 0x3412]),
    ],
)
def test_int32_byte_orders_known_answers(order: Order, words: list[int]) -> None:
    assert decode_raw("uint32", words_to_bytes(words), order) == 0x12345678
    assert encode_raw("uint32", 0x12345678, order) == words


@pytest.mark.parametrize(
    ("order", "words"),
    [
        ("ABCD", [0x4366, 0x199A]),
        ("CDAB", [0x199A, 0x4366]),
        ("BADC", [0x6643, 0x9A19]),
        ("DCBA", [0x9A19, 0x6643]),
    ],
)
def test_float32_byte_orders_known_answers(order: Order, words: list[int]) -> None:
    # 230.1 V as an Eastron meter sends it (ABCD), and the three other layouts.
    assert decode_raw("float32", words_to_bytes(words), order) == 230.1
    assert encode_raw("float32", 230.1, order) == words


def test_int64_word_swap_reverses_all_four_registers() -> None:
    words = [0x0102, 0x0304, 0x0506, 0x0708]
    assert decode_raw("uint64", words_to_bytes(words), "ABCD") == 0x0102030405060708
    assert decode_raw("uint64", words_to_bytes(words), "CDAB") == 0x0708050603040102
    assert decode_raw("uint64", words_to_bytes(words), "DCBA") == 0x0807060504030201


def test_sixteen_bit_types_honour_only_the_byte_swap() -> None:
    data = words_to_bytes([0x0102])
    assert decode_raw("uint16", data, "ABCD") == decode_raw("uint16", data, "CDAB") == 0x0102
    assert decode_raw("uint16", data, "BADC") == decode_raw("uint16", data, "DCBA") == 0x0201
    assert decode_raw("int16", words_to_bytes([0xFFFE])) == -2


def test_string_padding_and_byte_swap() -> None:
    words = encode_raw("string", "SDM630", "ABCD", length=10)
    assert words == [0x5344, 0x4D36, 0x3330, 0, 0]
    assert decode_raw("string", words_to_bytes(words)) == "SDM630"
    assert decode_raw("string", words_to_bytes([0x4453, 0x364D]), "BADC") == "SDM6"
    assert decode_raw("string", words_to_bytes([0x4142, 0x2020])) == "AB"  # space padding
    with pytest.raises(ValueError, match="does not fit"):
        encode_raw("string", "too long", length=4)


def test_bits_and_bools() -> None:
    assert [decode_raw("bit", words_to_bytes([0x8001]), bit=b) for b in (0, 1, 15)] == [
        True,
        False,
        True,
    ]
    assert decode_raw("bool", words_to_bytes([0x0100])) is True
    assert decode_raw("bool", words_to_bytes([0])) is False
    with pytest.raises(ValueError, match="bit index"):
        decode_raw("bit", words_to_bytes([1]))


def test_values_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        encode_raw("uint16", 70000)
    with pytest.raises(ValueError, match="does not fit"):
        encode_raw("int32", -(2**31) - 1)


def test_register_counts() -> None:
    assert [register_count(t) for t in NUMERIC] == [1, 1, 2, 2, 4, 4, 2, 4]
    assert register_count("string", 5) == 3
    with pytest.raises(ValueError, match="length"):
        register_count("string")
    assert FieldSpec("a", "coil", 7, "bool").count == 1
    assert FieldSpec("a", "input", 7, "float64").end == 11


# ----------------------------------------------------------------------------------------------
# Codec: properties over every type and order


@given(dtype=st.sampled_from(NUMERIC), order=orders, data=st.data())
def test_every_register_pattern_round_trips(
    dtype: DataType, order: Order, data: st.DataObject
) -> None:
    words = data.draw(
        st.lists(word, min_size=register_count(dtype), max_size=register_count(dtype))
    )
    value = decode_raw(dtype, words_to_bytes(words), order)
    assume(not (isinstance(value, float) and math.isnan(value)))  # NaN payloads are not kept
    assert encode_raw(dtype, value, order) == words


@given(order=orders, data=st.data(), dtype=st.sampled_from(sorted(INT_RANGES)))
def test_every_integer_round_trips(order: Order, data: st.DataObject, dtype: DataType) -> None:
    lo, hi = INT_RANGES[dtype]
    v = data.draw(st.integers(lo, hi))
    words = encode_raw(dtype, v, order)
    assert len(words) == register_count(dtype)
    assert all(0 <= w <= 0xFFFF for w in words)
    assert decode_raw(dtype, words_to_bytes(words), order) == v


@given(order=orders, v=st.floats(allow_nan=False))
def test_every_float64_round_trips_exactly(order: Order, v: float) -> None:
    out = decode_raw("float64", words_to_bytes(encode_raw("float64", v, order)), order)
    assert out == v and math.copysign(1, out) == math.copysign(1, v)


@given(order=orders, v=st.floats(width=32, allow_nan=False))
@example(order="ABCD", v=3.4028234663852886e38)
def test_every_float32_round_trips_to_the_same_float32(order: Order, v: float) -> None:
    out = decode_raw("float32", words_to_bytes(encode_raw("float32", v, order)), order)
    assert isinstance(out, float)
    assert struct.pack(">f", out) == struct.pack(">f", v)
    # ... and it is the shortest such decimal: one digit fewer would be another float32.
    if math.isfinite(v) and v != 0:
        assert len(repr(out)) <= len(repr(v))


def test_nan_and_infinities_decode_as_such() -> None:
    nan = decode_raw("float32", words_to_bytes([0x7FC0, 0x0000]))
    assert isinstance(nan, float) and math.isnan(nan)
    assert decode_raw("float32", words_to_bytes([0xFF80, 0])) == -math.inf
    assert shortest_float32(math.inf) == math.inf


@given(
    order=orders,
    text=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20).filter(
        lambda s: not s.endswith(" ")
    ),
    extra=st.integers(0, 5),
)
def test_every_string_round_trips(order: Order, text: str, extra: int) -> None:
    length = max(1, len(text.encode()) + extra)
    words = encode_raw("string", text, order, length)
    assert len(words) == register_count("string", length)
    assert decode_raw("string", words_to_bytes(words), order) == text


@given(word=word, bit=st.integers(0, 15), on=st.booleans())
def test_set_bit_changes_exactly_one_bit(word: int, bit: int, on: bool) -> None:
    new = set_bit(word, bit, on)
    assert decode_raw("bit", words_to_bytes([new]), bit=bit) is on
    assert new & ~(1 << bit) == word & ~(1 << bit)


@given(order=orders, data=st.binary(min_size=0, max_size=16).filter(lambda b: len(b) % 2 == 0))
def test_reorder_is_its_own_inverse(order: Order, data: bytes) -> None:
    assert reorder(reorder(data, order), order) == data
    assert bytes_to_words(data) == list(struct.unpack(f">{len(data) // 2}H", data))


@given(
    dtype=st.sampled_from(NUMERIC),
    raw=st.integers(-1000, 1000),
    scale=st.sampled_from([1.0, 0.1, 0.01, 2.0, -1.0, 10.0]),
    offset=st.sampled_from([0.0, -40.0, 273.15, 1.5]),
)
def test_scale_and_offset(dtype: DataType, raw: int, scale: float, offset: float) -> None:
    v = scaled(raw, scale, offset)
    assert v == pytest.approx(raw * scale + offset)
    if scale == 1.0 and offset == 0.0:
        assert type(v) is int
    back = unscaled(v, dtype, scale, offset)
    assert back == pytest.approx(raw)
    assert scaled(True, 2.0, 1.0) is True and scaled("x", 2.0, 1.0) == "x"


@given(
    dtype=st.sampled_from([*NUMERIC, "bit", "bool", "string"]),
    order=orders,
    scale=st.sampled_from([1.0, 0.1, -2.5]),
    offset=st.sampled_from([0.0, 40.0]),
    data=st.data(),
)
def test_compiled_decoder_equals_the_reference_decoder(
    dtype: DataType, order: Order, scale: float, offset: float, data: st.DataObject
) -> None:
    numeric = dtype in NUMERIC
    spec = FieldSpec(
        "s",
        "holding",
        3,
        dtype,
        order,
        bit=data.draw(st.integers(0, 15)) if dtype == "bit" else None,
        length=data.draw(st.integers(1, 9)) if dtype == "string" else None,
        scale=scale if numeric else 1.0,
        offset=offset if numeric else 0.0,
    )
    lead = data.draw(st.integers(0, 3))
    words = data.draw(
        st.lists(word, min_size=lead + spec.count + 2, max_size=lead + spec.count + 2)
    )
    buf = words_to_bytes(words)
    want = spec.value(spec.decode(buf[2 * lead : 2 * (lead + spec.count)]))
    got = make_decoder(spec)(buf, lead)
    if isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got)
    else:
        assert got == want and type(got) is type(want)


def test_every_data_type_is_covered() -> None:
    assert set(DATA_TYPES) == {*NUMERIC, "bool", "bit", "string"}


# ----------------------------------------------------------------------------------------------
# RTU CRC


def test_crc_known_answer() -> None:
    # The classic "read 10 holding registers of unit 1" frame: 01 03 00 00 00 0A C5 CD.
    frame = bytes.fromhex("01030000000A")
    assert crc16(frame).to_bytes(2, "little") == bytes.fromhex("C5CD")


@given(st.binary(min_size=1, max_size=64))
def test_crc_matches_pymodbus(data: bytes) -> None:
    assert crc16(data).to_bytes(2, "little") == FramerRTU.compute_CRC(data).to_bytes(2, "big")


@given(
    regs=st.lists(word, min_size=1, max_size=10),
    flip_at=st.integers(0, 100),
    flip=st.integers(1, 255),
    unit=st.integers(1, 247),
)
def test_rtu_crc_check_catches_any_corrupted_byte(
    regs: list[int], flip_at: int, flip: int, unit: int
) -> None:
    body = bytes([unit, 3, 2 * len(regs)]) + words_to_bytes(regs)
    frame = body + crc16(body).to_bytes(2, "little")
    assert rtu_frame_problem(frame) is None
    assert rtu_frame_problem(frame[:-1]) is None  # incomplete: no verdict yet
    i = 3 + flip_at % (len(frame) - 3)  # keep the header, so the frame length is unchanged
    bad = bytearray(frame)
    bad[i] ^= flip
    assert rtu_frame_problem(bytes(bad)) == "crc"
    exc = bytes([unit, 0x83, 2])
    assert rtu_frame_problem(exc + crc16(exc).to_bytes(2, "little")) is None


# ----------------------------------------------------------------------------------------------
# Planner


@st.composite
def span_sets(draw: st.DrawFn, max_size: int = 7, max_addr: int = 60) -> list[Span]:
    out = []
    for _ in range(draw(st.integers(1, max_size))):
        table = draw(st.sampled_from(TABLES))
        count = 1 if table in BIT_TABLES else draw(st.sampled_from([1, 1, 2, 2, 4, 6]))
        out.append(Span(table, draw(st.integers(0, max_addr)), count))
    return out


def _block_ok(spans: Sequence[Span], limit: int, gap: int, breaks: Sequence[int]) -> bool:
    start = min(s.address for s in spans)
    end = max(s.end for s in spans)
    if end - start > limit:
        return False
    last_start = max(s.address for s in spans)
    if any(start < b <= last_start for b in breaks):
        return False
    covered: set[int] = set()
    for s in spans:
        covered.update(range(s.address, s.end))
    hole = 0
    for a in range(start, end):
        hole = 0 if a in covered else hole + 1
        if hole > gap:
            return False
    return True


def _partitions(items: list[int]) -> Iterator[list[list[int]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]
        yield [[first], *part]


def _check_plan(
    spans: list[Span],
    plan: list[ReadRequest],
    *,
    gap: int,
    bit_gap: int,
    max_regs: int,
    max_bits: int,
    breaks: dict[Table, list[int]],
    skip: set[int],
) -> None:
    seen = sorted(i for r in plan for i in r.fields)
    assert seen == sorted(set(range(len(spans))) - skip), "each field in exactly one request"
    for r in plan:
        members = [spans[i] for i in r.fields]
        assert all(s.table == r.table for s in members)
        assert r.address == min(s.address for s in members), "requests start at a field"
        assert r.end == max(s.end for s in members), "requests end at a field"
        bits = r.table in BIT_TABLES
        assert _block_ok(
            members,
            max_bits if bits else max_regs,
            bit_gap if bits else gap,
            breaks.get(r.table, []),
        )
    keys = [(TABLES.index(r.table), r.address) for r in plan]
    assert keys == sorted(keys)


@settings(max_examples=300)
@given(
    spans=span_sets(),
    gap=st.integers(0, 8),
    max_regs=st.integers(6, 30),
    max_bits=st.integers(1, 30),
    data=st.data(),
)
def test_plan_is_valid_and_minimal(
    spans: list[Span], gap: int, max_regs: int, max_bits: int, data: st.DataObject
) -> None:
    breaks = {t: data.draw(st.lists(st.integers(0, 60), max_size=2)) for t in TABLES}
    plan = plan_reads(
        spans,
        max_gap=gap,
        max_bit_gap=gap,
        max_registers=max_regs,
        max_bits=max_bits,
        breaks=breaks,
    )
    _check_plan(
        spans,
        plan,
        gap=gap,
        bit_gap=gap,
        max_regs=max_regs,
        max_bits=max_bits,
        breaks=breaks,
        skip=set(),
    )
    # Minimal: no partition of the fields into valid requests is smaller (brute force).
    best = 0
    for table in TABLES:
        idx = [i for i, s in enumerate(spans) if s.table == table]
        if not idx:
            continue
        limit = max_bits if table in BIT_TABLES else max_regs
        best += min(
            len(p)
            for p in _partitions(idx)
            if all(_block_ok([spans[i] for i in b], limit, gap, breaks[table]) for b in p)
        )
    assert len(plan) == best


@given(spans=span_sets(max_size=300, max_addr=3000), gap=st.integers(0, 20), data=st.data())
def test_plan_respects_protocol_limits_on_big_maps(
    spans: list[Span], gap: int, data: st.DataObject
) -> None:
    skip = set(data.draw(st.lists(st.integers(0, len(spans) - 1), max_size=5)))
    plan = plan_reads(spans, max_gap=gap, max_bit_gap=gap * 16, skip=skip)
    _check_plan(
        spans, plan, gap=gap, bit_gap=gap * 16, max_regs=125, max_bits=2000, breaks={}, skip=skip
    )
    assert all(r.count <= (2000 if r.table in BIT_TABLES else 125) for r in plan)


def test_plan_fills_reads_up_to_the_protocol_limits() -> None:
    singles = [Span("holding", a, 1) for a in range(250)]
    assert [(r.address, r.count) for r in plan_reads(singles)] == [(0, 125), (125, 125)]
    floats = [Span("holding", a, 2) for a in range(0, 250, 2)]  # a float never straddles reads
    assert [(r.address, r.count) for r in plan_reads(floats)] == [(0, 124), (124, 124), (248, 2)]
    bits = [Span("coil", a, 1) for a in range(4001)]
    assert [(r.address, r.count) for r in plan_reads(bits)] == [(0, 2000), (2000, 2000), (4000, 1)]


def test_plan_gap_and_no_coalescing() -> None:
    spans = [Span("input", 0, 2), Span("input", 12, 2), Span("input", 25, 2)]
    assert [(r.address, r.count) for r in plan_reads(spans, max_gap=10)] == [(0, 14), (25, 2)]
    assert len(plan_reads(spans, max_gap=11)) == 1
    assert len(plan_reads(spans, max_gap=10, coalesce=False)) == 3
    assert len(plan_reads(spans, max_gap=50, breaks={"input": [12]})) == 2


def test_plan_refuses_a_field_longer_than_a_read() -> None:
    with pytest.raises(ValueError, match="more than one read allows"):
        plan_reads([Span("holding", 0, 4)], max_registers=2)
