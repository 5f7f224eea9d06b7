"""Energydata.dk MQTT messages built from readings (pure): topics, payloads, wire values,
merged results."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, groupby
from operator import attrgetter, itemgetter

from gateway.models import StoredReading, Value
from gateway.routes import RouteTable
from gateway.uplinks.base import Failure, Outcome, SendResult
from gateway.uplinks.energydata.config import (
    MULTI_MAX_VALUES,
    Datatype,
    EnergydataDataset,
    EnergydataRoute,
    WireTable,
    wire_table,
)

pass


# ----------------------------------------------------------------------------------------------
# Messages


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publish and the readings it carries (delivered together on its PUBACK)."""

    topic: str
    payload: bytes
    ids: tuple[int, ...]


def wire_value(value: Value, datatype: Datatype) -> int | float | str:
    """The JSON value for a datastream of ``datatype`` (call :func:`value_problem` first)."""
    if datatype == "string":
        if isinstance(value, str):
            return value
        return json.dumps(value)  # true/false, 12, 1.5
    if isinstance(value, bool):
        return int(value)
    if datatype == "integer" and isinstance(value, float):
        return int(value)
    assert not isinstance(value, str)
    return value


def value_problem(value: Value | None, datatype: Datatype) -> str | None:
    """Why ``value`` cannot go to a datastream of ``datatype``, or None."""
    if value is None:
        return "missing value"
    if isinstance(value, float) and not math.isfinite(value):
        return f"value {value!r} is not a finite number"
    if datatype == "string":
        return None
    if isinstance(value, str):
        return f"datastream type is {datatype}, got text {value[:40]!r}"
    if datatype == "integer" and isinstance(value, float) and not value.is_integer():
        return f"datastream type is integer, got {value!r}"
    return None


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _payload(ts: int, value: object) -> bytes:
    return _JSON.encode({"timestamp": ts, "value": value}).encode()


def _group_message(
    prefix: str, ts: int, suffixes: list[str], values: list[int | float | str], ids: list[int]
) -> Message:
    """One message of a dataset's readings sharing ``ts`` (distinct suffixes)."""
    if len(ids) == 1:
        # One value: the single-value form on the datastream's own topic.
        return Message(f"{prefix}/{suffixes[0]}", _payload(ts, values[0]), (ids[0],))
    return Message(prefix, _payload(ts, dict(zip(suffixes, values, strict=True))), tuple(ids))


def build_messages(
    batch: Sequence[StoredReading],
    routes: Mapping[str, EnergydataRoute] | RouteTable[EnergydataRoute],
    datasets: Mapping[str, EnergydataDataset],
    wire: WireTable | None = None,
    max_values: int = MULTI_MAX_VALUES,
) -> list[Message]:
    """The messages for ``batch`` in the order of their first reading (see module docstring).

    Every reading of ``batch`` is in exactly one message. Routes must exist for every series.
    ``wire`` is :func:`wire_table` of ``routes`` and ``datasets``, if the caller keeps one.
    """
    if wire is None:
        wire = wire_table(routes, datasets)
    fast = _build_columns(batch, wire, max_values)
    return fast if fast is not None else _build_loop(batch, wire, max_values)


def _build_loop(batch: Sequence[StoredReading], wire: WireTable, max_values: int) -> list[Message]:
    """:func:`build_messages` reading by reading: any batch."""
    singles: list[tuple[int, Message]] = []
    # Per (prefix, timestamp): the suffixes, values and ids of its readings, in batch order.
    groups: dict[tuple[str, int], tuple[list[str], list[int | float | str], list[int]]] = {}
    first: dict[tuple[str, int], int] = {}
    last: tuple[str, int] | None = None
    unused: tuple[list[str], list[int | float | str], list[int]] = ([], [], [])
    add_suffix, add_value, add_id = unused[0].append, unused[1].append, unused[2].append
    for pos, r in enumerate(batch):
        prefix, single, suffix, datatype, _ = wire[r.series]
        value = r.value
        kind = type(value)
        # Ints go as they are to any numeric datastream, floats to a double one; the rest (bools,
        # text, floats for integer datastreams, anything for string ones) is converted.
        if not ((kind is int and datatype != "string") or (kind is float and datatype == "double")):
            value = wire_value(value, datatype)
        ts = r.ts
        if single:
            singles.append((pos, Message(f"{prefix}/{suffix}", _payload(ts, value), (r.id,))))
            continue
        if last is None or ts != last[1] or prefix != last[0]:
            # A poll's readings come together: the group changes rarely within a batch.
            last = (prefix, ts)
            group = groups.get(last)
            if group is None:
                group = groups[last] = ([], [], [])
                first[last] = pos
            add_suffix, add_value, add_id = group[0].append, group[1].append, group[2].append
        add_suffix(suffix)
        add_value(value)
        add_id(r.id)
    out = singles
    for key, (suffixes, values, ids) in groups.items():
        prefix, ts = key
        at = first[key]
        if len(set(suffixes)) == len(suffixes):
            # No suffix twice (the usual case): consecutive slices of max_values.
            for lo in range(0, len(ids), max_values):
                hi = lo + max_values
                out.append(
                    (at, _group_message(prefix, ts, suffixes[lo:hi], values[lo:hi], ids[lo:hi]))
                )
            continue
        pending = list(zip(suffixes, values, ids, strict=True))
        while pending:
            taken: dict[str, int | float | str] = {}
            taken_ids: list[int] = []
            later: list[tuple[str, int | float | str, int]] = []
            for suffix, value, rid in pending:
                if suffix in taken or len(taken) >= max_values:
                    later.append((suffix, value, rid))
                    continue
                taken[suffix] = value
                taken_ids.append(rid)
            out.append(
                (at, _group_message(prefix, ts, list(taken), list(taken.values()), taken_ids))
            )
            pending = later
    out.sort(key=lambda pm: pm[0])  # stable: a group's messages keep their order
    return [m for _, m in out]


