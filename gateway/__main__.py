"""The ``fieldgate`` command line.

=================================  ==========================================================
``fieldgate run [-c FILE]``        run the gateway (default /etc/fieldgate/fieldgate.toml)
``fieldgate demo``                 simulated devices + local stand-ins of the services, offline
``fieldgate check-config FILE``    validate; every error as ``toml.path (line N) -> message``;
                                   a systemd credential outside the unit is a note
                                   (``--strict``: every secret must resolve)
``fieldgate check-uplink NAME``    prove an uplink's mapping and token without storing (NILU)
``fieldgate queue [-c FILE]``      backlog per uplink, oldest pending age, dead letters
                                   (``queue`` and ``dead-letters`` resolve no secret)
``fieldgate dead-letters list|replay UPLINK [-c FILE]``   inspect or requeue dead letters
``fieldgate status [-c FILE]``     the running daemon's /status as tables (``--watch [S]``,
                                   ``--json``); exit 1 naming the URL when it does not answer
=================================  ==========================================================

Exit codes: 0 ok, 1 runtime failure, 2 usage, 73 store unusable (held by another fieldgate,
permissions, read-only disk), 78 configuration error (EX_CONFIG). The systemd unit restarts on
neither 73 nor 78.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from gateway.config import (
    DEFAULT_CONFIG_PATH,
    EX_CONFIG,
    LoadedConfig,
    SecretMode,
    SecretRef,
    load_config,
)
from gateway.errors import ConfigError, FieldgateError, StoreUnusable

#: The store cannot be used as it is (another fieldgate holds it, permissions, read-only disk):
#: EX_CANTCREAT. The systemd unit does not restart on it.
EX_STORE_UNUSABLE = 73


def _config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("FIELDGATE_CONFIG") or DEFAULT_CONFIG_PATH)


def _load(path: Path, secrets: SecretMode = "all") -> LoadedConfig:
    try:
        return load_config(path, secrets=secrets)
    except ConfigError as exc:
        print(f"{exc.source or path}: configuration is invalid:", file=sys.stderr)
        for tpath, msg in exc.problems:
            print(f"  {tpath} -> {msg}" if tpath else f"  {msg}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def cmd_run(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.app import Gateway

    loaded = _load(_config_path(args.config))
    logs.setup(loaded.settings.log.level, loaded.settings.log.format)
    try:
        return asyncio.run(Gateway(loaded).run())
    except StoreUnusable as exc:
        # Locked by another fieldgate, permissions, a read-only disk: restarting cannot help,
        # so the unit's RestartPreventExitStatus holds it (no crash loop); the file is untouched.
        structlog.get_logger("gateway").error(
            "store_unusable", error=str(exc), action="fix the cause, then start fieldgate again"
        )
        return EX_STORE_UNUSABLE


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.sandbox.demo import main as demo_main

    return demo_main(args)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate everything this process can. Outside the unit a systemd credential cannot be
    read ($CREDENTIALS_DIRECTORY is set by systemd for the service alone): it is listed as a
    note, not an error, unless ``--strict`` (CI pipelines that have every secret)."""
    path = _config_path(args.file)
    loaded = _load(path, "all" if args.strict else "available")
    s = loaded.settings
    for w in loaded.warnings:
        print(f"warning: {w}")
    for n in loaded.notes:
        print(f"note: {n}")
    print(f"{path}: ok ({len(s.sources)} sources, {len(s.uplinks)} uplinks)")
    if args.probe:
        return asyncio.run(_probe(loaded))
    return 0


async def _probe(loaded: LoadedConfig) -> int:
    """One real check of each source and uplink that can be probed; prints what it found.

    A plugin can be probed when it implements :class:`gateway.probe.Probes` (Modbus sources read
    each device once; Vanda compares the service's examination-type table with the built-in
    one). Every failure (a device that cannot be reached, does not answer, answers with an
    exception or garbage; a probe that raised) is listed on stderr at the end and makes the
    exit code 1. Plugins with nothing to probe say so and are not failures.
    """
    from gateway.probe import Probes
    from gateway.sources.base import Source
    from gateway.sources.position import PositionBoard
    from gateway.sources.registry import build_source
    from gateway.uplinks.base import Uplink
    from gateway.uplinks.registry import build_uplink

    base = loaded.path.parent if loaded.path else Path.cwd()
    positions = PositionBoard()
    failures: list[str] = []
    plugins: list[tuple[str, str, Source | Uplink]] = [
        (s.name, s.type, build_source(s, base_dir=base, positions=positions))
        for s in loaded.settings.sources
    ]
    for u in loaded.settings.uplinks:
        try:
            plugins.append((u.name, u.type, build_uplink(u)))
        except LookupError as exc:  # a credential only the service can read (see the notes)
            print(f"{u.name}: not probed: {exc}")
    for name, kind, plugin in plugins:
        try:
            if not isinstance(plugin, Probes):
                print(f"{name}: nothing to probe for type {kind!r}")
                continue
            try:
                report = await plugin.probe()
            except FieldgateError as exc:
                failures.append(f"{name} (probe failed: {exc})")
                print(f"{name}: probe failed: {exc}")
                continue
        finally:
            with contextlib.suppress(Exception):
                await plugin.aclose()
        for line in report.lines:
            print(f"{name}: {line}")
        failures.extend(f"{name}/{f.name} ({f.reason})" for f in report.failures)
    if not failures:
        return 0
    print(f"probe: {len(failures)} failed: {', '.join(failures)}", file=sys.stderr)
    return 1


