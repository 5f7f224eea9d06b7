"""Modbus values and read plans, without any I/O: the pure half of the Modbus source.

Two things live here, both free of pymodbus so they can be property-tested in isolation:

* **Decoder**: register words (or bits) -> values for every supported type and byte layout
  (float32 decodes to the shortest decimal naming the same float32); ``scaled`` applies
  ``raw * scale + offset``; ``make_decoder`` compiles the same decoding per field for the poll
  loop. The gateway only reads, so there is no encoder here: the device simulator has its own,
  written separately from the same definitions (``gateway/sandbox/modbus_encode.py``), and the
  tests hold each against hand-written register vectors and against the other (decoding what
  the simulator encodes gives back every value; encoding what this decodes gives back every
  register pattern, NaN payloads aside).
* **Planner**: ``plan_reads`` coalesces fields into as few read requests as the protocol allows
  (125 registers / 2000 bits per read, a maximum unused gap between fields, and "breaks" learned
  from devices that refuse some addresses).

Byte layouts name the bytes of a value from most to least significant as A, B, C, D (E..H for
64-bit values) and say in which order they sit in address order on the wire:

=====  =======================================  ====================================
order  32-bit value 0xAABBCCDD in two registers  meaning
=====  =======================================  ====================================
ABCD   reg0 = AABB, reg1 = CCDD                  big-endian (Modbus default)
CDAB   reg0 = CCDD, reg1 = AABB                  word swap (low word first)
BADC   reg0 = BBAA, reg1 = DDCC                  byte swap inside each register
DCBA   reg0 = DDCC, reg1 = BBAA                  little-endian
=====  =======================================  ====================================

64-bit values follow the same rule over four registers. For one-register types only the byte
swap part counts (CDAB reads like ABCD, DCBA like BADC); strings keep their registers in address
order and honour only the byte swap (BADC/DCBA), since no device stores text backwards.
"""

from __future__ import annotations

import math
import struct
from bisect import bisect_right
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, get_args

Table = Literal["coil", "discrete", "holding", "input"]
DataType = Literal[
    "bool",
    "bit",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float32",
    "float64",
    "string",
]
Order = Literal["ABCD", "CDAB", "BADC", "DCBA"]
RawValue = bool | int | float | str

TABLES: Final[tuple[Table, ...]] = get_args(Table)
DATA_TYPES: Final[tuple[DataType, ...]] = get_args(DataType)
ORDERS: Final[tuple[Order, ...]] = get_args(Order)
BIT_TABLES: Final[frozenset[str]] = frozenset({"coil", "discrete"})

#: Protocol limits for one read (Modbus application protocol v1.1b3, functions 1-4).
MAX_READ_REGISTERS: Final = 125
MAX_READ_BITS: Final = 2000

_STRUCTS: Final[dict[str, struct.Struct]] = {
    "int16": struct.Struct(">h"),
    "uint16": struct.Struct(">H"),
    "int32": struct.Struct(">i"),
    "uint32": struct.Struct(">I"),
    "int64": struct.Struct(">q"),
    "uint64": struct.Struct(">Q"),
    "float32": struct.Struct(">f"),
    "float64": struct.Struct(">d"),
}
_FIXED_REGISTERS: Final[dict[str, int]] = {
    "bool": 1,
    "bit": 1,
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "int64": 4,
    "uint64": 4,
    "float32": 2,
    "float64": 4,
}
INTEGER_TYPES: Final[frozenset[str]] = frozenset(
    {"int16", "uint16", "int32", "uint32", "int64", "uint64"}
)
FLOAT_TYPES: Final[frozenset[str]] = frozenset({"float32", "float64"})
NUMERIC_TYPES: Final[frozenset[str]] = INTEGER_TYPES | FLOAT_TYPES


def register_count(dtype: DataType, length: int | None = None) -> int:
    """Registers a value of ``dtype`` occupies (a string of ``length`` bytes: ceil(length/2))."""
    if dtype == "string":
        if length is None or length < 1:
            raise ValueError("a string needs a length of at least 1 byte")
        return (length + 1) // 2
    return _FIXED_REGISTERS[dtype]


# ----------------------------------------------------------------------------------------------
# Decoding


def reorder(data: bytes, order: Order) -> bytes:
    """Move bytes between wire order and big-endian value order. Its own inverse."""
    if order == "ABCD" or len(data) < 2:
        return data
    if order == "DCBA":
        return data[::-1]
    if order == "BADC":
        out = bytearray(len(data))
        out[0::2] = data[1::2]
        out[1::2] = data[0::2]
        return bytes(out)
    # CDAB: registers in reverse order, bytes inside each register untouched.
    return b"".join(data[i : i + 2] for i in range(len(data) - 2, -1, -2))


def _string_order(order: Order) -> Order:
    return "BADC" if order in ("BADC", "DCBA") else "ABCD"


def words_to_bytes(words: Sequence[int]) -> bytes:
    """Registers as they travel on the wire (each big-endian)."""
    return struct.pack(f">{len(words)}H", *words)


