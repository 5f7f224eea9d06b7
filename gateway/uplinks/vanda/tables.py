"""The Vanda Hydro API's tables and wire formats, shared by the uplink and its emulator.

Source: the service document (shared/seeds/004_eb17c629c85a279b.txt, "Hydro API" wiki page,
revision of Sep 17, 2024), sections "Mapping Between Examination, Parameter, and Unit",
"Mapping Between Examination and Reason" and "Add Measurements To a Station".

Readings of the document where it is ambiguous (repeated in :mod:`gateway.uplinks.vanda.uplink`):

* **Examination types**: the request section lists 21, 22, 24, 25 and 27 as valid; the mapping
  table (and the reason table) also has 28, 29, 30 and 31. All nine are built in: the tables are
  the more detailed and later text. ``probe_examination_types`` shows what the service says.
* **Thousands separators**: the water-level bounds read "-1.500" and "10.000" cm next to
  "-15"/"170" m for elevation; they are Danish thousands separators (-1500 cm .. 10000 cm, i.e.
  -15 m .. 100 m), not -1.5 cm .. 10 cm. A "-" bound means unbounded.
* **Reasons per examination type**: the document's reason table lost its columns (each row keeps
  only its count of "X" marks), so which examination type takes which reason cannot be read
  from it. Built in: every reason code 0-17 for every type; 18 ("Nyt fixpunkt") has no mark at
  all and is refused. The service's own list (``reasonCodesSc`` of
  ``GET /config/examination-types``) is authoritative and ``check-config --probe`` compares.
* **Rounding**: "result values are rounded to a number of decimals" without a rule. We round
  half away from zero on the shortest decimal text of the value (``2.25`` -> ``2.3``,
  ``2.675`` -> ``2.68``), which is what a person reading the value expects.
* **Time**: ``measurementDateTime`` is sent as ``YYYY-MM-DDTHH:MMZ`` ("without second
  component"), the reading's UTC time truncated to its minute (the same minute the shared
  downsampling's aligned windows start on), never rounded up into the next minute.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

#: At most this many measurements in one request ("Currently, there is a limit 1000").
MAX_MEASUREMENTS_PER_REQUEST = 1000

#: stancode list SC1188: reason codes and their names (the document's reason table).
REASON_CODES: Mapping[int, str] = {
    0: "Ej oplyst",
    1: "Migreret",
    2: "Ny skalapæl",
    3: "Kotekontrol",
    4: "Estimeret",
    5: "Måling",
    6: "Stangmåling",
    7: "Vademåling",
    8: "Dronebåd",
    9: "Opspænding",
    10: "Litermål",
    11: "Skønnet vandføring",
    12: "Section by section",
    13: "Rørmåling",
    14: "Flyder",
    15: "Fløjte",
    16: "Manometer",
    17: "Nedstik",
    18: "Nyt fixpunkt",
}
#: Reason codes the table marks for at least one examination type (see module docstring).
USABLE_REASON_CODES: frozenset[int] = frozenset(range(18))


@dataclass(frozen=True, slots=True)
class ExaminationType:
    """One row of the examination/parameter/unit table (SC1101 / SC1008 / SC1009)."""

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
    reason_codes: frozenset[int] = field(default=USABLE_REASON_CODES)

    def to_json(self) -> dict[str, Any]:
        """The shape of one entry of ``GET /config/examination-types``."""
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


_LEVEL, _FLOW = (1233, "Water Level"), (1155, "Water Flow")
_M, _CM, _LS = (63, "m"), (19, "cm"), (55, "l/sek")
_Row = tuple[int, str, tuple[int, str], tuple[int, str], float | None, float | None, int, int]

#: The document's table, row for row. Bounds in the examination type's unit.
_ROWS: list[_Row] = [
    # SC1101, examination type, parameter, unit, min, max, decimals, minimum interval (minutes)
    (21, "Elevation Level", (439, "(unnamed in the document)"), _M, -15, 170, 1, 5),
    (22, "Scale Pole Level", _LEVEL, _CM, -1500, 10000, 1, 5),
    (24, "Measured Water Flow", _FLOW, _LS, None, None, 1, 5),
    (25, "Water Level", _LEVEL, _CM, -1500, 10000, 1, 5),
    (27, "Water Flow", _FLOW, _LS, None, None, 1, 5),
    (28, "Oxygen", (50, "Oxygen"), (1, "mg/l"), 0, None, 1, 60),
    (29, "Temperature", (1154, "Temperature"), (29, "Grader C"), -20, 50, 1, 60),
    (30, "Groundwater Level Field Measurement", _LEVEL, _M, -5, 150, 3, 5),
    (31, "Groundwater Level", _LEVEL, _M, -5, 150, 3, 5),
]
EXAMINATION_TYPES: Mapping[int, ExaminationType] = {
    sc: ExaminationType(sc, name, par[0], par[1], unit[0], unit[1], lo, hi, dec, interval)
    for sc, name, par, unit, lo, hi, dec, interval in _ROWS
}


# ``errorCode`` of a ``failed`` item: the document names the field but lists no codes. The
# uplink only copies whatever code the service sends into dead-letter reasons; the emulator's
# numbering is its own (gateway.sandbox.vanda_tables.ErrorCode).


# ----------------------------------------------------------------------------------------------
# Values


def round_result(value: float, decimals: int) -> float:
    """``value`` rounded half away from zero to ``decimals`` places (see module docstring).

    Raises ValueError for NaN and infinities.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    try:
        exact = Decimal(repr(value)) if isinstance(value, float) else Decimal(int(value))
        rounded = exact.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
    except InvalidOperation as exc:  # more digits than the context holds: astronomically large
        raise ValueError(f"{value!r} cannot be rounded to {decimals} decimals") from exc
    return float(rounded) + 0.0  # + 0.0 turns -0.0 into 0.0


