"""A real mosquitto for tests, benchmarks and the demo: generated config, free port, kill, restart.

What a caller may rely on::

    ca = await make_test_ca(tmp_path / "ca")                  # openssl CLI, EC P-256, 2 days
    async with Mosquitto(tmp_path / "mq", tls=ca,
                         acl={"tok": ["readwrite #"], "reader": ["read #"]}) as mq:
        mq.port, mq.tls_port                                 # 127.0.0.1, OS-chosen free ports
        await mq.kill()                                      # SIGKILL, waits for the exit
        await mq.start()                                     # same ports, fresh broker
        await mq.stop()                                      # SIGTERM, waits for the exit
    # here the process is gone (killed if still running)

``start`` returns once every listener accepts TCP connections (polled with a deadline, never a
fixed sleep) and raises :class:`MosquittoError` with the broker's log if it exits or does not
come up. The broker runs with persistence off and logs to ``<directory>/mosquitto.log``;
``persistence=True`` keeps sessions, subscriptions and queued messages in ``<directory>`` across a
``stop``/``start`` (mosquitto saves them on SIGTERM; a ``kill`` loses what was not saved).

``acl`` maps a username to its ACL lines (``"read #"``, ``"write site/#"``, ``"readwrite a/b"``);
``acl_all`` holds lines for every client. Without ``passwords`` anonymous logins are allowed
(the username is still what the ACL matches: Energydata's token-as-username has no password);
with ``passwords`` only those users may connect. ``max_inflight_messages`` and
``max_queued_messages`` are mosquitto's own limits, which apply to messages the broker sends
*to* a client (mosquitto has no per-client incoming queue; see energydata_broker.py for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import structlog

log = structlog.get_logger(__name__)

DEFAULT_EXECUTABLE = "/usr/sbin/mosquitto"


class MosquittoError(RuntimeError):
    """The broker (or openssl) failed; the message carries the tail of its output."""


@dataclass(frozen=True, slots=True)
class TestCA:
    """A throw-away CA and one server certificate signed by it (SANs: the given hosts)."""

    __test__ = False  # not a pytest test class

    ca_cert: Path
    server_cert: Path
    server_key: Path


async def _run(*args: str, cwd: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise MosquittoError(f"{args[0]} {args[1]} failed: {out.decode(errors='replace')[-800:]}")


async def make_test_ca(
    directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), *, openssl: str = "openssl"
) -> TestCA:
    """Generate a CA and a server certificate for ``hosts`` in ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a test helper, microseconds
    sans = ",".join(
        f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts
    )
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth\n"
        f"subjectAltName={sans}\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    await _run(
        openssl,
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fieldgate test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    await _run(
        openssl,
        "req",
        *ec,
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        f"/CN={hosts[0]}",
        cwd=directory,
    )
    await _run(
        openssl,
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        cwd=directory,
    )
    return TestCA(directory / "ca.pem", directory / "server.pem", directory / "server.key")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto process with a generated config (module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TestCA | None = None,
        tls_port: int = 0,
        acl: Mapping[str, Sequence[str]] | None = None,
        acl_all: Sequence[str] = (),
        passwords: Mapping[str, str] | None = None,
        max_inflight_messages: int | None = None,
        max_queued_messages: int | None = None,
        persistence: bool = False,
        executable: str = DEFAULT_EXECUTABLE,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.directory = directory
        self.host = host
        self.tls = tls
        self._port = port
        self._tls_port = tls_port
        self.acl = dict(acl) if acl is not None else None
        self.acl_all = list(acl_all)
        self.passwords = dict(passwords) if passwords is not None else None
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.persistence = persistence
        self.executable = executable
        self.start_timeout_s = start_timeout_s
        self._proc: asyncio.subprocess.Process | None = None
        self.starts = 0

    @property
    def port(self) -> int:
        if not self._port:
            raise MosquittoError("mosquitto has not been started")
        return self._port

    @property
    def tls_port(self) -> int:
        if self.tls is None or not self._tls_port:
            raise MosquittoError("mosquitto has no TLS listener (pass tls=make_test_ca(...))")
        return self._tls_port

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    def log_text(self) -> str:
        try:
            return (self.directory / "mosquitto.log").read_text(errors="replace")
        except OSError:
            return ""

    def _write_config(self) -> Path:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        persist = (
            ["persistence true", f"persistence_location {d}/"]
            if self.persistence
            else ["persistence false"]
        )
        lines = [
            "per_listener_settings false",
            *persist,
            f"log_dest file {d / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            # Run as root, mosquitto would switch to user "mosquitto", which cannot read a
            # test's private directory.
            lines.append("user root")
        if self.passwords is not None:
            (d / "passwd").write_text("".join(f"{u}:{p}\n" for u, p in self.passwords.items()))
            lines += ["allow_anonymous false", f"password_file {d / 'passwd'}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl is not None or self.acl_all:
            acl_lines = [f"topic {line}" for line in self.acl_all]
            for user, entries in (self.acl or {}).items():
                acl_lines += [f"user {user}", *(f"topic {line}" for line in entries)]
            (d / "acl").write_text("\n".join(acl_lines) + "\n")
            lines.append(f"acl_file {d / 'acl'}")
        if self.max_inflight_messages is not None:
            lines.append(f"max_inflight_messages {self.max_inflight_messages}")
        if self.max_queued_messages is not None:
            lines.append(f"max_queued_messages {self.max_queued_messages}")
        lines.append(f"listener {self._port} {self.host}")
        if self.tls is not None:
            lines += [
                f"listener {self._tls_port} {self.host}",
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
            ]
        conf = d / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        if self.passwords is not None:
            conf.chmod(0o600)
        return conf

    async def start(self) -> None:
        """Start the broker (again on the same ports after a stop or kill)."""
        if self.running:
            raise MosquittoError("mosquitto is already running")
        if shutil.which(self.executable) is None:
            raise MosquittoError(f"{self.executable} not found")
        self._port = self._port or free_port(self.host)
        if self.tls is not None:
            self._tls_port = self._tls_port or free_port(self.host)
        conf = self._write_config()
        if self.passwords is not None:
            await _run("mosquitto_passwd", "-U", str(self.directory / "passwd"), cwd=self.directory)
        self._proc = await asyncio.create_subprocess_exec(
            self.executable,
            "-c",
            str(conf),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self.starts += 1
        try:
            for port in [self._port] + ([self._tls_port] if self.tls is not None else []):
                await self._until_accepting(port)
        except BaseException:
            await self.kill()
            raise
        log.info(
            "mosquitto_started",
            pid=self._proc.pid,
            port=self._port,
            tls_port=self._tls_port or None,
        )

    async def _until_accepting(self, port: int) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                _, writer = await asyncio.open_connection(self.host, port)
            except OSError:
                pass
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return
            if time.monotonic() > deadline:
                raise MosquittoError(
                    f"mosquitto not accepting on port {port} within "
                    f"{self.start_timeout_s} s:\n{self.log_text()[-1500:]}"
                )
            # Poll again shortly, or stop at once if the process exits (bad config, port taken).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.02)
            if proc.returncode is not None:
                raise MosquittoError(
                    f"mosquitto exited with {proc.returncode}:\n{self.log_text()[-1500:]}"
                )

    async def _signal(self, sig: int) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        await proc.wait()
        log.info("mosquitto_stopped", pid=proc.pid, signal=signal.Signals(sig).name)

    async def kill(self) -> None:
        """SIGKILL and wait: the broker vanishes mid-stream, as in a crash."""
        await self._signal(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM and wait (a clean broker shutdown)."""
        await self._signal(signal.SIGTERM)

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    async def aclose(self) -> None:
        await self.kill()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
