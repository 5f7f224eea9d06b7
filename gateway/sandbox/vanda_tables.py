"""The Vanda Hydro API document's tables and wire formats, transcribed for the emulator.

Transcribed from the service document itself (shared/seeds/004_eb17c629c85a279b.txt, the
"Hydro API" wiki page, revision of Sep 17, 2024), not from the uplink: the emulator must not
agree with the client by construction. Nothing here comes from :mod:`gateway.uplinks`.

The document's tables are kept below as the text they are printed as, cell for cell, and read
by small parsers, so a reader can hold them against the page:

* "Mapping Between Examination, Parameter, and Unit": nine rows. Names carry their stancode in
  parentheses ("Water Level (25)", "cm (19)"); the parameter of Elevation Level (21) has a code
  (439) and no name. Numbers are printed the Danish way: "." groups thousands ("-1.500",
  "10.000": -1500 cm and 10000 cm, i.e. -15 m and 100 m next to the elevation's -15..170 m) and
  "," would mark decimals (none occur); "-" in a bound means there is none.
* "Mapping Between Examination and Reason": the page lost its columns; each row kept its code,
  its name and only the number of its "X" marks. Which examination type takes which reason cannot
  be recovered, so a reason is valid for every type when the table marks it at all (0-17) and
  refused otherwise (18, "Nyt fixpunkt", has no mark).
* "Add Measurements To a Station": at most 1000 measurements per request; ``measurementDateTime``
  "without second component as an UTC timestamp in the RFC 3339 date+time format", e.g.
  ``2023-09-21T14:34Z``. Updates round the time "to the nearest minute".

Decisions of the emulator where the document is silent or contradicts itself:

* **Examination types**: the request section says "Valid examination types are 21, 22, 24, 25,
  and 27" (:data:`REQUEST_SECTION_TYPES`); both tables also list 28-31. The emulator serves all
  nine rows of the mapping table (a test wanting the narrow reading passes its own table).
* **Rounding** ("result values are rounded to a number of decimals"): half away from zero, on the
  shortest decimal that names the received number (what the JSON text said).
* **Time**: RFC 3339 section 5.6 ``date-time``, with the seconds optional as the document's
  example shows; ``T``/``Z`` in either case and a space for ``T`` (the RFC's note allows both).
  A zero offset (``Z``, ``+00:00``, ``-00:00``) is UTC; any other offset is refused.
* **Error codes**: the document names ``errorCode``/``errorMessage`` and lists no codes;
  :class:`ErrorCode` is the emulator's own numbering.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Context, Decimal
from enum import IntEnum
from typing import Any

#: "Currently, there is a limit 1000 measurements in a single request".
MAX_MEASUREMENTS_PER_REQUEST = 1000

#: "Valid examination types are 21, 22, 24, 25, and 27" (request section; see the docstring).
REQUEST_SECTION_TYPES: frozenset[int] = frozenset({21, 22, 24, 25, 27})

# ----------------------------------------------------------------------------------------------
# The document's tables, as printed

#: ExaminationType (SC1101) | Parameter (SC1008) | Unit (SC1009) | Min | Max | Decimals |
#: Minimum Interval (minutes)
_EXAMINATION_TABLE = """\
Elevation Level (21) | (439) | m (63) | -15 | 170 | 1 | 5
Scale Pole Level (22) | Water Level (1233) | cm (19) | -1.500 | 10.000 | 1 | 5
Water Level (25) | Water Level (1233) | cm (19) | -1.500 | 10.000 | 1 | 5
Water Flow (27) | Water Flow (1155) | l/sek (55) | - | - | 1 | 5
Measured Water Flow (24) | Water Flow (1155) | l/sek (55) | - | - | 1 | 5
Oxygen (28) | Oxygen (50) | mg/l (1) | 0 | - | 1 | 60
Temperature (29) | Temperature (1154) | Grader C (29) | -20 | 50 | 1 | 60
Groundwater Level Field Measurement (30) | Water Level (1233) | m (63) | -5 | 150 | 3 | 5
Groundwater Level (31) | Water Level (1233) | m (63) | -5 | 150 | 3 | 5
"""

#: Item | Reason | one "X" per examination type the reason applies to (columns lost).
_REASON_TABLE = """\
0 Ej oplyst X X X X
1 Migreret X X X X X X
2 Ny skalapæl X X X
3 Kotekontrol X X X
4 Estimeret X X X X X X
5 Måling X X X X
6 Stangmåling X X X
7 Vademåling X X X
8 Dronebåd X X X
9 Opspænding X X X
10 Litermål X X
11 Skønnet vandføring X X
12 Section by section X X
13 Rørmåling X X
14 Flyder X X X X
15 Fløjte X X X X
16 Manometer X X X X
17 Nedstik X X X X
18 Nyt fixpunkt
"""

_NAMED_CODE = re.compile(r"^(?P<name>.*?)\s*\((?P<code>\d+)\)$")


def _named_code(cell: str) -> tuple[str, int]:
    m = _NAMED_CODE.match(cell.strip())
    if m is None:
        raise ValueError(f"not 'name (code)': {cell!r}")
    return m.group("name"), int(m.group("code"))


def danish_number(cell: str) -> float | None:
    """A number as the document prints it: ``.`` groups thousands, ``,`` marks decimals,
    ``-`` alone means none. ``"-1.500"`` is -1500."""
    text = cell.strip()
    if text == "-":
        return None
    if not re.fullmatch(r"-?\d{1,3}(?:\.\d{3})*(?:,\d+)?|-?\d+(?:,\d+)?", text):
        raise ValueError(f"not a number as the document prints them: {cell!r}")
    return float(text.replace(".", "").replace(",", "."))


def _reasons(table: str) -> dict[int, tuple[str, int]]:
    """Reason code -> (name, number of X marks)."""
    out: dict[int, tuple[str, int]] = {}
    for line in table.splitlines():
        words = line.split()
        marks = 0
        while words and words[-1] == "X":
            words.pop()
            marks += 1
        out[int(words[0])] = (" ".join(words[1:]), marks)
    return out


#: stancode list SC1188 as the reason table names it: code -> (name, number of X marks).
REASONS: Mapping[int, tuple[str, int]] = _reasons(_REASON_TABLE)
#: Reasons marked for at least one examination type: valid for every type (see docstring).
MARKED_REASONS: frozenset[int] = frozenset(c for c, (_, marks) in REASONS.items() if marks)


@dataclass(frozen=True, slots=True)
class ExaminationType:
    """One row of the mapping table, plus the reason codes the emulator takes for it."""

    sc: int
    name: str
    parameter_sc: int
    parameter: str
    unit_sc: int
    unit: str
    min: float | None
    max: float | None
    decimals: int
    interval_min: int
    reason_codes: frozenset[int] = field(default=MARKED_REASONS)

    def to_json(self) -> dict[str, Any]:
        """One entry of the emulator's ``GET /api/config/examination-types`` (a shape of the
        emulator's own: the document points to Swagger for this)."""
        return {
            "examinationTypeSc": self.sc,
            "name": self.name,
            "parameterSc": self.parameter_sc,
            "unitSc": self.unit_sc,
            "min": self.min,
            "max": self.max,
            "decimals": self.decimals,
            "measurementIntervalMin": self.interval_min,
            "reasonCodesSc": sorted(self.reason_codes),
        }