def cmd_check_uplink(args: argparse.Namespace) -> int:
    """Prove an uplink's mapping and credentials without storing data, where the service can."""
    from gateway.uplinks.base import ChecksUplink
    from gateway.uplinks.registry import build_uplink

    loaded = _load(_config_path(args.config))
    try:
        cfg = loaded.settings.uplink(args.uplink)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def check() -> list[str] | None:
        uplink = build_uplink(cfg)
        try:
            return await uplink.check_uplink() if isinstance(uplink, ChecksUplink) else None
        finally:
            await uplink.aclose()

    lines = asyncio.run(check())
    if lines is None:
        print(
            f"{cfg.name}: the {cfg.type} service offers no test that stores nothing; "
            "use `fieldgate check-config --probe` or watch /status after start",
            file=sys.stderr,
        )
        return 2
    for line in lines:
        print(line)
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


def _open_store_readonly(loaded: LoadedConfig) -> Any:
    from gateway.store import Store

    s = loaded.settings
    routes = {u.name: u.routed_series() for u in s.uplinks if u.enabled}
    if not s.store.path.exists():
        print(f"no store at {s.store.path} yet", file=sys.stderr)
        raise SystemExit(1)
    return Store.open(s.store, routes, readonly=True)


def cmd_queue(args: argparse.Namespace) -> int:
    loaded = _load(_config_path(args.config), "none")  # reads the store: needs no secret

    async def go() -> dict[str, Any]:
        store = await _open_store_readonly(loaded)
        try:
            return {
                "store": store.stats(),
                "uplinks": {n: store.uplink_stats(n) for n in store.uplink_names},
            }
        finally:
            await store.aclose()

    out = asyncio.run(go())
    if args.json:
        print(json.dumps(out, indent=1, default=str))
        return 0
    st = out["store"]
    print(
        f"store {st['path']}: {st['readings_stored']} readings, {st['bytes']} bytes in use "
        f"(quota {st['quota_bytes']})"
    )
    print(
        f"{'uplink':<16} {'backlog':>10} {'oldest pending':>16} {'dead letters':>13} "
        f"{'delivered':>11} {'evicted':>9}"
    )
    for name, u in out["uplinks"].items():
        age = u["oldest_pending_s"]
        age_s = "-" if age is None else _age(age)
        print(
            f"{name:<16} {u['backlog']:>10} {age_s:>16} {u['dead_letters']:>13} "
            f"{u['delivered']:>11} {u['evicted']:>9}"
        )
    return 0


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    return f"{seconds / 3600:.1f}h"


def cmd_dead_letters(args: argparse.Namespace) -> int:
    loaded = _load(_config_path(args.config), "none")  # reads the store: needs no secret
    try:
        loaded.settings.uplink(args.uplink)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def go() -> int:
        # Never the daemon's mode: a tool must not touch the clean-shutdown mark or move files.
        store = await _open_store_readonly(loaded)
        try:
            if args.action == "list":
                letters = await store.dead_letters(args.uplink, limit=args.limit)
                if not letters:
                    print(f"no dead letters of {args.uplink} in {loaded.settings.store.path}")
                for d in letters:
                    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["ts"] / 1000))
                    print(f"{d['id']:>8} {d['series']:<24} {when} {d['value']!r:<12} {d['reason']}")
                return 0
            n = await store.replay_dead_letters(args.uplink)
            print(
                f"{n} dead letters of {args.uplink} requeued; the running gateway sends them next"
            )
            return 0
        finally:
            await store.aclose()

    return asyncio.run(go())


