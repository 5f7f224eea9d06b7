"""``fieldgate status``: the running daemon's ``/status`` as a terminal overview.

Reads the health endpoint named by the config (stdlib ``urllib``: no event loop, no extra
import weight) and renders sources, uplinks, store and clock as plain-text tables, times as
local date-time and "3 min ago" (from the ``X_epoch`` numbers of ``/status``, see
:mod:`gateway.timefields`).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from gateway.config import HealthConfig

#: Seconds to wait for the daemon's answer.
FETCH_TIMEOUT_S = 5.0


class Unreachable(Exception):
    """The daemon did not answer at the URL (the message names it)."""


def base_url(cfg: HealthConfig) -> str:
    """The URL to reach the health endpoint of ``cfg`` from this box (no trailing slash)."""
    host = cfg.host
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{cfg.port}"


def fetch(url: str, token: str | None = None) -> dict[str, Any]:
    """GET ``url`` and parse its JSON; :class:`Unreachable` naming the URL when that fails."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=FETCH_TIMEOUT_S) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{url} answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach fieldgate at {url}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise Unreachable(f"{url} did not answer JSON (is it fieldgate?)") from None
    if not isinstance(data, dict):
        raise Unreachable(f"{url} did not answer a JSON object (is it fieldgate?)")
    return data


# ----------------------------------------------------------------------------------------------
# Formatting


