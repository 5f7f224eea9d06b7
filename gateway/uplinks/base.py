"""The uplink contract: what every service plugin implements, and what it returns.

An uplink turns a batch of :class:`~gateway.models.StoredReading` (all sharing one grouping key)
into the service's request and classifies the answer per item. Everything that is the same for
every service (leasing from the store, batching, rate limiting, backoff, bisection, dead letters,
state) lives once in :mod:`gateway.uplinks.dispatch`; a plugin never retries or sleeps on its own.

Outcomes (DESIGN.md): a :class:`SendResult` lists the ids the service took (``delivered``) and the
ids it refused for good with its reason (``rejected``). Every other item of the batch shares
``failure``: transient (retry the same items after backoff: soon when the service could not be
reached, ``Failure.unreachable``; slower when it answered and refused), auth (keep everything,
retry slowly),
too_large (split, lower the batch size), or rejected-unidentified (the service refused some item
but did not say which: the dispatcher bisects). A 300/moved answer is followed inside the plugin,
which reports it in ``moved_to`` so the change is logged and shown.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable

from gateway.models import StoredReading


class Outcome(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    AUTH = "auth"
    REJECTED = "rejected"
    TOO_LARGE = "too_large"
    MOVED = "moved"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why the items of a batch that were neither delivered nor rejected were not sent.

    ``outcome`` is TRANSIENT, AUTH, TOO_LARGE or REJECTED (REJECTED here means: the service
    refused at least one of these items without naming it; the dispatcher bisects to find it and
    dead-letters it with ``message``). ``retry_after`` is the service's own hint in seconds.
    ``unreachable`` (TRANSIENT only): the service was not reached or the connection dropped
    (refused, reset, DNS, timeout), so the next try comes on the short schedule
    (``reconnect_max_s``); a service that answered and refused backs off up to ``backoff_max_s``.
    """

    outcome: Outcome
    message: str
    retry_after: float | None = None
    status: int | None = None
    unreachable: bool = False


@dataclass(frozen=True, slots=True)
class SendResult:
    """Per-item result of one send. Ids in neither list share ``failure`` (or are retried)."""

    delivered: Sequence[int] = ()
    rejected: Mapping[int, str] = field(default_factory=dict)
    failure: Failure | None = None
    moved_to: str | None = None

    @classmethod
    def all_delivered(cls, batch: Sequence[StoredReading]) -> SendResult:
        return cls(delivered=[r.id for r in batch])

    @classmethod
    def failed(
        cls,
        outcome: Outcome,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        unreachable: bool = False,
    ) -> SendResult:
        return cls(failure=Failure(outcome, message, retry_after, status, unreachable))


@runtime_checkable
class Uplink(Protocol):
    """A service plugin. Built from its config section by ``gateway.app``.

    ``routes`` names the series this uplink takes (series names, or ``*`` patterns where the
    plugin allows them: gateway/routes.py); the store only leases those to it. ``check`` refuses
    an item locally before any request (the reason is dead-lettered without spending the
    service's quota). ``group_key`` puts items that may share one request together (None: any
    item goes with any other). ``item_size`` estimates encoded bytes so batches respect the
    service's body limit.
    """

    name: str

    @property
    def routes(self) -> Mapping[str, object]: ...

    def check(self, item: StoredReading) -> str | None: ...

    def group_key(self, item: StoredReading) -> Hashable: ...

    def item_size(self, item: StoredReading) -> int: ...

    async def send(self, batch: Sequence[StoredReading]) -> SendResult: ...

    async def aclose(self) -> None: ...


#: Records part of a send's outcome at once (see :class:`SettlesEarly`).
Settle = Callable[[SendResult], Awaitable[None]]


@runtime_checkable
class SettlesEarly(Protocol):
    """A plugin whose one send runs parts that finish at different times (Energydata: MQTT
    publishes beside a batch import that may take minutes) reports each part's ``delivered`` and
    ``rejected`` through ``settle`` as soon as that part is done; the dispatcher records them in
    the store there and then. A kill while the slow part runs then sends again only what that
    part held. The returned result still covers the whole batch (ids already settled in it are
    not counted twice); ``failure`` is only ever taken from the returned result."""

    async def send_settling(self, batch: Sequence[StoredReading], settle: Settle) -> SendResult: ...


# ----------------------------------------------------------------------------------------------
# Optional capabilities: a plugin declares one by implementing the protocol; the dispatcher and
# the CLI ask with isinstance (gateway/probe.py has the probe capability shared with sources).


@runtime_checkable
class ReportsStatus(Protocol):
    """A plugin with its own view for /status (connection, in-flight window, import progress),
    shown under the uplink's ``service`` key. Never contains a secret."""

    def status(self) -> dict[str, object]: ...


@runtime_checkable
class SendsWholeGroups(Protocol):
    """A plugin whose request must carry a whole group (NILU: one packet per sensor and
    instant, so a second packet for the same instant would be a duplicate). When a lease is cut
    by its size, the dispatcher holds the last, possibly incomplete group back for the next
    lease instead of sending it in two pieces."""

    def sends_whole_groups(self) -> bool: ...


@runtime_checkable
class ChecksInBulk(Protocol):
    """A plugin that checks, sizes and groups a whole lease at once (Energydata: column by
    column, no Python call per reading), with exactly the answers its per-item ``check``,
    ``item_size`` and ``group_key`` would give. ``check_all`` returns id -> reason for the items
    ``check`` refuses; ``group_keys`` returns None when every item may share a request."""

    def check_all(self, items: Sequence[StoredReading]) -> dict[int, str]: ...

    def sizes(self, items: Sequence[StoredReading]) -> list[int]: ...

    def group_keys(self, items: Sequence[StoredReading]) -> list[Hashable] | None: ...


@runtime_checkable
class ChecksUplink(Protocol):
    """A service that offers a test storing nothing (NILU's push test): ``fieldgate
    check-uplink`` runs it. Returns report lines; a failed check's lines start ``FAIL``.
    Never raises."""

    async def check_uplink(self) -> list[str]: ...
