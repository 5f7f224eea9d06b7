"""IntervalSet against a plain set of ints, on random operation sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.intervals import IntervalSet

ops = st.lists(
    st.tuples(st.sampled_from(["add", "remove"]), st.integers(0, 60), st.integers(0, 15)),
    max_size=40,
)


@settings(max_examples=300)
@given(ops)
def test_matches_a_plain_set(sequence: list[tuple[str, int, int]]) -> None:
    s = IntervalSet()
    ref: set[int] = set()
    for op, lo, width in sequence:
        hi = lo + width
        if op == "add":
            s.add(lo, hi)
            ref.update(range(lo, hi + 1))
        else:
            s.remove(lo, hi)
            ref.difference_update(range(lo, hi + 1))
        items = list(s)
        # sorted, disjoint, not even adjacent (merged)
        assert all(a <= b for a, b in items)
        assert all(items[i][1] + 1 < items[i + 1][0] for i in range(len(items) - 1))
    members = {x for a, b in s for x in range(a, b + 1)}
    assert members == ref
    for x in range(0, 80):
        assert (x in s) == (x in ref)
    gaps = {x for a, b in s.gaps(0, 80) for x in range(a, b + 1)}
    assert gaps == set(range(0, 81)) - ref
    expected_floor = -1
    while expected_floor + 1 in ref:
        expected_floor += 1
    assert s.floor == expected_floor
    assert IntervalSet.from_json(s.to_json()) == s