def ago(seconds: float | None) -> str:
    """``seconds`` as a person says it: "just now", "12 s ago", "3 min ago", "2 h ago"."""
    if seconds is None:
        return "never"
    if seconds < 0:
        return "in the future"
    return f"{duration(seconds)} ago" if seconds >= 1 else "just now"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def local_time(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    try:
        return datetime.fromtimestamp(epoch).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(epoch)


def when(epoch: float | None, now: float) -> str:
    """``2026-12-04 16:31:02 (3 min ago)``, or "never"."""
    if epoch is None:
        return "never"
    return f"{local_time(epoch)} ({ago(now - epoch)})"


def size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - the loop returns


def table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell; the first left-aligned, the others too except
    numbers (right-aligned)."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            numeric = i > 0 and cell.replace(".", "", 1).isdigit()
            out.append(cell.rjust(widths[i]) if numeric else cell.ljust(widths[i]))
        return (indent + "  ".join(out)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _clip(text: object, width: int = 60) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= width else s[: width - 1] + "…"


def _num(v: object) -> str:
    return "-" if v is None else str(v)


# ----------------------------------------------------------------------------------------------
# The overview


def render(st: dict[str, Any], url: str, now: float | None = None) -> list[str]:
    """The lines of the overview of one ``/status`` answer fetched from ``url``."""
    now = time.time() if now is None else now
    out: list[str] = []
    ready = "ready" if st.get("ready") else "starting (not ready)"
    started = st.get("started_at_epoch")
    up = st.get("uptime_s")
    since = f", up {duration(up)} since {local_time(started)}" if up is not None else ""
    out.append(f"● fieldgate {st.get('version', '?')} at {url}: {ready}{since}")
    cfg = st.get("config") or {}
    if cfg.get("path"):
        line = f"  config {cfg['path']}, loaded {when(cfg.get('loaded_at_epoch'), now)}"
        if cfg.get("last_reload_error"):
            line += f"; last reload refused: {_clip(cfg['last_reload_error'])}"
        out.append(line)

    out.append("")
    out.append("Sources")
    sources: dict[str, Any] = st.get("sources") or {}
    rows = []
    notes: list[str] = []
    for name, s in sources.items():
        last_ok = s.get("last_ok_epoch")
        rows.append(
            [
                name,
                str(s.get("state", "?")),
                _num(s.get("readings")),
                _num(s.get("errors")),
                _num(s.get("rejected")),
                ago(None if last_ok is None else now - last_ok),
            ]
        )
        if s.get("last_error"):
            notes.append(
                f"  {name}: last error {ago(_age(s.get('last_error_at_epoch'), now))}: "
                f"{_clip(s['last_error'])}"
            )
        if s.get("task_error"):
            notes.append(
                f"  {name}: task failed ({s.get('restarts', 0)} restarts): {_clip(s['task_error'])}"
            )
        for dev, d in (s.get("devices") or {}).items():
            if isinstance(d, dict) and d.get("state") not in (None, "ok"):
                notes.append(
                    f"  {name}/{dev}: {d.get('state')}, last ok "
                    f"{ago(_age(d.get('last_ok_epoch'), now))}"
                    + (f": {_clip(d['last_error'])}" if d.get("last_error") else "")
                )
        if "port_open" in s and not s["port_open"]:
            notes.append(f"  {name}: port {s.get('port', '?')} not open")
        if "fix" in s:
            notes.append(f"  {name}: GPS fix {s['fix']}, {_num(s.get('satellites'))} satellites")
    if rows:
        out += table(["name", "state", "readings", "errors", "rejected", "last reading"], rows)
        out += notes
    else:
        out.append("  (none)")

    out.append("")
    out.append("Uplinks")
    uplinks: dict[str, Any] = st.get("uplinks") or {}
    rows, notes = [], []
    for name, u in uplinks.items():
        oldest = u.get("oldest_pending_s")
        retry = u.get("retry_in_s") or 0
        state = str(u.get("state", "?"))
        if u.get("retry_kind") and state != "ok":
            state += f" ({u['retry_kind']})"
        if u.get("clock_hold_from_id") is not None:
            state += " (holding for the clock)"
        rows.append(
            [
                name,
                state,
                _num(u.get("delivered")),
                _num(u.get("backlog")),
                "-" if not oldest else duration(oldest),
                "-" if retry <= 0 else duration(retry),
                _num(u.get("dead_letters")),
                ago(_age(u.get("last_delivery_at_epoch"), now)),
            ]
        )
        if u.get("last_error"):
            notes.append(
                f"  {name}: last error {ago(_age(u.get('last_error_at_epoch'), now))}: "
                f"{_clip(u['last_error'])}"
            )
        if u.get("task_error"):
            notes.append(
                f"  {name}: task failed ({u.get('restarts', 0)} restarts): {_clip(u['task_error'])}"
            )
    if rows:
        out += table(
            [
                "name",
                "state",
                "delivered",
                "backlog",
                "oldest pending",
                "retry in",
                "dead letters",
                "last delivery",
            ],
            rows,
        )
        out += notes
    else:
        out.append("  (none)")

    out.append("")
    store: dict[str, Any] = st.get("store") or {}
    if store:
        used, quota = store.get("bytes"), store.get("quota_bytes")
        pct = f" ({100 * used / quota:.0f}%)" if used is not None and quota else ""
        out.append(
            f"Store   {store.get('path', '?')}: {size(used)} of {size(quota)}{pct}, "
            f"{_num(store.get('readings_stored'))} readings, free disk "
            f"{size(store.get('free_disk_bytes'))}"
        )
        out.append(
            f"  captured {_num(store.get('captured_total'))}, evicted "
            f"{_num(store.get('evicted_total'))}, last commit "
            f"{ago(_age(store.get('last_commit_at_epoch'), now))}"
            + (" — CORRUPT: restart to move it aside" if store.get("corrupt") else "")
        )
        if store.get("last_commit_error"):
            out.append(f"  last commit error: {_clip(store['last_commit_error'])}")
        for e in store.get("events") or []:
            out.append(
                f"  {when(e.get('at_epoch'), now)} {e.get('kind')}: {_clip(e.get('detail'), 80)}"
            )
    else:
        out.append("Store   (not open)")

    clock: dict[str, Any] = st.get("clock") or {}
    if clock:
        sync = {True: "synchronised", False: "NOT synchronised", None: "sync unknown"}.get(
            clock.get("synchronized"), "?"
        )
        line = (
            f"Clock   {sync} ({clock.get('source', '?')}), {_num(clock.get('steps_total'))} steps"
        )
        if clock.get("last_step_at_epoch") is not None:
            line += (
                f", last {clock.get('last_step_s')} s "
                f"{ago(_age(clock.get('last_step_at_epoch'), now))}"
            )
        if clock.get("unsynced_pending"):
            line += f", {clock['unsynced_pending']} readings wait for a repair"
        out.append(line)
    return out


def _age(epoch: float | None, now: float) -> float | None:
    return None if epoch is None else now - epoch
