"""Every value a source can produce is stored exactly, and one value SQLite cannot take never
stops the writer (issue 12): uint64 counters at or above 2**63, non-finite floats, bools, text;
a reading with an unbindable value is rejected with its reason while its batch commits; an
insert that did not insert is an error, never counted as captured."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.configbase import StoreConfig
from gateway.errors import StoreError, StoreUnusable
from gateway.models import Reading, Value
from gateway.sources.modbus.decode import (
    DATA_TYPES,
    ORDERS,
    FieldSpec,
    decode_raw,
    make_decoder,
    register_count,
)
from gateway.store import Store


def now_ms() -> int:
    return int(time.time() * 1000)


def same(a: Value, b: Value) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


async def round_trip(path: Path, values: list[Value]) -> list[Value]:
    """Ingest one reading per value through a running store, then lease them back."""
    store = await Store.open(StoreConfig(path=path, commit_interval_ms=5), {"a": ["s"]})
    task = asyncio.create_task(store.run(), name="store:writer")
    try:
        t = now_ms()
        await store.ingest([Reading("s", t + i, v) for i, v in enumerate(values)], durable=True)
        assert store.rejected_total == 0
        out: list[Value] = []
        while (lease := await store.lease("a", 10_000, live_first=False)) and lease.items:
            out.extend(i.value for i in lease.items)
            await store.complete(lease, [i.id for i in lease.items], {})
        return out
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.aclose()


#: One register field of every decodable type and byte order, with random wire bytes.
fields = st.tuples(
    st.sampled_from([d for d in DATA_TYPES if d not in ("bit",)]),
    st.sampled_from(ORDERS),
).flatmap(
    lambda to: st.tuples(
        st.just(to[0]),
        st.just(to[1]),
        st.binary(min_size=2 * register_count(to[0], 8), max_size=2 * register_count(to[0], 8)),
    )
)


@settings(max_examples=60, deadline=None)
@given(st.lists(fields, min_size=1, max_size=40))
def test_every_value_a_modbus_decoder_yields_is_stored_exactly(
    tmp_path_factory: pytest.TempPathFactory, cases: list[tuple[str, str, bytes]]
) -> None:
    values: list[Value] = []
    for dtype, order, data in cases:
        spec = FieldSpec(
            "s",
            "holding",
            0,
            dtype,
            order=order,  # type: ignore[arg-type]
            length=8 if dtype == "string" else None,
        )
        raw = decode_raw(spec.dtype, data, spec.order)
        assert same(make_decoder(spec)(data, 0), raw)
        values.append(raw)
    got = asyncio.run(round_trip(tmp_path_factory.mktemp("v") / "q.db", values))
    assert len(got) == len(values)
    assert all(same(a, b) for a, b in zip(values, got, strict=True)), (values, got)


@pytest.mark.parametrize(
    "value",
    [2**63, 0xFEDCBA9876543210, 2**64 - 1, -(2**63), 2**63 - 1, 10**30, -(10**30)],
)
def test_integers_beyond_sqlite_64_bits_round_trip(tmp_path: Path, value: int) -> None:
    got = asyncio.run(round_trip(tmp_path / "q.db", [value, 1, value]))
    assert got == [value, 1, value]
    assert all(type(v) is int for v in got)


async def test_a_value_sqlite_cannot_bind_is_rejected_and_the_batch_commits(
    tmp_path: Path,
) -> None:
    cfg = StoreConfig(path=tmp_path / "q.db", commit_interval_ms=5)
    store = await Store.open(cfg, {"a": ["s"]})
    task = asyncio.create_task(store.run(), name="store:writer")
    try:
        t = now_ms()
        batch = [
            Reading("s", t, 1.0),
            Reading("s", t + 1, "bad \udcff byte"),  # a lone surrogate: not UTF-8, cannot bind
            Reading("s", t + 2, 0xFEDCBA9876543210),
            Reading("s", t + 3, 4.0),
        ]
        await store.ingest(batch, durable=True)
        assert store.rejected_total == 1
        assert store.stats()["rejected_total"] == 1
        (reason,) = store.stats()["rejected_reasons"]
        assert reason == "cannot be stored"
        assert any(e["kind"] == "rejected" for e in store.stats()["events"])
        assert store.captured_total == 3
        assert store.uplink_stats("a")["backlog"] == 3
        # The writer lives on: the next batch commits as usual.
        await store.ingest([Reading("s", t + 4, 5)], durable=True)
        lease = await store.lease("a", 100, live_first=False)
        assert lease is not None
        assert [i.value for i in lease.items] == [1.0, 0xFEDCBA9876543210, 4.0, 5]
        assert store.last_commit_error is None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.aclose()


async def test_an_insert_that_collides_is_an_error_and_never_counted(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = await Store.open(StoreConfig(path=path), {"a": ["s"]})
    t = now_ms()
    # Something else writes the id this store will hand out next (a second writer would).
    with sqlite3.connect(path) as raw:
        raw.execute(
            "INSERT INTO readings (id, series, ts, value) VALUES (?, 1, 5, 'theirs')",
            (store.next_id(),),
        )
    await store.ingest([Reading("s", t, 1.0), Reading("s", t + 1, 2.0)])
    with pytest.raises(StoreError, match="already hold other readings"):
        await store.aclose()  # commits what is buffered: the collision surfaces here
    assert store.captured_total == 0
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT value FROM readings").fetchall() == [("theirs",)]


async def test_a_commit_repeated_after_cancellation_is_not_a_collision(tmp_path: Path) -> None:
    """The one legitimate re-insert: the same rows, committed once already."""
    path = tmp_path / "q.db"
    store = await Store.open(StoreConfig(path=path), {"a": ["s"]})
    t = now_ms()
    first = store.next_id()
    with sqlite3.connect(path) as raw:  # as if our own COMMIT had landed before a cancellation
        raw.execute(
            "INSERT INTO readings (id, series, ts, value) VALUES (?, 1, ?, 1.0)", (first, t)
        )
    await store.ingest([Reading("s", t, 1.0), Reading("s", t + 1, 2.0)])
    await store.aclose()
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT id, value FROM readings ORDER BY id").fetchall() == [
            (first, 1.0),
            (first + 1, 2.0),
        ]


def test_an_unusable_reserve_file_names_its_own_cause(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    Path(f"{path}.reserve").mkdir()  # cannot be written as a file
    with pytest.raises(StoreUnusable) as info:
        asyncio.run(Store.open(StoreConfig(path=path), {"a": ["s"]}))
    assert f"{path}.reserve" in str(info.value)
    assert "directory" in str(info.value).lower()
    assert list(tmp_path.glob("q.db.corrupt-*")) == []