_SERIES = attrgetter("series")
_TS = attrgetter("ts")
_VALUE = attrgetter("value")
_ID = attrgetter("id")
_PREFIX, _SINGLE, _SUFFIX, _DATATYPE = (itemgetter(i) for i in range(4))


def _build_columns(
    batch: Sequence[StoredReading], wire: WireTable, max_values: int
) -> list[Message] | None:
    """:func:`build_messages` column by column for the usual batch: every value an int, every
    datastream numeric and in a multi-value dataset, and each (prefix, timestamp) group without
    a suffix twice. The same messages in the same order; None for any other batch (the loop
    then handles it)."""
    if not batch:
        return None
    values = list(map(_VALUE, batch))
    if set(map(type, values)) != {int}:
        return None
    entries = list(map(wire.__getitem__, map(_SERIES, batch)))
    if any(map(_SINGLE, entries)) or "string" in set(map(_DATATYPE, entries)):
        return None
    suffixes = list(map(_SUFFIX, entries))
    ids = list(map(_ID, batch))
    # Runs of one (prefix, timestamp): a poll's readings come together. A group may come back
    # later in the batch; its runs are joined in batch order.
    groups: dict[tuple[str, int], list[tuple[int, int]]] = {}
    lo = 0
    for key, run in groupby(zip(map(_PREFIX, entries), map(_TS, batch), strict=True)):
        hi = lo + len(list(run))
        groups.setdefault(key, []).append((lo, hi))
        lo = hi
    out: list[Message] = []
    for (prefix, ts), runs in groups.items():
        if len(runs) == 1:
            ((a, b),) = runs
            g_suffixes, g_values, g_ids = suffixes[a:b], values[a:b], ids[a:b]
        else:
            g_suffixes = list(chain.from_iterable(suffixes[a:b] for a, b in runs))
            g_values = list(chain.from_iterable(values[a:b] for a, b in runs))
            g_ids = list(chain.from_iterable(ids[a:b] for a, b in runs))
        if len(set(g_suffixes)) != len(g_suffixes):
            return None
        for i in range(0, len(g_ids), max_values):
            j = i + max_values
            out.append(_group_message(prefix, ts, g_suffixes[i:j], g_values[i:j], g_ids[i:j]))
    return out


# ----------------------------------------------------------------------------------------------
# The plugin


_SEVERITY = {Outcome.AUTH: 0, Outcome.TRANSIENT: 1, Outcome.TOO_LARGE: 2, Outcome.REJECTED: 3}


def merge_results(results: Sequence[SendResult]) -> SendResult:
    """One result from the MQTT part and the import part of a batch.

    The remaining items share one failure, the most conservative one: auth keeps everything and
    pauses, transient keeps everything; only when nothing worse happened does too-large split or
    an unidentified rejection bisect.
    """
    delivered: list[int] = []
    rejected: dict[int, str] = {}
    failures: list[Failure] = []
    for r in results:
        delivered.extend(r.delivered)
        rejected.update(r.rejected)
        if r.failure is not None:
            failures.append(r.failure)
    # Between two transient failures, one the service answered (the long schedule) wins over
    # one that did not reach it.
    failure = (
        min(failures, key=lambda f: (_SEVERITY.get(f.outcome, 1), f.unreachable))
        if failures
        else None
    )
    return SendResult(delivered=delivered, rejected=rejected, failure=failure)
