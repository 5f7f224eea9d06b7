"""The delivery machinery every uplink shares, written once.

An :class:`UplinkRunner` owns one uplink plugin. Its workers (``concurrency`` of them) loop:
lease pending readings from the store, refuse locally what the plugin's ``check`` refuses
(dead-lettered without spending quota), group by the plugin's ``group_key``, cut batches by
count and bytes, wait for the rate limiter, send, and act on the outcome per item:

============  =====================================================================
delivered     done; backoff reset; state ``ok``
rejected      dead-lettered with the service's reason; the rest of the batch goes on
transient     kept; back off (the service's Retry-After wins); state ``backing_off``
auth          kept; wait ``auth_retry_s``; state ``auth_failed``
too_large     split in halves and lower the uplink's batch size; a single item is rejected
rejected, unidentified   bisect until the refused item is alone, then dead-letter it
============  =====================================================================

A transient failure backs off on one of two schedules (:class:`~gateway.backoff.RetrySchedule`,
both doubling from ``backoff_initial_s`` with jitter, reset by a delivery): when the service
could not be reached (``Failure.unreachable``: connection refused, reset or dropped, DNS, a
timeout) the link or the service is down and may be back any second, so the cap is the short
``reconnect_max_s`` (default 5 s); when it answered and refused (5xx, 429, a CONNACK refusal) the
cap is ``backoff_max_s``. ``status()["retry_kind"]`` says which (``unreachable``, ``refused`` or
``auth``) and ``retry_in_s`` how long.

A lease is completed in one store transaction: what was delivered or rejected is done, the rest
stays pending. Cancellation (shutdown) abandons the lease: its readings stay pending and are
sent again after restart (at least once).

With a :class:`~gateway.clock.Clock` (the supervisor always passes one), a lease first goes
through :meth:`Clock.gate <gateway.clock.Clock.gate>`: readings stamped while the clock was
unsynchronised are held until their timestamps are repaired (``hold_unsynced``, default on), and
nothing stamped before 2020 is ever sent. Held readings stay pending and are not leased again
until the repair releases them, so holding neither backs off nor polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import deque
from collections.abc import Hashable, Sequence
from enum import StrEnum
from operator import attrgetter
from typing import Any

import structlog

from gateway.backoff import RetrySchedule
from gateway.clock import Clock
from gateway.configbase import UplinkConfigBase, mask_secrets
from gateway.models import StoredReading
from gateway.routes import RouteTable
from gateway.store import Lease, Store
from gateway.uplinks.base import (
    ChecksInBulk,
    Failure,
    Outcome,
    ReportsStatus,
    SendResult,
    SendsWholeGroups,
    SettlesEarly,
    Uplink,
)
from gateway.uplinks.downsample import Downsampler, Plan
from gateway.uplinks.ratelimit import RateLimiter

log = structlog.get_logger(__name__)
_ID = attrgetter("id")

#: Longest Retry-After honoured as given; a larger hint is capped (and still backs off).
MAX_RETRY_AFTER_S = 3600.0
#: Largest lease when open windows or groups keep a lease from sending anything.
MAX_LEASE = 100_000


class UplinkState(StrEnum):
    OK = "ok"
    BACKING_OFF = "backing_off"
    AUTH_FAILED = "auth_failed"
    PAUSED = "paused"


class UplinkRunner:
    """Drives one uplink plugin against the store. Run :meth:`run` as a task."""

    def __init__(
        self, uplink: Uplink, cfg: UplinkConfigBase, store: Store, clock: Clock | None = None
    ) -> None:
        """Without ``clock`` nothing is held for the clock (tools and tests of other concerns)."""
        self.uplink = uplink
        self.cfg = cfg
        self.store = store
        self.clock = clock
        #: Readings of the last lease held for the clock (they do not make the next lease grow).
        self._clock_held = 0
        self.name = cfg.name
        saved = store.uplink_state(self.name)
        self.limiter = RateLimiter(
            cfg.rate_limit_requests,
            cfg.rate_limit_period_s,
            history=saved.get("sent", []),
            persist=self._persist_sends,
            even=cfg.pacing == "even",
        )
        #: Transient failures: a short cap while the service cannot be reached, the long one
        #: once it answers and refuses.
        self.retry = RetrySchedule(cfg.backoff_initial_s, cfg.backoff_max_s, cfg.reconnect_max_s)
        #: The schedule the last failure took: "unreachable", "refused" or "auth" (None: none).
        self.retry_kind: str | None = None
        self.batch_limit = cfg.batch_max_items
        self.state = UplinkState.OK
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_delivery_at: float | None = None
        self._first_recorded = False
        self.moved_to: str | None = None
        self.started_at = time.time()
        self.requests: dict[str, int] = {o.value: 0 for o in Outcome}
        self._resume_at = 0.0  # monotonic
        self._nudge = asyncio.Event()  # set by resume_now() to wake a backing-off worker
        self.downsampler = Downsampler(
            RouteTable(cfg.routes), saved.get("windows"), grace_s=cfg.window_grace_s
        )
        #: When the last lease held readings back (open windows): seconds until the first may
        #: close without more data.
        self._recheck_s: float | None = None
        #: Plugins whose requests must carry a whole group (one packet per instant) say so.
        self.whole_groups = isinstance(uplink, SendsWholeGroups) and uplink.sends_whole_groups()
        #: Plugins that check, size and group a lease at once say so.
        self.bulk: ChecksInBulk | None = uplink if isinstance(uplink, ChecksInBulk) else None
        self.live_first = cfg.order == "live_first"
        self.workers = cfg.concurrency
        if self.downsampler.active:
            # Windows must be handed out in capture order and never split between two leases in
            # flight: one worker, oldest first (a backfill window is then never "late").
            if self.live_first or self.workers > 1:
                log.info(
                    "uplink_downsampling_in_order",
                    uplink=self.name,
                    reason="min_interval_s routes: oldest_first, one worker",
                )
            self.live_first = False
            self.workers = 1
        self._lease_size = self._base_lease_size()
        # Stopping between requests (stop_sending, wait_idle): a config reload replaces runners.
        self._stopping = False
        self._processing = 0
        self._idle = asyncio.Event()

    # ------------------------------------------------------------------------------------------

    async def _persist_sends(self, sent: list[float]) -> None:
        state = self.store.uplink_state(self.name)
        state["sent"] = sent
        await self.store.save_uplink_state(self.name, state)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for i in range(self.workers):
                tg.create_task(self._worker(), name=f"uplink:{self.name}:{i}")

    def _base_lease_size(self) -> int:
        # Downsampling shrinks a lease to its aggregates: lease more so requests stay full.
        return self.batch_limit * 10 if self.downsampler.active else self.batch_limit

    async def _worker(self) -> None:
        while True:
            while (wait := self._resume_at - time.monotonic()) > 0:
                self._nudge.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._nudge.wait()
            # Lease only once a request could go: with paced quotas the request then carries
            # everything that became pending while waiting for the slot.
            await self.limiter.ready()
            # A commit while this lease is handled must not be waited for afterwards.
            commits = self.store.commits_total
            if self._stopping:  # being replaced (stop_sending): take no new lease
                return
            lease = await self.store.lease(self.name, self._lease_size, live_first=self.live_first)
            if lease is None:
                if self.store.commits_total == commits:
                    await self.store.wait_for_data(timeout=2.0)
                continue
            if not lease.items:
                await self.store.complete(lease, (), {})
                continue
            try:
                sent = await self.process(lease)
            except BaseException:
                self.store.release(lease)
                raise
            if sent:
                self._lease_size = self._base_lease_size()
            elif len(lease.items) - self._clock_held >= self._lease_size:
                # A full lease that was all one open window (or group): lease more next time.
                self._lease_size = min(self._lease_size * 4, MAX_LEASE)
            elif self._recheck_s is not None and self.store.commits_total == commits:
                # Only open windows pending: wait for them to close or for new data.
                await self.store.wait_for_data(timeout=min(max(self._recheck_s, 0.05), 5.0))

    # ------------------------------------------------------------------------------------------

    async def process(self, lease: Lease) -> int:
        """Send one lease and record every item's outcome. Returns how many requests it sent."""
        self._processing += 1
        try:
            return await self._process(lease)
        finally:
            self._processing -= 1
            if not self._processing:
                self._idle.set()

    def stop_sending(self) -> None:
        """Start no further request (a config reload replaces this runner: gateway/app.py).
        A lease being sent is recorded once its request in flight has answered; what it had not
        sent yet stays pending, and so does every lease taken from now on."""
        self._stopping = True

    async def wait_idle(self) -> None:
        """Return once no lease is being sent or recorded. After :meth:`stop_sending`, cancelling
        :meth:`run` right then (no await in between) abandons no request that was sent."""
        while self._processing:
            self._idle.clear()
            await self._idle.wait()

    async def _process(self, lease: Lease) -> int:
        # A lease cut short by its size may end in the middle of a window or a group: what could
        # go on past the cut is held back for the next lease instead of being sent in pieces.
        cut = bool(lease.cut_at)
        sendable: Sequence[StoredReading] = lease.items
        hold_from: int | None = None
        rejected: dict[int, str] = {}
        if self.clock is not None:
            # Before downsampling: a held reading must not shape (or come late for) a window.
            gate = self.clock.gate(sendable, hold_unsynced=self.cfg.hold_unsynced)
            sendable, hold_from, rejected = gate.send, gate.hold_from, gate.rejected
        self._clock_held = len(lease.items) - len(sendable) - len(rejected)
        if self.downsampler.active:
            plan = self.downsampler.plan(sendable, cut=cut, quiet_s=self.store.quiet_s)
        else:
            plan = Plan(send=list(sendable))
        if cut and self.whole_groups and plan.send:
            self._hold_cut_groups(plan, lease.cut_at)
        self._recheck_s = plan.recheck_s
        rejected.update(plan.late)
        unfinished: list[int] = list(plan.held)
        items: list[StoredReading] = []
        if self.bulk is not None:
            refused = self.bulk.check_all(plan.send)
            items = [i for i in plan.send if i.id not in refused] if refused else plan.send
            rejected.update(refused)
        else:
            for it in plan.send:
                reason = self.uplink.check(it)
                if reason is None:
                    items.append(it)
                else:
                    rejected[it.id] = reason
        delivered: list[int] = []
        queue: deque[list[StoredReading]] = deque(self._chunks(items))
        sent = 0
        while queue:
            if self._stopping:  # being replaced: no new request, the rest stays pending
                for c in queue:
                    unfinished.extend(i.id for i in c)
                break
            chunk = queue.popleft()
            sent += 1
            await self.limiter.acquire()
            result = await self._send(chunk, lease, plan)
            self._note_moved(result)
            delivered.extend(result.delivered)
            rejected.update(result.rejected)
            done = set(result.delivered) | set(result.rejected)
            if len(done) >= len(chunk) and done.issuperset(map(_ID, chunk)):
                rest = []  # the usual answer: every item accounted for
            else:
                rest = [i for i in chunk if i.id not in done]
            if result.delivered:
                self._on_success()
            if not rest:
                self.requests[Outcome.DELIVERED] += 1
                continue
            failure = result.failure or Failure(
                Outcome.TRANSIENT, f"service did not account for {len(rest)} readings"
            )
            self.requests[failure.outcome] += 1
            if failure.outcome in (Outcome.REJECTED, Outcome.TOO_LARGE):
                if len(rest) == 1:
                    rejected[rest[0].id] = failure.message
                    continue
                half = len(rest) // 2
                queue.appendleft(rest[half:])
                queue.appendleft(rest[:half])
                if failure.outcome is Outcome.TOO_LARGE and self.batch_limit > half:
                    self.batch_limit = max(1, half)
                    log.warning(
                        "uplink_batch_lowered",
                        uplink=self.name,
                        batch_max_items=half,
                        reason=failure.message,
                    )
                continue
            # Transient or auth: keep this chunk and everything not yet sent.
            unfinished.extend(i.id for i in rest)
            for c in queue:
                unfinished.extend(i.id for i in c)
            queue.clear()
            self._on_failure(failure)
        # Reasons are the services' words: they are kept and shown, so never with a credential.
        rejected = {i: mask_secrets(r) for i, r in rejected.items()}
        if plan.members:
            self._settle_windows(plan, delivered, rejected, unfinished)
        await self.store.complete(lease, delivered, rejected, unfinished, hold_from=hold_from)
        if delivered:
            self._recorded_delivery()
        if plan.members:
            state = self.store.uplink_state(self.name)
            state["windows"] = self.downsampler.state()
            await self.store.save_uplink_state(self.name, state)
        if rejected:
            first = next(iter(rejected.values()))
            log.warning(
                "readings_dead_lettered", uplink=self.name, readings=len(rejected), reason=first
            )
        return sent

    def _hold_cut_groups(self, plan: Plan, cut_at: list[int]) -> None:
        key = self.uplink.group_key
        by_id = {i.id: i for i in plan.send}
        keys = {key(by_id[c]) for c in cut_at if c in by_id}
        hold = [i for i in plan.send if key(i) in keys]
        if not hold or len(hold) == len(plan.send):
            return  # nothing at the cut, or one group larger than a lease: send what we have
        plan.send = [i for i in plan.send if key(i) not in keys]
        for i in hold:
            plan.held.append(i.id)
            plan.held.extend(plan.members.pop(i.id, []))

    def _settle_windows(
        self, plan: Plan, delivered: list[int], rejected: dict[int, str], unfinished: list[int]
    ) -> None:
        """Give every reading a downsampled aggregate stood for the aggregate's outcome."""
        by_id = {i.id: i for i in plan.send}
        done = set(delivered)
        settled: list[StoredReading] = []
        oldest_open: dict[str, int] = {}  # per series: the oldest window still to be sent
        for agg_id, others in plan.members.items():
            agg = by_id[agg_id]
            if agg_id in done:
                delivered.extend(others)
            elif agg_id in rejected:
                rejected.update(dict.fromkeys(others, rejected[agg_id]))
            else:
                unfinished.extend(others)
                oldest_open[agg.series] = min(oldest_open.get(agg.series, agg.ts), agg.ts)
                continue
            settled.append(agg)
        for agg in settled:
            # A window settled past one that must be sent again does not move the mark, or the
            # older one would come back "late".
            if agg.ts < oldest_open.get(agg.series, agg.ts + 1):
                self.downsampler.mark_sent(agg)

    def _chunks(self, items: Sequence[StoredReading]) -> list[list[StoredReading]]:
        bulk = self.bulk
        keys = (
            bulk.group_keys(items) if bulk is not None else list(map(self.uplink.group_key, items))
        )
        groups: dict[Hashable, list[StoredReading]] = {}
        if keys is None:
            groups[None] = list(items)  # any item goes with any other
        else:
            for key, it in zip(keys, items, strict=True):
                group = groups.get(key)
                if group is None:
                    groups[key] = [it]
                else:
                    group.append(it)
        out: list[list[StoredReading]] = []
        limit, max_bytes = self.batch_limit, self.cfg.batch_max_bytes
        for group in groups.values():
            sizes = (
                bulk.sizes(group) if bulk is not None else list(map(self.uplink.item_size, group))
            )
            if len(group) <= limit and sum(sizes) <= max_bytes:
                out.append(group)  # the whole group fits one request
                continue
            cur: list[StoredReading] = []
            size = 0
            for it, n in zip(group, sizes, strict=True):
                if cur and (len(cur) >= limit or size + n > max_bytes):
                    out.append(cur)
                    cur, size = [], 0
                cur.append(it)
                size += n
            if cur:
                out.append(cur)
        return out

    async def _send(self, chunk: list[StoredReading], lease: Lease, plan: Plan) -> SendResult:
        # The plugin applies its own per-phase timeouts; this guard catches one that forgot.
        try:
            async with asyncio.timeout(self.cfg.timeout_s * 3):
                if isinstance(self.uplink, SettlesEarly):
                    return await self.uplink.send_settling(
                        chunk, lambda part: self._settle_early(lease, plan, part)
                    )
                return await self.uplink.send(chunk)
        except TimeoutError:
            return SendResult.failed(Outcome.TRANSIENT, "send timed out", unreachable=True)
        except Exception as exc:  # a plugin bug must not lose data or kill the uplink
            log.exception("uplink_send_crashed", uplink=self.name)
            return SendResult.failed(Outcome.TRANSIENT, f"send failed: {type(exc).__name__}")

    async def _settle_early(self, lease: Lease, plan: Plan, part: SendResult) -> None:
        """Record a finished part of a send at once (:class:`SettlesEarly`); a downsampled
        aggregate's readings share its outcome. The window marks move when the lease completes
        (a kill before then can at worst let a late reading of such a window through as a
        second value, never lose one)."""
        delivered = list(part.delivered)
        rejected = {i: mask_secrets(r) for i, r in part.rejected.items()}
        if plan.members:
            done = set(delivered)
            for agg_id, others in plan.members.items():
                if agg_id in rejected:
                    rejected.update(dict.fromkeys(others, rejected[agg_id]))
                elif agg_id in done:
                    delivered.extend(others)
        try:
            await self.store.settle(lease, delivered, rejected)
        except (sqlite3.Error, OSError) as exc:
            # Recording early is a saving, not a duty: the lease's completion records these too
            # (they are in the send's result). Failing here must not cancel the other part.
            log.warning(
                "uplink_settle_failed",
                uplink=self.name,
                readings=len(delivered) + len(rejected),
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        if delivered:
            self._on_success()
            self._recorded_delivery()

    # ------------------------------------------------------------------------------------------
    # State

    def _recorded_delivery(self) -> None:
        """Log the first delivery the store has recorded since start: an operator's (and the
        demo test's) sign that the whole path works."""
        if not self._first_recorded:
            self._first_recorded = True
            log.info("uplink_first_delivery", uplink=self.name)

    def _on_success(self) -> None:
        self.last_delivery_at = time.time()
        self.retry.reset()
        if self.state is not UplinkState.OK:
            log.info("uplink_recovered", uplink=self.name, was=self.state.value)
            self.state = UplinkState.OK

    def _on_failure(self, failure: Failure) -> None:
        self.last_error = mask_secrets(failure.message)
        self.last_error_at = time.time()
        if failure.outcome is Outcome.AUTH:
            delay = self.cfg.auth_retry_s
            new_state = UplinkState.AUTH_FAILED
            self.retry_kind = "auth"
        else:
            delay = self.retry.next(unreachable=failure.unreachable)
            self.retry_kind = "unreachable" if failure.unreachable else "refused"
            if failure.retry_after is not None:
                delay = min(max(failure.retry_after, 0.0), MAX_RETRY_AFTER_S)
                self.limiter.pause_until(time.time() + delay)
            new_state = UplinkState.BACKING_OFF
        # A later failure never shortens a wait already decided (a transient result after an
        # auth failure must not turn the slow retry into a fast one).
        self._resume_at = max(self._resume_at, time.monotonic() + delay)
        event = "uplink_failed" if self.state is not new_state else "uplink_still_failing"
        level = log.warning if event == "uplink_failed" else log.debug
        level(
            event,
            uplink=self.name,
            state=new_state.value,
            outcome=failure.outcome.value,
            status=failure.status,
            error=failure.message,
            retry=self.retry_kind,
            retry_in_s=round(delay, 2),
        )
        self.state = new_state

    def _note_moved(self, result: SendResult) -> None:
        if result.moved_to and result.moved_to != self.moved_to:
            log.warning("uplink_moved", uplink=self.name, endpoint=result.moved_to)
            self.moved_to = result.moved_to

    def resume_now(self) -> None:
        """Forget the current backoff (used by tests and an operator's nudge)."""
        self._resume_at = 0.0
        self.limiter.resume()
        self._nudge.set()

    def stuck(self, after_s: float) -> bool:
        """Pending readings and no delivery for ``after_s`` seconds."""
        stats = self.store.uplink_stats(self.name)
        if not stats["backlog"]:
            return False
        since = self.last_delivery_at or self.started_at
        return time.time() - since > after_s

    def status(self) -> dict[str, Any]:
        stats = self.store.uplink_stats(self.name)
        # A plugin may add its own view (connection, in-flight window, import progress).
        plugin = self.uplink.status() if isinstance(self.uplink, ReportsStatus) else {}
        return {
            "service": plugin,
            "state": self.state.value,
            **stats,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_delivery_at": self.last_delivery_at,
            "retry_in_s": max(0.0, round(self._resume_at - time.monotonic(), 3)),
            "retry_kind": self.retry_kind if self.state is not UplinkState.OK else None,
            "batch_max_items": self.batch_limit,
            "requests": dict(self.requests),
            "moved_to": self.moved_to,
            "clock_hold_from_id": self.store.held_from(self.name),
        }
