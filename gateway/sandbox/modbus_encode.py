"""What a Modbus device puts in its registers: the simulator's own encoder.

Written from the definitions, not from the gateway's decoder (``gateway.sources.modbus.decode``),
so that a byte-order mistake in one cannot be mirrored by the other and pass every test:

* Modbus Application Protocol Specification V1.1b3, section 4.2 "Data Encoding": "MODBUS uses a
  'big-Endian' representation for addresses and data items": a register is 16 bits and its most
  significant byte travels first. Coils and discrete inputs are single bits.
* Values wider than a register are not defined by the protocol; devices lay them out in one of
  four conventional orders, named by writing the value's bytes from most to least significant as
  A, B, C, D (E..H for 64 bits) and listing them in wire (address) order:

  =====  ==================================  ====================================
  order  float32 1.0 (0x3F800000) registers  rule
  =====  ==================================  ====================================
  ABCD   0x3F80 0x0000                       most significant register first,
                                             each register big-endian (default)
  CDAB   0x0000 0x3F80                       least significant register first
                                             ("word swap", "low word first")
  BADC   0x803F 0x0000                       most significant register first,
                                             the two bytes of each register swapped
  DCBA   0x0000 0x803F                       least significant register first and
                                             bytes swapped: fully little-endian
  =====  ==================================  ====================================

  So an order is two independent choices: which register comes first (word order) and which
  byte of a register comes first (byte order). 64-bit values apply the same two choices over
  four registers (CDAB: GH EF CD AB). A one-register value only has the byte choice (CDAB is
  ABCD, DCBA is BADC).
* Strings: one byte per character, two per register, first character in the first register;
  the byte choice applies inside each register (BADC/DCBA put the first character in the low
  byte), the word choice does not (text is never stored backwards). Unused bytes are NUL.
* Integers are two's complement; floats are IEEE 754 binary32/binary64 (``struct``'s ``f`` and
  ``d``).

Only the type-name literals are shared with the gateway's config (same spellings, defined here).
"""

from __future__ import annotations

import math
import struct
from typing import Final, Literal

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

BIT_TABLES: Final[frozenset[str]] = frozenset({"coil", "discrete"})

#: struct format (big-endian, most significant byte first) and register count of each number.
_NUMBERS: Final[dict[str, tuple[str, int]]] = {
    "int16": (">h", 1),
    "uint16": (">H", 1),
    "int32": (">i", 2),
    "uint32": (">I", 2),
    "int64": (">q", 4),
    "uint64": (">Q", 4),
    "float32": (">f", 2),
    "float64": (">d", 4),
}
INTEGER_TYPES: Final[frozenset[str]] = frozenset(
    {"int16", "uint16", "int32", "uint32", "int64", "uint64"}
)
FLOAT_TYPES: Final[frozenset[str]] = frozenset({"float32", "float64"})

#: Orders whose least significant register comes first / whose registers hold their bytes
#: low byte first.
_LOW_WORD_FIRST: Final = frozenset({"CDAB", "DCBA"})
_LOW_BYTE_FIRST: Final = frozenset({"BADC", "DCBA"})


def registers_of(dtype: DataType, length: int | None = None) -> int:
    """Registers a value of ``dtype`` occupies; a string of ``length`` bytes takes one register
    per two bytes (rounded up). ``bool`` and ``bit`` take one register (or one coil)."""
    if dtype == "string":
        if length is None or length < 1:
            raise ValueError("a string needs a length of at least one byte")
        return -(-length // 2)
    if dtype in ("bool", "bit"):
        return 1
    return _NUMBERS[dtype][1]


def bytes_to_words(data: bytes) -> list[int]:
    """Wire bytes to register values: each register is two bytes, high byte first (4.2)."""
    if len(data) % 2:
        raise ValueError("an odd number of bytes is not a whole number of registers")
    return [data[i] << 8 | data[i + 1] for i in range(0, len(data), 2)]


def _swap_bytes(word: int) -> int:
    return (word & 0xFF) << 8 | word >> 8


def encode_raw(
    dtype: DataType, value: RawValue, order: Order = "ABCD", length: int | None = None
) -> list[int]:
    """The registers, in address order, that hold ``value`` as ``dtype`` in ``order``.

    ``bool`` is one register, 1 or 0. A ``bit`` shares its register: use :func:`set_bit`.
    Raises ValueError when the value does not fit the type (or the string its length).
    """
    if dtype == "bit":
        raise ValueError("a bit shares its register with others; use set_bit")
    if dtype == "bool":
        return [1 if value else 0]
    if dtype == "string":
        raw = str(value).encode("utf-8")
        size = len(raw) if length is None else length
        if len(raw) > size:
            raise ValueError(f"string of {len(raw)} bytes does not fit {size} bytes")
        padded = raw.ljust(2 * registers_of("string", max(size, 1)), b"\x00")
        words = bytes_to_words(padded)  # first character in the high byte
        return [_swap_bytes(w) for w in words] if order in _LOW_BYTE_FIRST else words
    fmt, count = _NUMBERS[dtype]
    try:
        msb_first = struct.pack(fmt, value)  # the value's bytes A, B, C, ... in that order
    except (struct.error, OverflowError, TypeError) as exc:
        raise ValueError(f"{value!r} does not fit {dtype}: {exc}") from None
    words = bytes_to_words(msb_first)  # registers, most significant first, high byte first
    assert len(words) == count
    if order in _LOW_BYTE_FIRST:
        words = [_swap_bytes(w) for w in words]
    if order in _LOW_WORD_FIRST:
        words.reverse()
    return words


def set_bit(word: int, bit: int, value: bool) -> int:
    """``word`` with bit ``bit`` (0 = least significant) set to ``value``; the rest kept."""
    if not 0 <= bit <= 15:
        raise ValueError(f"bit {bit} is not in a 16-bit register")
    mask = 1 << bit
    return (word | mask if value else word & ~mask) & 0xFFFF


def unscaled(value: RawValue, dtype: DataType, scale: float = 1.0, offset: float = 0.0) -> RawValue:
    """The raw value a device holds so that ``raw * scale + offset`` reads as ``value``.

    Integer types get the nearest integer; booleans, bits and strings pass unchanged.
    Raises ValueError for a non-finite value of an integer type.
    """
    if dtype in ("bool", "bit", "string") or isinstance(value, bool | str):
        return value
    raw = value if scale == 1.0 and offset == 0.0 else (value - offset) / scale
    if dtype in INTEGER_TYPES:
        if isinstance(raw, float) and not math.isfinite(raw):
            raise ValueError(f"{value!r} has no {dtype} representation")
        return round(raw)
    return float(raw)