def cmd_status(args: argparse.Namespace) -> int:
    """The running daemon's overview from its /status (like ``systemctl status``)."""
    from gateway.statusview import Unreachable, base_url, fetch, render

    path = _config_path(args.config)
    loaded = _load(path, "none")  # reads the daemon's endpoint: needs no secret
    health = loaded.settings.health
    if not health.enabled:
        print(f"{path}: [health] enabled = false: no /status to read", file=sys.stderr)
        return 1
    if health.port == 0:
        print(
            f"{path}: [health] port = 0 (the daemon picks a free port): set the port in the "
            "file or FIELDGATE_HEALTH__PORT",
            file=sys.stderr,
        )
        return 1
    token: str | None = None
    # [health] console_token (the web console's credential) guards /status too when set.
    ref = (
        health.__dict__.get("console_token")
        if "console_token" in type(health).model_fields
        else None
    )
    if isinstance(ref, SecretRef):
        try:
            token = ref.resolve().reveal()
        except ValueError as exc:
            print(f"{path}: health.console_token: {exc}", file=sys.stderr)
            return 1
    base = base_url(health)
    url = f"{base}/status"
    watch: float | None = args.watch
    if watch is not None and watch <= 0:
        print("--watch: the interval must be above 0 seconds", file=sys.stderr)
        return 2
    tty = sys.stdout.isatty()
    first = True
    while True:
        try:
            st = fetch(url, token)
        except Unreachable as exc:
            if first or watch is None:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            st = None
            problem = str(exc)
        if args.json:
            print(json.dumps(st) if watch is not None else json.dumps(st, indent=1), flush=True)
        else:
            lines = render(st, base) if st is not None else [f"error: {problem}"]
            if watch is not None:
                lines.append("")
                lines.append(f"every {watch:g} s, Ctrl-C to stop")
            if watch is not None and tty:
                sys.stdout.write("\x1b[H\x1b[2J")  # clear the screen, cursor home
            elif not first:
                print()
            print("\n".join(lines), flush=True)
        if watch is None:
            return 0
        first = False
        time.sleep(watch)  # Ctrl-C: KeyboardInterrupt, main() returns 0


def parser() -> argparse.ArgumentParser:
    """The command line. Every subcommand, option and argument has help text (a test walks it)."""
    p = argparse.ArgumentParser(prog="fieldgate", description="Edge gateway for field loggers.")
    sub = p.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="what to do (COMMAND -h: its help)"
    )
    config_help = f"TOML config file (default: $FIELDGATE_CONFIG, else {DEFAULT_CONFIG_PATH})"

    r = sub.add_parser("run", help="run the gateway (the systemd unit's ExecStart)")
    r.add_argument("-c", "--config", help=config_help)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="run everything locally: simulated devices, emulated services")
    d.add_argument("--state-dir", help="where the demo keeps its database (default: a temp dir)")
    d.add_argument(
        "--health-port",
        type=int,
        help="port of /health, /status, /metrics (default: $FIELDGATE_HEALTH__PORT, else 8080 "
        "or a free port when 8080 is taken)",
    )
    d.add_argument("--duration", type=float, help="stop after this many seconds")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser(
        "check-config",
        help="validate a config file: every problem as toml.path (line N) -> message; exit 78",
    )
    c.add_argument("file", nargs="?", help=config_help)
    c.add_argument(
        "--probe",
        action="store_true",
        help="also read each Modbus device once and compare Vanda's examination table; "
        "exit 1 listing each that failed",
    )
    c.add_argument(
        "--strict",
        action="store_true",
        help="every secret reference must resolve, systemd credentials too (for CI pipelines "
        "that have the secrets); without it a credential outside the unit is a note",
    )
    c.set_defaults(func=cmd_check_config)

    cu = sub.add_parser("check-uplink", help="prove an uplink's mapping and token (NILU pushtest)")
    cu.add_argument("uplink", help="the uplink's name in the config")
    cu.add_argument("-c", "--config", help=config_help)
    cu.set_defaults(func=cmd_check_uplink)

    q = sub.add_parser(
        "queue", help="backlog per uplink, oldest pending age, dead letters (needs no secret)"
    )
    q.add_argument("-c", "--config", help=config_help)
    q.add_argument("--json", action="store_true", help="print the figures as JSON")
    q.set_defaults(func=cmd_queue)

    dl = sub.add_parser(
        "dead-letters", help="list or replay what a service refused (needs no secret)"
    )
    dl.add_argument(
        "action",
        choices=["list", "replay"],
        help="list: show them with the service's reason; replay: requeue them (the running "
        "gateway sends them next)",
    )
    dl.add_argument("uplink", help="the uplink's name in the config")
    dl.add_argument("-c", "--config", help=config_help)
    dl.add_argument("--limit", type=int, default=100, help="list at most this many (default 100)")
    dl.set_defaults(func=cmd_dead_letters)

    st = sub.add_parser(
        "status",
        help="the running daemon's sources, uplinks, store and clock (from its /status; "
        "needs no secret)",
    )
    st.add_argument("-c", "--config", help=config_help + "; its [health] host and port are read")
    st.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    st.add_argument(
        "--json",
        action="store_true",
        help="print /status as JSON (one line per redraw with --watch)",
    )
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command not in ("run", "demo"):
        # Operator commands keep stdout for their answer (``queue --json``); events go to stderr.
        from gateway import logs

        logs.setup("warning", "console", sys.stderr)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 0
    except FieldgateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
