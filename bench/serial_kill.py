"""What a kill -9 costs a serial line source: lines the logger sent once and the store never got.

    .venv/bin/python bench/serial_kill.py [--seconds 60] [--rate 5] [--seed 1]
                                          [--modes grouped,prompt] [--prompt-via shim|config]
                                          [--commit-interval-ms N] [--kills N]
    .venv/bin/python bench/serial_kill.py --prompt      # one mode: prompt commits
    .venv/bin/python bench/serial_kill.py --no-prompt   # one mode: grouped commits

A serial logger does not resend. Lines the daemon has read but not yet committed when it is
killed are gone; so are lines still in the pty on their way to it (the next start's open flushes
the port's input). This measures how many, per kill, with everything real on this machine:

* a socat pty pair; the daemon's ``serial_lines`` source opens one end, this script writes
  numbered lines ``<n>,<epoch ms>`` to the other at ``--rate`` lines/s, on a fixed schedule that
  never pauses, not around the kills either;
* ``fieldgate run`` as a child process with its own store; once its log says the port is open it
  is killed (SIGKILL) at a random moment 0.5-2.5 s later (``--alive``) and started again at once,
  until ``--kills`` kills or the mode's share of ``--seconds`` is used; a last run is stopped
  with SIGTERM after every line reached the store (a check of the counting: it must lose none);
* then the store is opened read-only (sqlite3) and every line written is looked up.

Lines are counted in two groups. **Alive**: written after the daemon's "port_opened" log line was
seen and before the kill was sent (the writer and the killer share one event loop, so the order is
exact): the kill's cost. **Down**: written between a kill and the next "port_opened" seen: the
daemon was not reading (they wait in the pty and are mostly flushed by the next open), reported
separately; they say nothing about commit grouping.

Modes (``--modes``, comma-separated; the time budget is split between them):

* ``grouped``: the store's group commit as configured (default ``commit_interval_ms`` 250, or
  ``--commit-interval-ms``); with ``--prompt-via config`` the source also gets
  ``commit = "grouped"``;
* ``interval:N``: grouped, ``[store] commit_interval_ms = N`` (N=1 approximates prompt commits);
* ``prompt``: the serial source's readings go in with ``Store.ingest(..., prompt=True)``. With
  ``--prompt-via shim`` (default) the child process wraps ``Store.ingest`` to pass
  ``prompt=True`` before running the daemon (this config has one source, so this is exactly the
  app.py wiring for line sources); with ``--prompt-via config`` the source gets
  ``commit = "prompt"`` in its config (needs the config field and app.py wiring).

Figures are printed, never asserted; exit status 1 when the SIGTERM check lost a line, 2 when a
daemon did not start (its last log lines are printed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.daemon import Daemon

SERIES = "serialkill.n"

#: Run in the child with ``python -c``: the daemon, with every Store.ingest made prompt.
PROMPT_SHIM = """\
import sys
from gateway.store import Store

_ingest = Store.ingest


async def ingest(self, readings, **kw):
    kw["prompt"] = True
    return await _ingest(self, readings, **kw)


Store.ingest = ingest
print('{"event": "prompt_shim_installed"}', flush=True)
from gateway.__main__ import main

sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Mode:
    name: str
    prompt: bool = False
    commit_interval_ms: int | None = None


@dataclass
class Run:
    """One daemon life: lines ``alive_from <= n < alive_to`` were written while it was reading."""

    alive_from: int
    alive_to: int = -1
    killed: bool = True


@dataclass
class Outcome:
    mode: Mode
    runs: list[Run] = field(default_factory=list)
    #: Line numbers written while no daemon had the port open (after a kill, before the open).
    down: list[range] = field(default_factory=list)
    written: int = 0
    unwritten: int = 0
    stored: set[int] = field(default_factory=set)
    seconds: float = 0.0

    def lost_in(self, lines: range) -> int:
        return sum(1 for n in lines if n not in self.stored)

    def per_kill(self) -> list[int]:
        return [self.lost_in(range(r.alive_from, r.alive_to)) for r in self.runs if r.killed]

    def lost_from_kill(self) -> list[int]:
        """Where the lost alive lines were: 1 is the last line written before its kill."""
        return sorted(
            r.alive_to - n
            for r in self.runs
            if r.killed
            for n in range(r.alive_from, r.alive_to)
            if n not in self.stored
        )

    def alive_lines(self, *, killed: bool) -> int:
        return sum(r.alive_to - r.alive_from for r in self.runs if r.killed == killed)

    def final_lost(self) -> int:
        return sum(self.lost_in(range(r.alive_from, r.alive_to)) for r in self.runs if not r.killed)


