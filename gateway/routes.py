"""Route lookup by series, shared by the store and the uplinks: exact names and series patterns.

A route's ``series`` is a series name, or a **pattern** when it holds a ``*``: each ``*`` matches
any run of characters (none included), everything else matches itself. ``u*.r*`` covers
``u1.r0`` ... ``u200.r124``: one route entry instead of one per series, as a Telegraf
``namepass`` glob or the ThingsBoard gateway's range datapoint would. The text each ``*`` matched
is a **capture**; a plugin that allows templates in its identifiers (Energydata's ``suffix``)
fills ``{1}``, ``{2}``... with them and ``{series}`` with the whole name (:func:`fill`).

Precedence, so that one series never has two routes: an exact route wins over every pattern;
among patterns the first in the file wins. Only the configured routes are kept; what a pattern
yields for a series is computed when that series is first seen, never for every possible name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Generic, Protocol, TypeVar

WILDCARD = "*"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


class _HasSeries(Protocol):
    @property
    def series(self) -> str: ...


R = TypeVar("R", bound=_HasSeries)


def is_pattern(series: str) -> bool:
    return WILDCARD in series


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression of a series pattern: one lazy group per ``*``, anchored."""
    parts = [re.escape(p) for p in pattern.split(WILDCARD)]
    return re.compile("(.*?)".join(parts) + r"\Z", re.DOTALL)


def template_problem(template: str, pattern: str) -> str | None:
    """Why ``template`` cannot be filled for series matching ``pattern``, or None.

    Placeholders are ``{series}`` and ``{1}`` .. ``{n}`` for a pattern with n ``*``; a template
    of an exact route takes none.
    """
    stars = pattern.count(WILDCARD)
    names = _PLACEHOLDER.findall(template)
    if names and not stars:
        return (
            f"placeholder {{{names[0]}}} in the route of one series (placeholders need "
            "a * in series)"
        )
    for name in names:
        if name == "series" or (name.isdigit() and 1 <= int(name) <= stars):
            continue
        known = ", ".join(["{series}", *(f"{{{i}}}" for i in range(1, stars + 1))])
        return f"unknown placeholder {{{name}}} (this route knows {known})"
    if "{" in _PLACEHOLDER.sub("", template) or "}" in _PLACEHOLDER.sub("", template):
        return "unbalanced { or } (placeholders are {series}, {1}, {2}, ...)"
    return None


def fill(template: str, series: str, captures: Sequence[str]) -> str:
    """``template`` with ``{series}`` and ``{1}``.. filled (see :func:`template_problem`)."""
    if "{" not in template:
        return template

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        return series if name == "series" else captures[int(name) - 1]

    return _PLACEHOLDER.sub(one, template)


def sample(template: str, pattern: str) -> str:
    """``template`` filled with a plain stand-in per placeholder (to check its shape)."""
    return fill(template, "x", ["x"] * pattern.count(WILDCARD))


class RouteTable(Mapping[str, R], Generic[R]):
    """The routes of one uplink, looked up by series (see the module docstring).

    As a mapping its keys are the configured ``series`` (names and patterns); looking up any
    series name finds the route that takes it.
    """

    def __init__(self, routes: Iterable[R]) -> None:
        self.routes: list[R] = list(routes)
        self.exact: dict[str, R] = {}
        self.patterns: list[tuple[re.Pattern[str], R]] = []
        for r in self.routes:
            if is_pattern(r.series):
                self.patterns.append((compile_pattern(r.series), r))
            else:
                self.exact.setdefault(r.series, r)

    def match(self, series: str) -> tuple[R, tuple[str, ...]] | None:
        """The route of ``series`` and what its ``*`` matched (empty for an exact route)."""
        r = self.exact.get(series)
        if r is not None:
            return r, ()
        for rx, route in self.patterns:
            m = rx.match(series)
            if m is not None:
                return route, m.groups()
        return None

    def __getitem__(self, series: str) -> R:
        m = self.match(series)
        if m is None:
            raise KeyError(series)
        return m[0]

    def __contains__(self, series: object) -> bool:
        return isinstance(series, str) and self.match(series) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(r.series for r in self.routes))

    def __len__(self) -> int:
        return len(self.routes)


class SeriesFilter:
    """Which series an uplink takes: exact names and patterns (the store's routing)."""

    def __init__(self, series: Iterable[str]) -> None:
        self.names: set[str] = set()
        self.patterns: list[re.Pattern[str]] = []
        for s in series:
            if is_pattern(s):
                self.patterns.append(compile_pattern(s))
            else:
                self.names.add(s)

    def __call__(self, series: str) -> bool:
        return series in self.names or any(p.match(series) for p in self.patterns)

    def select(self, known: dict[str, int]) -> set[int]:
        """The ids of the ``known`` series (name -> id) this filter takes."""
        if not self.patterns:
            return {known[s] for s in self.names if s in known}
        return {sid for name, sid in known.items() if self(name)}
