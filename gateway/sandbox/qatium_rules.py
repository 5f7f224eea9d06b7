"""The Qatium Ingest API document's data rules: body parsing and per-row validation.

Pure functions, no I/O, used by :mod:`gateway.sandbox.qatium`. A body that cannot be read as
rows at all raises a 400 :class:`~gateway.sandbox.emulator.Reject`; a row that breaks a rule is
returned with its reasons so the emulator can quarantine it. The error texts follow the
document's one example (``value 'undefined' on column 'value' is not Float32``): the offending
value, then the column, and never a row number, since the document's job details give none.

Where the document is silent, these choices hold (also listed in qatium.py):

- metrics: the validation table's ``pressure flow level status`` plus the mapping table's
  ``setting demand``; ``setting`` takes any hydraulic-engine unit or no unit (pump relative
  speed has none), ``demand`` any hydraulic-engine unit or flow unit of the validation table;
- units are matched exactly (case matters: ``Ml/d`` is not ``ml/d``); "no unit" is ``""`` or
  ``"none"``;
- ``time`` must be ISO 8601 with a date, a ``T``, a time and an offset (``Z`` or ``+hh:mm``);
- ``value`` must be a JSON number (not a bool or string), finite and within Float32 range; in
  CSV a plain decimal with a dot;
- JSON rows must have exactly the five keys: a missing or an extra key quarantines the row;
  CSV files with a header may carry extra columns (the document's header shows a ``test``
  column), which are ignored.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from gateway.sandbox.emulator import Reject, parse_json

COLUMNS: tuple[str, ...] = ("time", "asset", "metric", "unit", "value")
"""The CSV column order of a file without header, as the document gives it."""

NO_UNIT = frozenset({"", "none"})

ENGINE_UNITS = frozenset(
    {"gpm", "cfs", "mgd", "imgd", "afd", "lps", "l/s", "lpm", "l/m", "mld", "cmh", "cmd"}
    | {"mwc", "psi", "ft", "m"}
)
"""The unit column's list: the units the hydraulic engine supports."""

_FLOW_UNITS = frozenset(
    {
        *("Ml/d", "cmd", "cmh", "l/m", "l/min", "l/s", "lpm", "lps", "m^3/d", "m^3/h", "mld"),
        *("Mgal/d", "Mgallon-imp/d", "acre ft/d", "afd", "cfs", "ft^3/s", "gal/min", "gpm"),
        *("imgd", "mgd"),
    }
)

UNITS_BY_METRIC: Mapping[str, frozenset[str]] = {
    # The document's validation table (SI and US-customary columns together).
    "pressure": frozenset({"m", "mca", "mwc", "psi"}),
    "flow": _FLOW_UNITS,
    "level": frozenset({"m", "m3", "m^3", "ft", "ft3", "ft^3"}),
    "status": NO_UNIT,
    # The mapping table's other metrics; the document gives them no unit rule of their own.
    "setting": ENGINE_UNITS | NO_UNIT,
    "demand": ENGINE_UNITS | _FLOW_UNITS,
}

METRICS: tuple[str, ...] = tuple(UNITS_BY_METRIC)

METRICS_BY_ASSET_TYPE: Mapping[str, frozenset[str]] = {
    # The document's mapping table: which metric may be sent for which kind of asset.
    "pipe": frozenset({"flow"}),
    "junction": frozenset({"pressure", "demand"}),
    "pump": frozenset({"status", "setting"}),
    "valve": frozenset({"status", "setting"}),
    "tank": frozenset({"level"}),
}

_FLOAT32_MAX = 3.4028234663852886e38
_CSV_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_ISO_WITH_ZONE = re.compile(r"\d{4}-?\d{2}-?\d{2}T.+(?:Z|[+-]\d{2}(?::?\d{2})?)")


@dataclass(frozen=True, slots=True)
class RowCheck:
    """A row as read from the body and what is wrong with it (empty ``errors``: valid)."""

    row: dict[str, object]
    errors: tuple[str, ...]