class Writer:
    """Numbered lines to the logger end of the pty pair at ``rate`` per second, on a fixed
    schedule (line n is due at start + n/rate), whatever the daemon is doing."""

    def __init__(self, path: Path, rate: float) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.rate = rate
        self.next = 0  # the number of the next line: lines 0..next-1 were written (or tried)
        self.unwritten = 0  # the pty did not take them (full: nobody reading for long)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="serial-kill-writer")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            line = f"{self.next},{time.time_ns() // 1_000_000}\n".encode("ascii")
            try:
                if os.write(self.fd, line) != len(line):
                    self.unwritten += 1
            except BlockingIOError:
                self.unwritten += 1
            self.next += 1
            await asyncio.sleep(max(0.0, start + self.next / self.rate - loop.time()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        os.close(self.fd)


class ChildDaemon(Daemon):
    """``fieldgate run`` in a child process, optionally with the prompt shim."""

    def __init__(self, config: Path, *, shim: bool) -> None:
        super().__init__(config, env={"PYTHONUNBUFFERED": "1"})
        self.shim = shim

    async def start(self) -> None:
        head = ["-c", PROMPT_SHIM] if self.shim else ["-m", "gateway"]
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *head,
            "run",
            "--config",
            str(self.config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        self._reader = asyncio.create_task(self._read(), name="daemon-reader")


def render(mode: Mode, db: Path, port: Path, prompt_via: str) -> str:
    interval = (
        ""
        if mode.commit_interval_ms is None
        else f"commit_interval_ms = {mode.commit_interval_ms}\n"
    )
    commit = ""
    if prompt_via == "config":
        commit = f'commit = "{"prompt" if mode.prompt else "grouped"}"\n'
    return f"""# Generated by bench/serial_kill.py ({mode.name}).
[store]
path = "{db}"
{interval}
[health]
enabled = false

[log]
format = "json"
level = "info"

[clock]
trust = "always"

[[sources]]
name = "logger"
type = "serial_lines"
port = "{port}"
baudrate = 115200
reconnect_min_s = 0.1
reconnect_max_s = 0.5
series_prefix = "serialkill."
{commit}  [sources.parser]
  kind = "delimited"
  columns = ["n", "t"]
  [sources.timestamp]
  field = "t"
  format = "epoch_ms"
"""


def stored_lines(db: Path) -> set[int]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT r.value FROM readings r JOIN series s ON s.id = r.series WHERE s.name = ?",
            (SERIES,),
        ).fetchall()
    finally:
        con.close()
    return {int(v) for (v,) in rows}


def line_stored(db: Path, n: int) -> bool:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
        try:
            row = con.execute(
                "SELECT 1 FROM readings r JOIN series s ON s.id = r.series "
                "WHERE s.name = ? AND r.value = ?",
                (SERIES, float(n)),
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return row is not None


@contextlib.contextmanager
def pty_pair(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """socat's two linked ptys: yields (logger end, daemon end) once both links exist."""
    logger_end, daemon_end = workdir / "ttyLOGGER", workdir / "ttyGATEWAY"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={logger_end}", f"pty,raw,echo=0,link={daemon_end}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not (logger_end.exists() and daemon_end.exists()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("socat did not make its ptys")
            time.sleep(0.01)  # another process makes the links
        yield logger_end, daemon_end
    finally:
        proc.terminate()
        proc.wait(timeout=5)


async def run_mode(
    mode: Mode,
    args: argparse.Namespace,
    *,
    workdir: Path,
    budget_s: float,
    rng: random.Random,
    say: Callable[[str], None],
) -> Outcome:
    out = Outcome(mode)
    mdir = workdir / mode.name.replace(":", "-")
    mdir.mkdir(parents=True, exist_ok=True)
    db = mdir / "store.db"
    started = time.monotonic()
    with pty_pair(mdir) as (logger_end, daemon_end):
        config = mdir / "fieldgate.toml"
        config.write_text(render(mode, db, daemon_end, args.prompt_via))
        shim = mode.prompt and args.prompt_via == "shim"
        writer = Writer(logger_end, args.rate)
        writer.start()
        loop = asyncio.get_running_loop()
        down_from = 0
        try:
            while True:
                daemon = ChildDaemon(config, shim=shim)
                await daemon.start()
                try:
                    if shim:
                        await daemon.wait_event("prompt_shim_installed", timeout=30)
                    await daemon.wait_event("port_opened", timeout=30)
                except (AssertionError, TimeoutError):
                    await daemon.aclose()
                    raise RuntimeError(
                        f"daemon did not open the port: {daemon.raw[-10:]}"
                    ) from None
                run = Run(alive_from=writer.next)
                out.down.append(range(down_from, run.alive_from))
                out.runs.append(run)
                elapsed = time.monotonic() - started
                kills_done = sum(1 for r in out.runs[:-1] if r.killed)
                last = elapsed + args.alive[1] + 3 > budget_s or (
                    args.kills is not None and kills_done >= args.kills
                )
                if not last:
                    await asyncio.sleep(rng.uniform(*args.alive))  # a random moment to kill at
                    daemon.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
                    run.alive_to = down_from = writer.next
                    await daemon.kill()  # reap it
                    continue
                # The last life: run a little, stop writing, wait for the last line to be stored,
                # then a clean stop. Every line of this life must be in the store.
                await asyncio.sleep(args.alive[1])
                await writer.stop()
                run.alive_to = writer.next
                run.killed = False
                deadline = loop.time() + 10
                while not line_stored(db, writer.next - 1) and loop.time() < deadline:
                    await asyncio.sleep(0.05)  # another process commits: poll the file
                await daemon.terminate()
                break
        finally:
            with contextlib.suppress(Exception):
                await writer.stop()
    out.written = writer.next
    out.unwritten = writer.unwritten
    out.stored = stored_lines(db)
    out.seconds = time.monotonic() - started
    say(
        f"  {mode.name}: {len(out.per_kill())} kills in {out.seconds:.0f} s, "
        f"{out.written} lines written"
    )
    return out


def summarise(out: Outcome, rate: float) -> list[str]:
    lost = out.per_kill()
    alive_killed = out.alive_lines(killed=True)
    down_lines = sum(len(r) for r in out.down)
    down_lost = sum(out.lost_in(r) for r in out.down)
    mean = statistics.fmean(lost) if lost else float("nan")
    dist = ", ".join(f"{k}:{lost.count(k)}" for k in sorted(set(lost)))
    return [
        f"{out.mode.name}",
        f"  kills {len(lost)}; alive lines {alive_killed} "
        f"({alive_killed / max(1, len(lost)):.1f} per life at {rate:g}/s)",
        f"  lost per kill: mean {mean:.2f}, max {max(lost, default=0)}, total {sum(lost)} "
        f"(lost count:kills {dist})",
        f"  lost lines, counted back from their kill (1: the last line before it): "
        f"{dict(sorted(Counter(out.lost_from_kill()).items()))}",
        f"  written while down: {down_lines}, of which lost {down_lost} "
        f"(not reading: the next open flushes the port)",
        f"  last life stopped with SIGTERM: {out.alive_lines(killed=False)} lines, "
        f"lost {out.final_lost()}",
        *([f"  the pty refused {out.unwritten} writes"] if out.unwritten else []),
    ]


def parse_modes(args: argparse.Namespace) -> list[Mode]:
    if args.prompt is not None:
        names = ["prompt" if args.prompt else "grouped"]
    else:
        names = [m.strip() for m in args.modes.split(",") if m.strip()]
    modes = []
    for name in names:
        if name == "grouped":
            modes.append(Mode(name, commit_interval_ms=args.commit_interval_ms))
        elif name == "prompt":
            modes.append(Mode(name, prompt=True, commit_interval_ms=args.commit_interval_ms))
        elif name.startswith("interval:"):
            modes.append(Mode(name, commit_interval_ms=int(name.split(":", 1)[1])))
        else:
            raise SystemExit(f"unknown mode {name!r}: grouped, prompt or interval:N")
    return modes


async def main(args: argparse.Namespace) -> int:
    if shutil.which("socat") is None:
        print("needs socat (apt install socat)", file=sys.stderr)
        return 2
    modes = parse_modes(args)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="fg-serkill-"))
    rng = random.Random(args.seed)
    print(
        f"serial_kill: modes {', '.join(m.name for m in modes)}; {args.rate:g} lines/s; "
        f"{args.seconds:g} s budget; seed {args.seed}; workdir {workdir}",
        flush=True,
    )
    outcomes = []
    for mode in modes:
        try:
            outcomes.append(
                await run_mode(
                    mode,
                    args,
                    workdir=workdir,
                    budget_s=args.seconds / len(modes),
                    rng=rng,
                    say=lambda line: print(line, flush=True),
                )
            )
        except RuntimeError as exc:
            print(f"error in mode {mode.name}: {exc}", file=sys.stderr)
            return 2
    print()
    for out in outcomes:
        print("\n".join(summarise(out, args.rate)))
    bad = [o.mode.name for o in outcomes if o.final_lost()]
    if bad:
        print(f"COUNTING CHECK FAILED: a clean stop lost lines in {', '.join(bad)}")
        return 1
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/serial_kill.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="time budget, all modes (60)")
    p.add_argument("--rate", type=float, default=5.0, help="lines per second (5)")
    p.add_argument("--kills", type=int, default=None, help="kills per mode (default: budget)")
    p.add_argument(
        "--alive",
        type=float,
        nargs=2,
        default=(0.5, 2.5),
        metavar=("MIN", "MAX"),
        help="kill this long after the port opened, uniform (0.5 2.5 s)",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--modes",
        default="grouped,prompt",
        help="comma-separated: grouped, prompt, interval:N (grouped,prompt)",
    )
    p.add_argument(
        "--prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one mode only: prompt (--prompt) or grouped (--no-prompt)",
    )
    p.add_argument(
        "--prompt-via",
        choices=["shim", "config"],
        default="shim",
        help="shim: wrap Store.ingest in the child (works today); config: "
        'commit = "prompt"/"grouped" in the source (needs the app.py wiring)',
    )
    p.add_argument(
        "--commit-interval-ms",
        type=int,
        default=None,
        help="[store] commit_interval_ms for grouped and prompt modes",
    )
    p.add_argument("--workdir", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