def _examination_types(table: str) -> dict[int, ExaminationType]:
    out: dict[int, ExaminationType] = {}
    for line in table.splitlines():
        exam, param, unit, lo, hi, decimals, interval = (c.strip() for c in line.split("|"))
        name, sc = _named_code(exam)
        param_name, param_sc = _named_code(param)
        unit_name, unit_sc = _named_code(unit)
        out[sc] = ExaminationType(
            sc=sc,
            name=name,
            parameter_sc=param_sc,
            parameter=param_name,
            unit_sc=unit_sc,
            unit=unit_name,
            min=danish_number(lo),
            max=danish_number(hi),
            decimals=int(decimals),
            interval_min=int(interval),
        )
    return out


#: The mapping table, by examination type (SC1101), in the document's row order.
EXAMINATION_TYPES: Mapping[int, ExaminationType] = _examination_types(_EXAMINATION_TABLE)


class ErrorCode(IntEnum):
    """``errorCode`` of a ``failed`` item: the emulator's numbering (the document has none)."""

    NOT_COMMITTED = 0  # isSuccess true: valid, but its transaction was rolled back
    INVALID_DATETIME = 4001
    OUT_OF_RANGE = 4002
    INVALID_REASON = 4003
    MIN_INTERVAL = 4004
    NOT_FOUND = 4005
    INVALID_RESULT = 4006