def _show(value: object) -> str:
    """How a value appears inside an error text: strings bare, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _check_time(value: object) -> str | None:
    bad = f"time '{_show(value)}' on column 'time' is not an ISO 8601 timestamp with timezone"
    if not isinstance(value, str) or not _ISO_WITH_ZONE.fullmatch(value):
        return bad
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return bad
    return None if parsed.tzinfo is not None else bad


def _check_value(value: object) -> str | None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or abs(value) > _FLOAT32_MAX
    ):
        return f"value '{_show(value)}' on column 'value' is not Float32"
    return None


def validate_row(
    row: Mapping[str, object], assets: Mapping[str, str] | None = None
) -> tuple[str, ...]:
    """Every rule ``row`` breaks, as error texts; ``()`` when it may be appended.

    ``assets`` (asset id -> pipe/junction/pump/valve/tank), when given, is the network: rows
    for other assets, or with a metric the mapping table does not allow for that asset type,
    are quarantined too.
    """
    errors = [f"column '{key}' is missing" for key in COLUMNS if key not in row]
    errors += [f"column '{key}' is not expected" for key in row if key not in COLUMNS]
    if "time" in row and (err := _check_time(row["time"])):
        errors.append(err)
    asset = row.get("asset")
    if "asset" in row and (not isinstance(asset, str) or not asset):
        errors.append(f"asset '{_show(asset)}' on column 'asset' is not a non-empty String")
    if "value" in row and (err := _check_value(row["value"])):
        errors.append(err)
    metric = row.get("metric")
    if "metric" not in row:
        return tuple(errors)
    if not isinstance(metric, str) or metric not in UNITS_BY_METRIC:
        errors.append(
            f"metric '{_show(metric)}' on column 'metric' is not one of {', '.join(METRICS)}"
        )
        return tuple(errors)
    unit = row.get("unit")
    if "unit" in row and (not isinstance(unit, str) or unit not in UNITS_BY_METRIC[metric]):
        errors.append(f"unit '{_show(unit)}' on column 'unit' is not valid for metric '{metric}'")
    value = row.get("value")
    if metric == "status" and not _check_value(value) and value not in (0, 1):
        errors.append(f"value '{_show(value)}' on column 'value' is not 0 or 1 for metric 'status'")
    if assets is not None and isinstance(asset, str) and asset:
        kind = assets.get(asset)
        if kind is None:
            errors.append(f"asset '{asset}' on column 'asset' is not in the network")
        elif metric not in METRICS_BY_ASSET_TYPE.get(kind, frozenset()):
            errors.append(
                f"metric '{metric}' on column 'metric' is not valid for asset '{asset}' ({kind})"
            )
    return tuple(errors)


def _require_some_complete(rows: list[dict[str, object]]) -> None:
    if not rows:
        raise Reject(400, "body holds no rows")
    if not any(all(key in row for key in COLUMNS) for row in rows):
        raise Reject(400, f"no row has all of the columns {', '.join(COLUMNS)}")


def rows_from_json(raw: bytes) -> list[dict[str, object]]:
    """The rows of a JSON body or file: an array of objects, else a 400 :class:`Reject`.

    Also 400: an empty array, and an array where no object has all five keys (the body does
    not follow the format at all; single incomplete rows are quarantined instead).
    """
    data = parse_json(raw)
    if not isinstance(data, list):
        raise Reject(400, f"body must be a JSON array of objects, not {type(data).__name__}")
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise Reject(400, f"array element {index} is not an object")
    rows: list[dict[str, object]] = data
    _require_some_complete(rows)
    return rows


def _csv_value(text: str) -> object:
    # The document wants a dot as decimal separator; anything else stays text and fails.
    stripped = text.strip()
    if not _CSV_NUMBER.fullmatch(stripped):
        return text
    number = float(stripped)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def rows_from_csv(raw: bytes) -> list[dict[str, object]]:
    """The rows of a CSV file, with or without a header line; 400 when unreadable.

    A first line naming ``time`` and ``value`` is a header: columns are then found by name
    (any order, case-insensitive) and unknown columns ignored. Without a header the columns
    are ``time, asset, metric, unit, value``; extra fields are ignored, missing ones leave
    the row without those keys (so it is quarantined).
    """
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise Reject(400, f"file is not UTF-8: {exc.reason}") from exc
    try:
        reader = csv.reader(io.StringIO(text))
        lines = [fields for fields in reader if any(f.strip() for f in fields)]
    except csv.Error as exc:
        raise Reject(400, f"file is not valid CSV: {exc}") from exc
    if not lines:
        raise Reject(400, "file holds no rows")
    names = [field.strip().lower() for field in lines[0]]
    if "time" in names and "value" in names:
        missing = [col for col in COLUMNS if col not in names]
        if missing:
            raise Reject(400, f"CSV header lacks the column(s) {', '.join(missing)}")
        positions = {col: names.index(col) for col in COLUMNS}
        lines = lines[1:]
    else:
        positions = {col: i for i, col in enumerate(COLUMNS)}
    rows: list[dict[str, object]] = []
    for fields in lines:
        row: dict[str, object] = {}
        for col, pos in positions.items():
            if pos < len(fields):
                row[col] = _csv_value(fields[pos]) if col == "value" else fields[pos]
        rows.append(row)
    _require_some_complete(rows)
    return rows


def check_rows(
    rows: list[dict[str, object]], assets: Mapping[str, str] | None = None
) -> list[RowCheck]:
    """Validate every row, keeping their order."""
    return [RowCheck(row, validate_row(row, assets)) for row in rows]
