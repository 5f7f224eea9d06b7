"""Salvage: copy every row that still reads out of a corrupt database (moved aside by
:func:`gateway.store.files._move_aside`) into a fresh one, keeping ids, so every uplink's cursor
stays true for what was copied. Runs in a thread at open, before the store connects.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.intervals import IntervalSet
from gateway.store.schema import _SCHEMA, SCHEMA_VERSION


@dataclass(slots=True)
class Salvage:
    """What :func:`_salvage` could copy out of a corrupt file."""

    readings: int = 0
    lost: IntervalSet = field(default_factory=IntervalSet)
    rows: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def lost_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.lost)

    def summary(self) -> str:
        text = f"{self.readings} readings salvaged"
        if self.lost:
            ranges = ", ".join(f"{lo}-{hi}" for lo, hi in list(self.lost)[:10])
            text += f"; {self.lost_count} ids unreadable ({ranges})"
        return "; ".join([text, *self.notes])


#: (table, key column, columns) copied by _salvage; keys are kept, so every uplink's cursor (its
#: done set of reading ids) stays true for the copied readings.
_SALVAGE_TABLES = (
    ("series", "id", "id, name"),
    ("uplinks", "rowid", "name, done, live_mark, delivered, rejected, evicted, state"),
    ("meta", "rowid", "key, value"),
    ("dead_letters", "id", "id, uplink, series, ts, value, flags, lat, lon, alt, reason, at"),
    ("retry", "id", "id, uplink, series, ts, value, flags, lat, lon, alt"),
    ("readings", "id", "id, series, ts, value, flags, lat, lon, alt"),
)


def _salvage(src: Path, dst: Path, uplinks: Iterable[str]) -> Salvage:
    """:func:`_salvage_into`, or, when the copy itself fails (a full disk), no partial file: a
    fresh store is better than none, and the file aside keeps what could not be copied."""
    try:
        return _salvage_into(src, dst, uplinks)
    except (sqlite3.Error, OSError) as exc:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{dst}{suffix}").unlink(missing_ok=True)
        return Salvage(notes=[f"salvage failed: {type(exc).__name__}: {exc}"])


def _salvage_into(src: Path, dst: Path, uplinks: Iterable[str]) -> Salvage:
    """Copy every row that can still be read from the corrupt database ``src`` (moved aside)
    into a fresh database at ``dst``, keeping ids. Runs in a thread at open, before the store
    connects. Unreadable stretches are found by halving the id range until single rows; their
    ids are reported as lost. An uplink whose cursor row is unreadable starts over from the
    first salvaged reading: duplicates rather than loss."""
    out = Salvage()
    old = _open_damaged(src)
    if isinstance(old, str):
        out.notes.append(f"nothing readable: {old}")
        return out
    new = sqlite3.connect(dst, isolation_level=None)
    try:
        new.execute("PRAGMA journal_mode = WAL")
        new.executescript(_SCHEMA)
        new.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        new.execute("BEGIN")
        for table, key, cols in _SALVAGE_TABLES:
            marks = ",".join("?" * len(cols.split(",")))
            insert = f"INSERT OR IGNORE INTO {table} ({cols}) VALUES ({marks})"
            bounds = _key_bounds(old, table, key)
            if table == "readings":
                # An end of the table that does not read (a file cut short): look as far as
                # the ids the cursors knew of.
                top = _known_top(new)
                if bounds is None:
                    bounds = (1, top)
                elif top is not None and bounds[1] is not None:
                    bounds = (bounds[0], max(bounds[1], top))
            if bounds is None or (bounds[0] is None) != (bounds[1] is None):
                out.notes.append(f"table {table} unreadable")
                continue
            lo, hi = bounds
            copied = 0
            if lo is not None and hi is not None:
                select = f"SELECT {cols} FROM {table} WHERE {key} BETWEEN ? AND ?"
                for rows in _read_ranges(
                    old, select, lo, hi, out.lost if table == "readings" else None
                ):
                    new.executemany(insert, rows)
                    copied += len(rows)
            out.rows[table] = copied
        out.readings = out.rows.get("readings", 0)
        have = {r[0] for r in new.execute("SELECT name FROM uplinks")}
        fresh = IntervalSet().to_json()
        for name in uplinks:
            if name not in have:
                new.execute(
                    "INSERT INTO uplinks (name, done, live_mark) VALUES (?, ?, 0)", (name, fresh)
                )
                out.notes.append(f"cursor of uplink {name} unreadable: it resends what is kept")
        new.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clean', 0)")
        new.execute("COMMIT")
    finally:
        new.close()
        old.close()
    return out


def _open_damaged(src: Path) -> sqlite3.Connection | str:
    """A read-only connection to a damaged database, or why there is none. With its WAL first
    (committed transactions may live only there); else the main file alone (``immutable``),
    which reads where a damaged WAL index or a short file stops the normal way. The schema is
    read leniently (``writable_schema``) so one bad root page does not hide the other tables."""
    why = ""
    for uri in (f"file:{src}?mode=ro", f"file:{src}?immutable=1"):
        conn = sqlite3.connect(uri, uri=True, timeout=10)
        try:
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute("SELECT count(*) FROM series").fetchone()
            return conn
        except sqlite3.Error as exc:
            why = str(exc)
            conn.close()
    return why


def _key_bounds(
    conn: sqlite3.Connection, table: str, key: str
) -> tuple[int | None, int | None] | None:
    """The lowest and highest key of ``table`` that can be read ((None, None): empty; None:
    nothing reads). A corrupt page fails ``min()``/``max()`` when they descend through it; a
    scan from each end reads up to it."""
    try:
        lo, hi = conn.execute(f"SELECT min({key}), max({key}) FROM {table}").fetchone()
        return lo, hi
    except sqlite3.DatabaseError:
        pass
    ends: list[int | None] = []
    for order in ("ASC", "DESC"):
        found = None
        try:
            for (k,) in conn.execute(f"SELECT {key} FROM {table} ORDER BY {key} {order}"):
                found = k
                break
        except sqlite3.DatabaseError:
            pass
        ends.append(found)
    if ends[0] is not None and ends[1] is None:
        # The far end does not read (a file cut short): walk forward as far as keys read.
        last = ends[0]
        with contextlib.suppress(sqlite3.DatabaseError):
            while rows := conn.execute(
                f"SELECT {key} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT 4096", (last,)
            ).fetchall():
                last = rows[-1][0]
        ends[1] = last
    if ends[0] is None and ends[1] is None:
        return None
    return ends[0] if ends[0] is not None else ends[1], ends[1] if ends[1] is not None else ends[0]


def _known_top(conn: sqlite3.Connection) -> int | None:
    """The highest reading id the salvaged cursors knew of."""
    top = 0
    for done, live in conn.execute("SELECT done, live_mark FROM uplinks"):
        with contextlib.suppress(ValueError, TypeError):
            top = max(top, live, *(hi for _, hi in IntervalSet.from_json(done)))
    return top or None


def _read_ranges(
    conn: sqlite3.Connection, select: str, lo: int, hi: int, lost: IntervalSet | None
) -> Iterator[list[Any]]:
    """Rows of ``select`` over keys ``lo..hi`` in chunks, halving a range that fails to read
    down to single keys; keys that cannot be read are added to ``lost``."""
    todo = [(a, min(a + 4095, hi)) for a in range(lo, hi + 1, 4096)]
    todo.reverse()
    while todo:
        a, b = todo.pop()
        try:
            rows = conn.execute(select, (a, b)).fetchall()
        except sqlite3.DatabaseError:
            if a == b:
                if lost is not None:
                    lost.add(a, a)
                continue
            mid = (a + b) // 2
            todo.append((mid + 1, b))
            todo.append((a, mid))
            continue
        if rows:
            yield rows
