"""Reading a Vanda transaction answer into a per-measurement :class:`SendResult`.

The Hydro API answers ``POST /measurements`` and ``POST /measurements/update`` with 200 and::

    {"created": "...", "transactionId": "...",
     "successful": [{"timestamp": "2023-09-21T14:34Z", "action": "created"}],
     "failed": [{"timestamp": "...", "isSuccess": false, "errorCode": 4002,
                 "errorMessage": "..."}]}

``timestamp`` is matched to the request's items by UTC minute (a request never holds two items
of one minute). What a caller may rely on (see :mod:`gateway.uplinks.vanda.uplink` for why):

- ``successful`` items are delivered, whatever the ``action`` (``ignored``: the service already
  had the measurement, e.g. a resend after a crash);
- ``failed`` items are rejected with ``Vanda errorCode <code>: <message>``; in a transactional
  request only those with ``isSuccess = false``; those with ``isSuccess = true`` were valid but
  rolled back and come back as transient with ``retry_after = 0`` (send again now);
- a transactional failure that names no culprit, or an answer whose timestamps do not match the
  request while something failed, is an unidentified rejection (the dispatcher bisects); when
  nothing failed, an unmatched answer means everything was taken;
- items the answer does not mention, and an answer that is not the documented object, are
  transient (sending a measurement again is harmless: the service ignores what it has).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import structlog

from gateway.models import StoredReading
from gateway.uplinks.base import Failure, Outcome, SendResult
from gateway.uplinks.http import MAX_REASON
from gateway.uplinks.vanda.tables import minute_of, parse_time

log = structlog.get_logger(__name__)


def reason(entry: dict[str, Any]) -> str:
    """The dead-letter reason for one ``failed`` entry."""
    code = entry.get("errorCode")
    text = " ".join(str(entry.get("errorMessage") or "no errorMessage").split())
    return f"Vanda errorCode {code}: {text}"[:MAX_REASON]


def read_answer(
    answer: object, batch: Sequence[StoredReading], *, transactional: bool, name: str
) -> SendResult:
    """The outcome of each item of ``batch`` from the service's 200 answer (module docstring)."""
    successful = answer.get("successful") if isinstance(answer, dict) else None
    failed = answer.get("failed") if isinstance(answer, dict) else None
    if (
        not isinstance(successful, list | None)
        or not isinstance(failed, list | None)
        or (successful is None and failed is None)
    ):
        log.warning("vanda_unexpected_answer", uplink=name, answer=str(answer)[:200])
        return SendResult.failed(Outcome.TRANSIENT, "unreadable answer to HTTP 200; sent again")
    ok = [e for e in successful or [] if isinstance(e, dict)]
    bad = [e for e in failed or [] if isinstance(e, dict)]
    matched = _match(batch, ok + bad)
    if matched is None:
        if not bad:
            return SendResult.all_delivered(batch)
        return SendResult.failed(Outcome.REJECTED, reason(bad[0]))

    delivered = [item.id for item in matched[: len(ok)]]
    rejected: dict[int, str] = {}
    rolled_back = 0
    unidentified: list[dict[str, Any]] = []
    actions = Counter(str(e.get("action", "")) for e in ok)
    for entry, item in zip(bad, matched[len(ok) :], strict=True):
        is_success = entry.get("isSuccess")
        if is_success is True:
            rolled_back += 1
        elif is_success is False or not transactional:
            rejected[item.id] = reason(entry)
        else:
            unidentified.append(entry)
    if actions.get("ignored"):
        log.info(
            "vanda_measurements_ignored",
            uplink=name,
            measurements=actions["ignored"],
            why="the service already holds them",
        )
    done = set(delivered) | set(rejected)
    rest = [it for it in batch if it.id not in done]
    if not rest:
        return SendResult(delivered, rejected)
    if transactional and rejected:
        failure = Failure(
            Outcome.TRANSIENT,
            f"{len(rest)} measurements not committed: the transaction was rolled "
            f"back for {len(rejected)} refused ones; sent again",
            retry_after=0.0,
        )
    elif unidentified:
        failure = Failure(Outcome.REJECTED, reason(unidentified[0]))
    else:
        what = "rolled back" if rolled_back else "not in the answer"
        failure = Failure(Outcome.TRANSIENT, f"{len(rest)} measurements {what}; sent again")
    return SendResult(delivered, rejected, failure)


def _match(
    batch: Sequence[StoredReading], entries: list[dict[str, Any]]
) -> list[StoredReading] | None:
    """The item each entry names, in order; None when some entry names no item or an item twice."""
    if len(batch) == 1:
        return [batch[0]] * len(entries) if len(entries) <= 1 else None
    by_minute = {minute_of(it.ts): it for it in batch}
    out: list[StoredReading] = []
    seen: set[int] = set()
    for e in entries:
        try:
            minute = parse_time(str(e.get("timestamp", ""))).minute
        except ValueError:
            return None
        item = by_minute.get(minute)
        if item is None or item.id in seen:
            return None
        seen.add(item.id)
        out.append(item)
    return out