def decode_raw(
    dtype: DataType, data: bytes, order: Order = "ABCD", bit: int | None = None
) -> RawValue:
    """Decode the wire bytes of one register value (``2 * register_count`` bytes).

    ``bool`` on a register is "register != 0"; ``bit`` is bit ``bit`` of the register value
    (0 = least significant). Strings end at the first NUL and lose trailing spaces (the usual
    padding); undecodable bytes become U+FFFD rather than failing the read.
    """
    if dtype == "bit":
        if bit is None:
            raise ValueError("type bit needs a bit index")
        return bool((int.from_bytes(data[0:2], "big") >> bit) & 1)
    if dtype == "bool":
        return any(data)
    if dtype == "string":
        text = reorder(data, _string_order(order)).split(b"\x00", 1)[0]
        return text.decode("utf-8", errors="replace").rstrip(" ")
    value: int | float = _STRUCTS[dtype].unpack(reorder(data, order))[0]
    if dtype == "float32":
        return shortest_float32(value)
    return value


def shortest_float32(x: float) -> float:
    """The shortest decimal that is the same float32 as ``x`` (230.1, not 230.10000610351562).

    Packing the result as float32 gives the same four bytes as packing ``x``, so register
    values still round-trip exactly; only the digits a service sees get shorter.
    """
    if not math.isfinite(x):
        return x
    f32 = _STRUCTS["float32"]
    packed = f32.pack(x)
    for digits in (6, 7, 8):
        y = float(f"{x:.{digits}g}")
        try:
            if f32.pack(y) == packed:
                return y
        except OverflowError:  # rounding up past the float32 maximum
            continue
    return float(f"{x:.9g}")  # nine significant digits always name a float32 uniquely


def scaled(raw: RawValue, scale: float, offset: float) -> RawValue:
    """``raw * scale + offset`` for numbers (ints stay ints when scale is 1 and offset 0)."""
    if isinstance(raw, bool | str):
        return raw
    if scale == 1.0 and offset == 0.0:
        return raw
    return raw * scale + offset


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One fully resolved field of a register map (all defaults applied).

    ``count`` is the number of registers (or bits, in the coil and discrete tables) it spans.
    """

    series: str
    table: Table
    address: int
    dtype: DataType
    order: Order = "ABCD"
    bit: int | None = None
    length: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    #: Registers (or bits) spanned; derived, kept because every poll asks for it.
    count: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = 1 if self.table in BIT_TABLES else register_count(self.dtype, self.length)
        object.__setattr__(self, "count", n)

    @property
    def end(self) -> int:
        return self.address + self.count

    def decode(self, data: bytes) -> RawValue:
        """Decode this field's own wire bytes (``2 * count`` bytes) to its raw value."""
        return decode_raw(self.dtype, data, self.order, self.bit)

    def value(self, raw: RawValue) -> RawValue:
        return scaled(raw, self.scale, self.offset)


Decoder = Callable[[bytes, int], RawValue]


class Layout(Protocol):
    """What a decoder depends on: a :class:`FieldSpec`, or a field of a register map before a
    device's series names are applied (``gateway.sources.modbus.config.FieldTemplate``)."""

    @property
    def dtype(self) -> DataType: ...
    @property
    def order(self) -> Order: ...
    @property
    def bit(self) -> int | None: ...
    @property
    def length(self) -> int | None: ...
    @property
    def count(self) -> int: ...
    @property
    def scale(self) -> float: ...
    @property
    def offset(self) -> float: ...


#: Decoders by layout: a decoder depends on the type, order, bit, length and scaling only, never
#: on the series or address, so 200 devices of one 125-field profile share 125 of them.
_DECODERS: dict[tuple[object, ...], Decoder] = {}


def make_decoder(spec: Layout) -> Decoder:
    """A function giving ``spec``'s scaled value from a read's wire bytes, the field starting
    ``reg_offset`` registers into them: ``decoder(buf, reg_offset)``.

    Equal to ``spec.value(spec.decode(field_bytes))`` (register tables only), but built once per
    layout: big-endian layouts unpack in place, DCBA unpacks little-endian, no slicing.
    """
    key = (spec.dtype, spec.order, spec.bit, spec.length, spec.count, spec.scale, spec.offset)
    decoder = _DECODERS.get(key)
    if decoder is None:
        decoder = _DECODERS[key] = _build_decoder(spec)
    return decoder


def _build_decoder(spec: Layout) -> Decoder:
    dt, order = spec.dtype, spec.order
    n = 2 * spec.count
    if dt == "bit":
        bit = spec.bit
        assert bit is not None
        return lambda buf, off: bool(((buf[2 * off] << 8) | buf[2 * off + 1]) >> bit & 1)
    if dt == "bool":
        return lambda buf, off: buf[2 * off] != 0 or buf[2 * off + 1] != 0
    if dt == "string":
        return lambda buf, off: decode_raw("string", buf[2 * off : 2 * off + n], order)
    big = _STRUCTS[dt]
    raw: Decoder
    if order == "ABCD" or (n == 2 and order == "CDAB"):
        unpack_from = big.unpack_from
        raw = lambda buf, off: unpack_from(buf, 2 * off)[0]  # noqa: E731
    elif order == "DCBA" or (n == 2 and order == "BADC"):
        little_from = struct.Struct("<" + big.format[1:]).unpack_from
        raw = lambda buf, off: little_from(buf, 2 * off)[0]  # noqa: E731
    else:
        unpack = big.unpack
        raw = lambda buf, off: unpack(reorder(buf[2 * off : 2 * off + n], order))[0]  # noqa: E731
    if dt == "float32":
        exact = raw
        raw = lambda buf, off: shortest_float32(exact(buf, off))  # noqa: E731
    scale, offset = spec.scale, spec.offset
    if scale == 1.0 and offset == 0.0:
        return raw
    unscaled_raw = raw
    return lambda buf, off: unscaled_raw(buf, off) * scale + offset


