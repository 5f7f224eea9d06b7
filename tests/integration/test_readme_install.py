"""The README's install steps, run in order as written, in a temporary root (issue 15).

The commands come from README.md itself (the ``sh`` block under "Install on Raspberry Pi OS"),
so the README and this test cannot drift apart. Each line is split at ``&&``, ``sudo`` is dropped
and every absolute path is moved into ``tmp_path``: ``/etc/`` and ``/var/lib/`` into the temporary
root, ``/opt/fieldgate`` onto this checkout (its ``.venv/bin`` onto the venv running the tests).
The placeholder ``<token>`` becomes a test token. ``install -o/-g`` lose their owner and group
(the ``fieldgate`` user is not created here). The defaults the commands rely on are the root's
too: ``$FIELDGATE_CONFIG`` is the root's /etc/fieldgate/fieldgate.toml and ``$STATE_DIRECTORY``
its /var/lib/fieldgate (the store's default directory).

Steps that need root, the network or a running systemd are not run, each for the reason in
:data:`NOT_RUN`; a command this test does not know fails it, so a new README step is either run
here or given a reason. ``systemctl enable --now fieldgate`` is done the way systemd would from
the installed unit file: its ``LoadCredential=`` lines copied into a ``$CREDENTIALS_DIRECTORY``,
``StateDirectory=``, ``ExecStartPre=`` run and ``ExecStart=`` started with ``$NOTIFY_SOCKET``,
waiting for its ``READY=1`` (``Type=notify``). The one departure: the daemon's health port is 0
(``FIELDGATE_HEALTH__PORT``), as 8080 may be taken on a shared machine, and the ``curl`` step is
pointed at the port it got. Every step that runs must exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HEADING = "## Install on Raspberry Pi OS"
TOKEN = "readme-install-token-15"

#: Commands (after ``sudo``) that are not run here, and why.
NOT_RUN = {
    "apt-get": "installs system packages (root, network)",
    "git": "clones the repository: this checkout stands for /opt/fieldgate",
    "bash .ci/setup": "builds the venv: the venv running this test is its result",
    "useradd": "creates a system user (root)",
    "systemctl daemon-reload": "systemd reads unit files: the next step reads it itself",
    "journalctl": "follows the journal (journald)",
}


def install_commands() -> list[str]:
    """The README's install block: one command per ``&&`` part, comments and ``sudo`` gone."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert HEADING in text, f"README.md has no {HEADING!r} section"
    block = re.search(r"```sh\n(.*?)```", text.split(HEADING, 1)[1], re.S)
    assert block is not None, "the install section has no ```sh block"
    commands = []
    for raw in block.group(1).splitlines():
        line = re.sub(r"\s+#\s.*$", "", raw).strip()
        if not line:
            continue
        # The comment really was one (not a # inside quotes): the words are unchanged.
        assert shlex.split(line) == shlex.split(raw, comments=True), raw
        for part in re.split(r"\s+&&\s+", line):
            commands.append(part.removeprefix("sudo ").strip())
    return commands


@dataclass
class Root:
    """The temporary root and what the steps have left in it."""

    path: Path
    cwd: Path = field(default_factory=Path.cwd)
    service: Service | None = None

    def rewrite(self, command: str) -> str:
        subs = {
            "/opt/fieldgate/.venv/bin/": f"{VENV_BIN}/",
            "/opt/fieldgate": str(REPO),
            "/etc/": f"{self.path}/etc/",
            "/var/lib/": f"{self.path}/var/lib/",
            "<token>": TOKEN,
        }
        rx = re.compile("|".join(re.escape(k) for k in sorted(subs, key=len, reverse=True)))
        return rx.sub(lambda m: subs[m.group(0)], command)

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "STATE_DIRECTORY")
        }
        env["FIELDGATE_CONFIG"] = f"{self.path}/etc/fieldgate/fieldgate.toml"
        env["STATE_DIRECTORY"] = f"{self.path}/var/lib/fieldgate"
        return env

    async def sh(self, command: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            ["sh", "-c", command],
            cwd=self.cwd,
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )


class Service:
    """``systemctl enable --now`` of the installed unit, done as systemd does the parts that
    matter here: credentials, state directory, ExecStartPre, ExecStart with sd_notify."""

    def __init__(self, root: Root) -> None:
        self.root = root
        unit = root.path / "etc/systemd/system/fieldgate.service"
        assert unit.exists(), "the README installs the unit before starting it"
        self.keys: dict[str, list[str]] = {}
        section = ""
        for line in unit.read_text(encoding="utf-8").splitlines():
            if line.startswith("["):
                section = line.strip()
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                k, v = line.split("=", 1)
                self.keys.setdefault(k.strip(), []).append(root.rewrite(v.strip()))
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None
        self._lines = asyncio.Condition()
        self._tmp = tempfile.TemporaryDirectory(prefix="fg-notify-")  # short: AF_UNIX path limit

    def env(self) -> dict[str, str]:
        env = self.root.env()
        del env["FIELDGATE_CONFIG"]  # the unit passes --config
        creds = self.root.path / "run/credentials/fieldgate.service"
        creds.mkdir(parents=True, exist_ok=True)
        for spec in self.keys.get("LoadCredential", []):
            name, source = spec.split(":", 1)
            shutil.copyfile(source, creds / name)
        [state] = self.keys["StateDirectory"]
        state_dir = self.root.path / "var/lib" / state
        state_dir.mkdir(parents=True, exist_ok=True)
        env |= {
            "CREDENTIALS_DIRECTORY": str(creds),
            "STATE_DIRECTORY": str(state_dir),
            "NOTIFY_SOCKET": f"{self._tmp.name}/notify",
            "FIELDGATE_HEALTH__PORT": "0",
        }
        return env

    async def start(self) -> None:
        env = self.env()
        for pre in self.keys.get("ExecStartPre", []):
            out = await asyncio.to_thread(
                subprocess.run, shlex.split(pre), env=env, capture_output=True, text=True
            )
            assert out.returncode == 0, f"ExecStartPre={pre}: {out.stdout}{out.stderr}"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(env["NOTIFY_SOCKET"])
        notify.setblocking(False)
        [start] = self.keys["ExecStart"]
        argv = shlex.split(start)
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read(), name="unit-stdout")
        try:
            ready = asyncio.create_task(self._ready(notify), name="sd-notify")
            exited = asyncio.create_task(self.proc.wait(), name="unit-exit")
            async with asyncio.timeout(60):
                await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
            for t in (ready, exited):
                t.cancel()
            await asyncio.gather(ready, exited, return_exceptions=True)
            assert self.proc.returncode is None, f"ExecStart= exited: {self.events[-10:]}"
        finally:
            notify.close()

    @staticmethod
    async def _ready(sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while b"READY=1" not in (await loop.sock_recv(sock, 4096)).split(b"\n"):
            pass

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "non_json", "text": line.decode(errors="replace")}
            async with self._lines:
                self.events.append(event)
                self._lines.notify_all()
        async with self._lines:
            self._lines.notify_all()

    async def health_netloc(self) -> str:
        async with asyncio.timeout(30), self._lines:
            while True:
                for e in self.events:
                    if e.get("event") == "health_listening":
                        return urlsplit(str(e["url"])).netloc
                assert self._reader is not None and not self._reader.done(), self.events
                await self._lines.wait()  # the next line the service logs

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            rc = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        self._tmp.cleanup()
        return rc

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._tmp.cleanup()


@contextlib.asynccontextmanager
async def temporary_root(tmp_path: Path) -> AsyncIterator[Root]:
    """A root with what a fresh Debian box has where the README writes."""
    path = tmp_path / "root"
    for d in ("etc/systemd/system", "var/lib", "run"):
        (path / d).mkdir(parents=True)
    root = Root(path)
    try:
        yield root
    finally:
        if root.service is not None:
            await root.service.kill()


async def run_step(root: Root, command: str) -> tuple[str, subprocess.CompletedProcess[str] | None]:
    """Run one README command; returns what it was and its result (None: not run)."""
    words = shlex.split(command)
    for prefix, why in NOT_RUN.items():
        if words[: len(prefix.split())] == prefix.split():
            return f"not run ({why})", None
    if words[:2] == ["cd", "/opt/fieldgate"]:
        root.cwd = REPO
        return "cd into this checkout", None
    if words == ["systemctl", "enable", "--now", "fieldgate"]:
        root.service = Service(root)
        await root.service.start()
        return "service started from the installed unit", None
    rewritten = root.rewrite(command)
    if words[0] == "install":
        rewritten = re.sub(r"\s-[og]\s+\S+", "", rewritten)  # owner/group: the user is not made
    elif words[0] == "curl":
        assert root.service is not None, "curl before the service was started"
        url = f"http://{await root.service.health_netloc()}"
        rewritten = rewritten.replace("localhost:8080", url)
        if shutil.which("curl") is None:  # the same GET where curl is not installed
            get = (
                "import sys, urllib.request as u; "
                "sys.stdout.buffer.write(u.urlopen(sys.argv[1]).read())"
            )
            rewritten = rewritten.replace("curl -s ", f"{sys.executable} -c {shlex.quote(get)} ")
    elif not (words[0] == "sh" or words[0].startswith("/opt/fieldgate/.venv/bin/fieldgate")):
        raise AssertionError(f"README install step not known to this test: {command!r}")
    return rewritten, await root.sh(rewritten)


async def test_the_readme_install_steps_work_as_written(tmp_path: Path) -> None:
    assert (VENV_BIN / "fieldgate").exists(), f"no fieldgate entry point in {VENV_BIN}"
    commands = install_commands()
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    async with temporary_root(tmp_path) as root:
        for command in commands:
            what, result = await run_step(root, command)
            print(f"$ {command}\n  -> {what}")
            if result is not None:
                assert result.returncode == 0, (
                    f"README step {command!r} (run as {what!r}) exited {result.returncode}:\n"
                    f"{result.stdout}{result.stderr}"
                )
                done[command] = result
        assert root.service is not None, "the README starts the service"
        assert await root.service.stop() == 0
        root.service = None
    etc = root.path / "etc/fieldgate"
    assert (etc / "credentials/qatium").read_text() == TOKEN
    assert (etc / "credentials/qatium").stat().st_mode & 0o777 == 0o600
    assert (etc / "fieldgate.toml").stat().st_mode & 0o777 == 0o640

    # check-config outside the unit: the credential is left to the service, nothing else wrong.
    check = next(r for c, r in done.items() if " check-config " in f" {c} ")
    assert (
        "note: uplinks[0].token: systemd credential 'qatium' is resolved by the service "
        "(LoadCredential=)"
    ) in check.stdout.splitlines(), check.stdout
    # queue beside the running service, without its credential.
    queue = next(r for c, r in done.items() if c.endswith(" queue"))
    assert "qatium" in queue.stdout, queue.stdout
    status = next(r for c, r in done.items() if c.startswith("curl "))
    assert "qatium" in json.loads(status.stdout)["uplinks"], status.stdout