def range_problem(exam: ExaminationType, result: float) -> str | None:
    """Why ``result`` (already rounded) is outside the examination type's bounds, or None."""
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
# Time

MINUTE_MS = 60_000


def minute_of(ts_ms: int) -> int:
    """The start (epoch ms) of the UTC minute holding ``ts_ms``."""
    return ts_ms - ts_ms % MINUTE_MS


def format_minute(ts_ms: int) -> str:
    """``2023-09-21T14:34Z``: the minute holding ``ts_ms`` (UTC), RFC 3339 without seconds."""
    dt = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=minute_of(ts_ms))
    return dt.strftime("%Y-%m-%dT%H:%MZ")


_RFC3339 = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt ](?P<hm>\d{2}:\d{2})(?P<sec>:\d{2}(?:\.\d+)?)?"
    r"(?P<tz>[Zz]|[+-]\d{2}:\d{2})$"
)


@dataclass(frozen=True, slots=True)
class MeasurementTime:
    """A parsed ``measurementDateTime``: the instant, whether it had seconds, whether UTC."""

    epoch_ms: int
    has_seconds: bool
    utc: bool

    @property
    def minute(self) -> int:
        return minute_of(self.epoch_ms)

    @property
    def nearest_minute(self) -> int:
        """Rounded to the nearest minute (how the update endpoint identifies a measurement)."""
        return minute_of(self.epoch_ms + MINUTE_MS // 2)


def parse_time(text: str) -> MeasurementTime:
    """Parse an RFC 3339 date+time with or without seconds. Raises ValueError."""
    m = _RFC3339.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not an RFC 3339 date and time")
    tz = m.group("tz").upper()
    sec = m.group("sec") or ""
    iso = f"{m.group('date')}T{m.group('hm')}{sec or ':00'}{'+00:00' if tz == 'Z' else tz}"
    dt = datetime.fromisoformat(iso)
    epoch_ms = round(dt.timestamp() * 1000)
    return MeasurementTime(epoch_ms, bool(sec), tz in ("Z", "+00:00"))


# ----------------------------------------------------------------------------------------------
# The machine-readable table (GET /config/examination-types)


def parse_examination_types(data: object) -> dict[int, ExaminationType]:
    """Read the service's table (a JSON list of :meth:`ExaminationType.to_json` entries).

    Raises ValueError naming what is missing or malformed.
    """
    if not isinstance(data, list):
        raise ValueError("examination types: expected a JSON list")
    out: dict[int, ExaminationType] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"examination types[{i}]: expected an object")
        try:
            sc = int(entry["examinationTypeSc"])
            builtin = EXAMINATION_TYPES.get(sc)
            out[sc] = ExaminationType(
                sc=sc,
                name=str(entry.get("name") or (builtin.name if builtin else f"type {sc}")),
                parameter_sc=int(entry["parameterSc"]),
                parameter=builtin.parameter if builtin else "",
                unit_sc=int(entry["unitSc"]),
                unit=builtin.unit if builtin else "",
                min=_bound(entry.get("min")),
                max=_bound(entry.get("max")),
                decimals=int(entry["decimals"]),
                interval_min=int(entry["measurementIntervalMin"]),
                reason_codes=frozenset(int(c) for c in entry["reasonCodesSc"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"examination types[{i}]: missing or malformed {exc}") from None
    return out


def _bound(v: object) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(f"bound {v!r}")
    return float(v)


def compare_tables(
    builtin: Mapping[int, ExaminationType], service: Mapping[int, ExaminationType]
) -> list[str]:
    """One line per difference between the built-in table and the service's, sorted by type."""
    lines: list[str] = []
    for sc in sorted(set(builtin) | set(service)):
        ours, theirs = builtin.get(sc), service.get(sc)
        if theirs is None:
            lines.append(f"examination type {sc}: built in, but not offered by the service")
            continue
        if ours is None:
            lines.append(f"examination type {sc}: offered by the service, not built in")
            continue
        for attr, label in (
            ("parameter_sc", "parameterSc"),
            ("unit_sc", "unitSc"),
            ("min", "min"),
            ("max", "max"),
            ("decimals", "decimals"),
            ("interval_min", "measurementIntervalMin"),
        ):
            a, b = getattr(ours, attr), getattr(theirs, attr)
            if a != b:
                lines.append(
                    f"examination type {sc}: {label} is {_show(b)} at the service, "
                    f"{_show(a)} built in"
                )
        # The built-in reason lists are a placeholder (the document's table lost its columns):
        # a narrower list at the service is expected and shown per route by the probe instead.
        extra = theirs.reason_codes - ours.reason_codes
        if extra or ours.reason_codes not in (USABLE_REASON_CODES, theirs.reason_codes):
            lines.append(
                f"examination type {sc}: reasonCodesSc at the service "
                f"{sorted(theirs.reason_codes)}, built in {sorted(ours.reason_codes)}"
            )
    return lines


def _show(v: object) -> str:
    if v is None:
        return "unbounded"
    return f"{v:g}" if isinstance(v, float) else str(v)