# ----------------------------------------------------------------------------------------------
# Results


def stored_result(value: float, decimals: int) -> float:
    """``value`` as the service stores it: rounded half away from zero to ``decimals`` places,
    on the shortest decimal naming the number. Raises ValueError when it is not finite."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"result {value!r} is not a finite number")
        exact = Decimal(repr(value))
    else:
        exact = Decimal(int(value))
    # Enough digits for any double: the quantized value never loses its integer part.
    ctx = Context(prec=max(28, exact.adjusted() + decimals + 2))
    rounded = exact.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP, context=ctx)
    return float(rounded) + 0.0  # + 0.0: -0.0 is stored as 0.0


def bound_problem(exam: ExaminationType, result: float) -> str | None:
    """Why a stored ``result`` lies outside the row's Min/Max, or None."""
    if exam.min is not None and result < exam.min:
        return (
            f"result {result:g} {exam.unit} is below the minimum {exam.min:g} for "
            f"examination type {exam.sc} ({exam.name})"
        )
    if exam.max is not None and result > exam.max:
        return (
            f"result {result:g} {exam.unit} is above the maximum {exam.max:g} for "
            f"examination type {exam.sc} ({exam.name})"
        )
    return None


# ----------------------------------------------------------------------------------------------
# Time (RFC 3339 section 5.6, seconds optional as in the document's example)

_MINUTE_US = 60_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_DATE_TIME = re.compile(
    r"(?P<Y>\d{4})-(?P<M>\d{2})-(?P<D>\d{2})[Tt ]"
    r"(?P<h>\d{2}):(?P<m>\d{2})(?::(?P<s>\d{2})(?:\.(?P<frac>\d+))?)?"
    r"(?:(?P<z>[Zz])|(?P<sign>[+-])(?P<oh>\d{2}):(?P<om>\d{2}))"
)


@dataclass(frozen=True, slots=True)
class SentTime:
    """A parsed ``measurementDateTime``: the instant (epoch microseconds), whether it had a
    second component, whether its offset is zero (UTC)."""

    epoch_us: int
    has_seconds: bool
    utc: bool

    @property
    def minute_ms(self) -> int:
        """The minute it names (epoch ms): its seconds dropped."""
        return self.epoch_us // _MINUTE_US * 60_000

    @property
    def nearest_minute_ms(self) -> int:
        """Rounded to the nearest minute, half a minute up (the update endpoint's key)."""
        return (self.epoch_us + _MINUTE_US // 2) // _MINUTE_US * 60_000


def read_time(text: str) -> SentTime:
    """Parse an RFC 3339 date-time, seconds optional. Raises ValueError."""
    m = _DATE_TIME.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not an RFC 3339 date-time")
    seconds = int(m.group("s") or 0)
    if seconds > 60:  # 60: a leap second (RFC 3339 5.7)
        raise ValueError(f"{text!r}: second {seconds}")
    offset_min = 0
    if m.group("z") is None:
        oh, om = int(m.group("oh")), int(m.group("om"))
        if oh > 23 or om > 59:
            raise ValueError(f"{text!r}: offset out of range")
        offset_min = (oh * 60 + om) * (1 if m.group("sign") == "+" else -1)
    local = datetime(
        int(m.group("Y")),
        int(m.group("M")),
        int(m.group("D")),
        int(m.group("h")),
        int(m.group("m")),
        tzinfo=UTC,
    )  # raises ValueError for a day, month, hour or minute that does not exist
    micro = int((m.group("frac") or "").ljust(6, "0")[:6])
    since = local - _EPOCH - timedelta(minutes=offset_min)
    epoch_us = (since.days * 86_400 + since.seconds + seconds) * 1_000_000 + micro
    return SentTime(epoch_us, m.group("s") is not None, offset_min == 0)


def minute_text(minute_ms: int) -> str:
    """The document's format, e.g. ``2023-09-21T14:34Z``, for the minute starting at
    ``minute_ms`` (epoch ms, UTC)."""
    t = _EPOCH + timedelta(milliseconds=minute_ms)
    return f"{t.year:04d}-{t.month:02d}-{t.day:02d}T{t.hour:02d}:{t.minute:02d}Z"