# ----------------------------------------------------------------------------------------------
# CRC (RTU frames)


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE: Final = _crc_table()


def crc16(data: bytes) -> int:
    """Modbus RTU CRC-16 (poly 0xA001 reflected, init 0xFFFF); sent low byte first."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


def rtu_frame_problem(buffer: bytes) -> str | None:
    """Whether the first complete RTU *response* frame in ``buffer`` fails its CRC.

    Returns "crc" for a complete read (1-4) or exception response whose CRC is wrong, None when
    it is right, incomplete, or not a response this gateway sends requests for.
    """
    if len(buffer) < 5:
        return None
    fc = buffer[1]
    if fc & 0x80:
        size = 5
    elif fc in (1, 2, 3, 4):
        size = 5 + buffer[2]
    else:
        return None
    if len(buffer) < size:
        return None
    want = int.from_bytes(buffer[size - 2 : size], "little")
    return None if crc16(buffer[: size - 2]) == want else "crc"


# ----------------------------------------------------------------------------------------------
# Planner


@dataclass(frozen=True, slots=True)
class Span:
    """What the planner needs of a field: where it is and how many registers/bits it spans."""

    table: Table
    address: int
    count: int

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read: ``count`` registers (or bits) from ``address``; ``fields`` index the spans."""

    table: Table
    address: int
    count: int
    fields: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.address + self.count

    def describe(self) -> str:
        return f"{self.table}[{self.address}..{self.end - 1}] ({len(self.fields)} fields)"


def plan_reads(
    spans: Sequence[Span],
    *,
    max_gap: int = 10,
    max_bit_gap: int = 64,
    max_registers: int = MAX_READ_REGISTERS,
    max_bits: int = MAX_READ_BITS,
    breaks: Mapping[Table, Collection[int]] | None = None,
    skip: Collection[int] = (),
    coalesce: bool = True,
) -> list[ReadRequest]:
    """Cover every span (except those in ``skip``) with the fewest read requests.

    Guarantees: each planned span lies wholly inside exactly one request of its own table; no
    request exceeds ``max_registers`` (register tables) or ``max_bits`` (bit tables); inside a
    request, no run of addresses covered by none of its fields is longer than ``max_gap``
    (``max_bit_gap`` for bits); no request holds fields starting on both sides of a break
    (a break ``b`` in ``breaks[table]`` separates starts ``< b`` from starts ``>= b``). With
    ``coalesce=False`` every span gets a request of its own. Requests come ordered by table
    (coil, discrete, holding, input) then address. Raises ValueError for a span longer than the
    limit of its table.

    Greedy over spans sorted by start: extend the current request while the next span keeps it
    within the limits, else start a new one. Each request then starts at the first span not yet
    covered, as far right as any valid plan could, which is what makes the count minimal.
    """
    skip_set = set(skip)
    by_table: dict[Table, list[int]] = {t: [] for t in TABLES}
    for i, s in enumerate(spans):
        limit = max_bits if s.table in BIT_TABLES else max_registers
        if s.count > limit:
            raise ValueError(
                f"field at {s.table} {s.address} spans {s.count}, "
                f"more than one read allows ({limit})"
            )
        if i not in skip_set:
            by_table[s.table].append(i)

    plan: list[ReadRequest] = []
    for table in TABLES:
        idxs = sorted(by_table[table], key=lambda i: (spans[i].address, spans[i].end, i))
        if not idxs:
            continue
        bits = table in BIT_TABLES
        limit = max_bits if bits else max_registers
        gap = max_bit_gap if bits else max_gap
        brk = sorted((breaks or {}).get(table, ()))
        start = end = 0
        members: list[int] = []
        for i in idxs:
            s = spans[i]
            if members and (
                not coalesce
                or s.address - end > gap
                or max(end, s.end) - start > limit
                or _break_between(brk, start, s.address)
            ):
                plan.append(ReadRequest(table, start, end - start, tuple(members)))
                members = []
            if members:
                end = max(end, s.end)
            else:
                start, end = s.address, s.end
            members.append(i)
        plan.append(ReadRequest(table, start, end - start, tuple(members)))
    return plan


def _break_between(brk: Sequence[int], lo: int, hi: int) -> bool:
    """True when some break b satisfies lo < b <= hi."""
    k = bisect_right(brk, lo)
    return k < len(brk) and brk[k] <= hi
