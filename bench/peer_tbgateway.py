"""The peer for the end-to-end benchmark: ThingsBoard IoT Gateway doing fieldgate's job.

Run it through the benchmark (the simulator, broker, subscriber and the counting are there)::

    .venv/bin/python bench/e2e.py run --gateway peer --units 200 --seconds 60

What bench/e2e.py uses::

    python = ensure_peer(venv_dir)                  # venv + pip install from PyPI, once (stamp)
    config_dir = write_peer_config(workdir, modbus_port=..., units=..., registers=...,
                                   poll_ms=..., mqtt_port=...)
    stub = asyncio.create_task(serve_thingsboard_stub(mqtt_port))   # REQUIRED, see below
    proc = start_peer(python, config_dir, log_path)  # own session; stop_peer(proc) kills it all
    # subscribe to PEER_TOPIC; for each message: parse_peer_message(payload)

The peer (https://github.com/thingsboard/thingsboard-gateway, PyPI ``thingsboard-gateway``,
validated with 3.8.5, pinned with its Modbus stack in PEER_REQUIREMENTS) and how it is set up:

* Started as ``python -m thingsboard_gateway.tb_gateway`` with ``TB_GW_CONFIG_DIR=<config dir>``
  and the workdir as cwd (it creates ``./logs`` there). It must get NO argument: any argv[1]
  switches on its hot reloader. The config dir must be writable: the gateway writes a connector
  ``id`` back into ``modbus.json`` and keeps ``connected_devices.json`` there. It handles SIGINT
  (clean stop); SIGTERM just ends it. One process, ~20 threads, no children.
* It needs a reply from "ThingsBoard" before it sends anything: after CONNACK its MQTT client
  (tb-mqtt-client 1.13.13) sends the RPC ``getSessionLimits`` on
  ``v1/devices/me/rpc/request/<n>`` and, on the first connection, the gateway counts as
  disconnected (nothing leaves its storage) until the reply arrives; there is no timeout for it.
  :func:`serve_thingsboard_stub` answers as a ThingsBoard server does (format of the ThingsBoard
  MQTT API docs) with ThingsBoard's defaults maxPayloadSize 65536 and maxInflightMessages 100,
  and no rate limits; the client applies 80 % of both: at most 80 QoS 1 messages in flight,
  52,428-byte messages (larger device entries would be split across messages).
* Modbus connector, one slave per unit, all to 127.0.0.1:modbus_port (tcp, framer ``socket``),
  ``unitId`` = unit, ``pollPeriod`` = poll_ms, device name ``unit<N>``, request timeout 5 s,
  no retries. The connector sends one request per configured datapoint and never merges
  neighbouring datapoints, but has "wide range" datapoints: ONE timeseries entry with
  ``address: "0-124"``, ``tag: "r${address}"``, ``type: 16uint``, ``objectsCount: 1`` yields the
  125 keys ``r0``..``r124`` (one per holding register, functionCode 3), read in chunks of
  ``maxRegistersPerRequest`` (default 16; set to 125 here): one read per poll.
  ``wide_range=False`` (``--one-per-register``) writes 125 separate entries instead (125
  requests per poll). All slaves on one host:port share ONE pymodbus client, i.e. one TCP
  connection, whose requests are serialised (pymodbus 3.9 TransactionManager lock). Each slave
  has an asyncio timer that queues a poll every pollPeriod whether or not the previous one has
  finished; polls, decoding and conversion all run on the connector's one event-loop thread.
  ``connectors=N`` splits the units over N connectors (N threads, loops and connections).
* Report strategy ``ON_RECEIVED`` at gateway, connector and device level: every value of every
  poll is reported (the documented default; the per-key cache it keeps costs CPU).
  ``DISABLED`` (top level only, undocumented, in the code) bypasses the report-strategy service
  and also sends everything, cheaper. 3.8 has no ``sendDataOnlyOnChange`` (replaced by report
  strategies) and its duplicate detector is commented out.
* ts is stamped when the connector CONVERTS, not when it polls: every 100 ms it converts what
  was read per device into ONE entry with ONE ts, and entries with the same ts are merged
  (``values.update``). Two polls of one device converted together therefore collide and the
  earlier poll vanishes without a log line. That happens when the event loop stalls, e.g.
  at start-up: the first poll of each device calls ``add_device``, which blocks the loop until
  the PUBACK of ``v1/gateway/connect`` (~45 ms each here: its paho socket has no TCP_NODELAY),
  so 200 devices stall polling ~9 s ("Timeout error while connecting to unitN" warnings).
* Storage ``sqlite``: events are queued in memory and written in batches (up to
  ``writing_batch_size`` or 100 ms), one transaction each, SQLite WAL with
  ``synchronous=NORMAL`` (hard-coded): a committed batch survives a process crash, not
  necessarily a power loss; what is still in the in-memory queues (connector, converter,
  storage write queue) dies with the process. (``file`` storage writes and flush()es each
  record but never fsyncs; ``memory`` keeps nothing.) The sender reads up to
  ``max_read_records_count`` events, publishes one QoS 1 message per device in the pack (that
  device's polls as a list of ``{ts, values}``), waits up to 1 s per message for its PUBACK and
  then deletes the pack whether or not the PUBACK came (tb-mqtt-client's
  ``TBPublishInfo.get`` ignores the timeout); when storage is empty it sleeps
  ``minPackSendDelayMS`` (50 ms). The database thread pre-reads the next pack while the
  sender reads and deletes, which can send a pack twice (whole polls duplicated).
* ThingsBoard connection: 127.0.0.1:mqtt_port, plain TCP, MQTT 5, security ``accessToken``
  (the token is the MQTT username), QoS 1. Off: remote configuration, remote shell,
  statistics (general and custom), gRPC, device filtering, device inactivity checks, latency
  debug mode, shared attribute sync on device connect, the manager socket, rate limits.
  Cannot be switched off: the subscriptions (``v1/devices/me/attributes``,
  ``v1/devices/me/attributes/response/+``, ``v1/devices/me/rpc/request/+``,
  ``v1/devices/me/rpc/response/+``, ``v1/gateway/attributes``,
  ``v1/gateway/attributes/response``, ``v1/gateway/rpc``), the ``getSessionLimits`` RPC, one
  ``v1/gateway/connect`` ({"device": "unit1", "type": "default"}) and one
  ``v1/gateway/attributes`` ({"unit1": {"connectorType": "modbus", "connectorName": ...}},
  which it receives back through its own subscription) per device when first polled, a
  shared-attributes request on ``v1/devices/me/attributes/request/<n>``, and its own error
  counters as telemetry on ``v1/devices/me/telemetry`` when it logs errors. Also an HTTPS
  update check to updates.thingsboard.io at start and hourly: :func:`start_peer` points
  HTTP(S)_PROXY at a closed local port so that fails at once.
* Telemetry goes to PEER_TOPIC ``v1/gateway/telemetry``, one message per device per pack,
  ``{"unit17": [{"ts": 1700000000000, "values": {"r0": 5, "r1": 17001, ...}}]}``.
  Subscribe to PEER_TOPIC only; :func:`parse_peer_message` also ignores anything not shaped
  like gateway telemetry for a ``unit<N>`` device, so '#' works too.
* Logs: the gateway's loggers at WARNING, files in ``<workdir>/logs`` and stdout; root (and so
  pymodbus, which warns "BinaryPayloadDecoder is deprecated" once per decoded register) at
  ERROR, as in the shipped logs.json.
* The venv also gets pyserial and pyserial-asyncio: without them the Modbus connector runs
  ``pip install`` at every start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEER_VERSION = "3.8.5"
PEER_REQUIREMENTS: tuple[str, ...] = (
    f"thingsboard-gateway=={PEER_VERSION}",
    "pymodbus==3.9.2",  # what its Modbus connector pins (it re-installs anything else)
    "pyserial==3.5",  # imported by the connector; missing -> pip install at every start
    "pyserial-asyncio==0.6",
)
PEER_TOPIC = "v1/gateway/telemetry"
RPC_REQUEST_PREFIX = "v1/devices/me/rpc/request/"
RPC_RESPONSE_PREFIX = "v1/devices/me/rpc/response/"
ATTRIBUTES_REQUEST_PREFIX = "v1/devices/me/attributes/request/"
ATTRIBUTES_RESPONSE_PREFIX = "v1/devices/me/attributes/response/"
# ThingsBoard's defaults (transport.mqtt max payload 64 KiB, 100 in flight), no rate limits.
SESSION_LIMITS: dict[str, Any] = {
    "maxPayloadSize": 65536,
    "maxInflightMessages": 100,
    "rateLimits": {},
    "gatewayRateLimits": {},
}
DEVICE_PREFIX = "unit"
_DEVICE_RE = re.compile(rf"^{DEVICE_PREFIX}(\d+)$")
_KEY_RE = re.compile(r"^r(\d+)$")
_STAMP = "fieldgate-peer.stamp"


def ensure_peer(venv_dir: Path) -> Path:
    """Create ``venv_dir`` and pip-install PEER_REQUIREMENTS from PyPI unless its stamp says so.

    Returns the venv's python. Idempotent: the stamp file holds the requirement list, so a
    changed pin reinstalls.
    """
    python = venv_dir / "bin" / "python"
    stamp = venv_dir / _STAMP
    wanted = "\n".join(PEER_REQUIREMENTS) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv_dir)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            *PEER_REQUIREMENTS,
        ],
        check=True,
    )
    stamp.write_text(wanted)
    return python


def _logs_config(log_dir: Path, level: str = "WARNING") -> dict[str, Any]:
    """The gateway's logs.json with every logger at ``level``, files in ``log_dir``."""
    fmt = "%(asctime)s.%(msecs)03d |%(levelname)s| %(name)s %(module)s:%(lineno)d %(message)s"
    handler_class = (
        "thingsboard_gateway.tb_utility.tb_rotating_file_handler.TimedRotatingFileHandler"
    )
    names = [
        "database",
        "service",
        "connector",
        "converter",
        "tb_connection",
        "storage",
        "extension",
    ]
    handlers: dict[str, Any] = {
        "consoleHandler": {
            "class": "logging.StreamHandler",
            "formatter": "LogFormatter",
            "level": level,
            "stream": "ext://sys.stdout",
        },
    }
    for name in names:
        handlers[f"{name}Handler"] = {
            "class": handler_class,
            "formatter": "LogFormatter",
            "level": level,
            "filename": str(log_dir / f"{name}.log"),
            "backupCount": 1,
            "interval": 3,
            "when": "D",
            "maxBytes": 0,
            "encoding": "utf-8",
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "LogFormatter": {
                "class": "logging.Formatter",
                "format": fmt,
                "datefmt": "%Y-%m-%d %H:%M:%S",
            }
        },
        "handlers": handlers,
        "loggers": {
            name: {
                "handlers": [f"{name}Handler", "consoleHandler"],
                "level": level,
                "propagate": False,
            }
            for name in names
        },
        # Third-party loggers (pymodbus warns "BinaryPayloadDecoder is deprecated" once per
        # decoded register) propagate to root: ERROR, as in the shipped logs.json.
        "root": {"level": "ERROR", "handlers": ["consoleHandler"]},
    }


def _slave(
    unit: int,
    *,
    modbus_port: int,
    registers: int,
    poll_ms: int,
    wide_range: bool,
    report_strategy: str,
) -> dict[str, Any]:
    if wide_range:
        timeseries: list[dict[str, Any]] = [
            {
                "tag": "r${address}",
                "type": "16uint",
                "functionCode": 3,
                "objectsCount": 1,
                "address": f"0-{registers - 1}",
                "maxRegistersPerRequest": min(registers, 125),
            }
        ]
    else:
        timeseries = [
            {"tag": f"r{i}", "type": "16uint", "functionCode": 3, "objectsCount": 1, "address": i}
            for i in range(registers)
        ]
    slave: dict[str, Any] = {
        "deviceName": f"{DEVICE_PREFIX}{unit}",
        "deviceType": "default",
        "type": "tcp",
        "host": "127.0.0.1",
        "port": modbus_port,
        "method": "socket",
        "unitId": unit,
        "pollPeriod": poll_ms,
        "timeout": 5,
        "retries": 0,
        "byteOrder": "BIG",
        "wordOrder": "BIG",
        "connectAttemptTimeMs": 500,
        "connectAttemptCount": 5,
        "waitAfterFailedAttemptsMs": 30000,
        "attributes": [],
        "timeseries": timeseries,
        "attributeUpdates": [],
        "rpc": [],
    }
    if report_strategy != "DISABLED":  # DISABLED exists only at the top level
        slave["reportStrategy"] = {"type": report_strategy}
    return slave


def write_peer_config(
    workdir: Path,
    *,
    modbus_port: int,
    units: Sequence[int],
    registers: int,
    poll_ms: int,
    mqtt_port: int,
    wide_range: bool = True,
    max_read_records: int = 1000,
    report_strategy: str = "ON_RECEIVED",
    connectors: int = 1,
) -> Path:
    """Write the peer's whole config dir (``<workdir>/config``) and return it.

    Also creates ``<workdir>/data`` (SQLite storage) and ``<workdir>/logs``. Settings and what
    they mean: module docstring. ``connectors`` > 1 splits the units into that many Modbus
    connectors (contiguous blocks), each with its own thread, event loop and TCP connection.
    """
    config_dir = workdir / "config"
    log_dir = workdir / "logs"
    data_dir = workdir / "data"
    for d in (config_dir, log_dir, data_dir):
        d.mkdir(parents=True, exist_ok=True)
    no_limit = "0:0,"
    entries: list[dict[str, str]] = []  # the connectors, filled below
    main = {
        "thingsboard": {
            "host": "127.0.0.1",
            "port": mqtt_port,
            "remoteShell": False,
            "remoteConfiguration": False,
            "latencyDebugMode": False,
            "statistics": {
                "enable": False,
                "enableCustom": False,
                "statsSendPeriodInSeconds": 3600,
                "customStatsSendPeriodInSeconds": 3600,
            },
            "deviceFiltering": {"enable": False},
            "maxPayloadSizeBytes": 65536,
            "minPackSendDelayMS": 50,
            "minPackSizeToSend": 500,
            "checkConnectorsConfigurationInSeconds": 3600,
            "handleDeviceRenaming": False,
            "syncDevicesSharedAttributesOnConnect": False,
            "managerEnabled": False,
            "security": {"type": "accessToken", "accessToken": "fieldgate-bench-peer"},
            "qos": 1,
            "reportStrategy": {"type": report_strategy},
            "checkingDeviceActivity": {"checkDeviceInactivity": False},
            "rateLimits": no_limit,
            "dpRateLimits": no_limit,
            "messagesRateLimits": no_limit,
            "deviceMessagesRateLimits": no_limit,
            "deviceRateLimits": no_limit,
            "deviceDpRateLimits": no_limit,
        },
        "storage": {
            "type": "sqlite",
            "data_file_path": str(data_dir) + os.sep,  # a directory: the file is data.db
            "messages_ttl_check_in_hours": 1,
            "messages_ttl_in_days": 7,
            "max_read_records_count": max_read_records,
            "writing_batch_size": 1000,
            "size_limit": 1024,
            "max_db_amount": 10,
            "oversize_check_period": 1,
        },
        "grpc": {"enabled": False},
        "connectors": entries,
    }
    units = list(units)
    n = max(1, min(connectors, len(units)))
    for i in range(n):
        name, file = ("Modbus", "modbus.json") if n == 1 else (f"Modbus{i}", f"modbus{i}.json")
        block = units[i * len(units) // n : (i + 1) * len(units) // n]
        modbus: dict[str, Any] = {
            "name": name,
            "logLevel": "WARNING",
            "enableRemoteLogging": False,
            "master": {
                "slaves": [
                    _slave(
                        u,
                        modbus_port=modbus_port,
                        registers=registers,
                        poll_ms=poll_ms,
                        wide_range=wide_range,
                        report_strategy=report_strategy,
                    )
                    for u in block
                ]
            },
        }
        if report_strategy != "DISABLED":
            modbus["reportStrategy"] = {"type": report_strategy}
        entries.append({"type": "modbus", "name": name, "configuration": file})
        (config_dir / file).write_text(json.dumps(modbus, indent=2))
    (config_dir / "tb_gateway.json").write_text(json.dumps(main, indent=2))
    (config_dir / "logs.json").write_text(json.dumps(_logs_config(log_dir), indent=2))
    (config_dir / "connected_devices.json").unlink(missing_ok=True)  # from an earlier run
    return config_dir


def start_peer(python: Path, config_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the peer in its own session (:func:`stop_peer`, or ``os.killpg(proc.pid, sig)``).

    cwd is the config dir's parent (the workdir); stdout and stderr go to ``log_path``. The
    update check's HTTPS request is sent to a closed local port (it fails at once).
    """
    env = {
        **os.environ,
        "TB_GW_CONFIG_DIR": str(config_dir),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("https_proxy", "http_proxy", "no_proxy", "mqtt_proxy", "all_proxy", "ALL_PROXY"):
        env.pop(var, None)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(python), "-m", "thingsboard_gateway.tb_gateway"],
            cwd=config_dir.parent,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_peer(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM the peer's process group, SIGKILL it if it is still there after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


def parse_peer_message(payload: bytes) -> Iterator[tuple[int, int, int, dict[int, int]]]:
    """Each device entry of one telemetry message: (unit, ts_ms, counter, {register: value}).

    The counter is register 0's value (``r0``), -1 if the entry lacks it (the peer splits an
    entry across messages only above its max payload size, 52,428 bytes with
    :data:`SESSION_LIMITS`). Anything not shaped like gateway telemetry for a ``unit<N>``
    device (connect, attributes, the gateway's own telemetry) yields nothing.
    """
    try:
        doc = json.loads(payload)
    except ValueError:
        return
    if not isinstance(doc, dict):
        return
    for device, entries in doc.items():
        m = _DEVICE_RE.match(device)
        if m is None or not isinstance(entries, list):
            continue
        unit = int(m.group(1))
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            ts, values = entry.get("ts"), entry.get("values")
            if not isinstance(ts, int) or not isinstance(values, dict):
                continue
            regs: dict[int, int] = {}
            for key, value in values.items():
                k = _KEY_RE.match(key)
                if k is not None and isinstance(value, int):
                    regs[int(k.group(1))] = value
            yield unit, ts, regs.get(0, -1), regs


def session_limits_reply(topic: str, payload: bytes) -> tuple[str, bytes] | None:
    """ThingsBoard's answer to one message the peer sends to it, if it needs one.

    ``getSessionLimits`` gets :data:`SESSION_LIMITS`; an attribute request gets an empty
    answer (no shared attributes). Anything else: None.
    """
    if topic.startswith(RPC_REQUEST_PREFIX):
        try:
            method = json.loads(payload).get("method")
        except (ValueError, AttributeError):
            return None
        if method != "getSessionLimits":
            return None
        req_id = topic.rsplit("/", 1)[1]
        return RPC_RESPONSE_PREFIX + req_id, json.dumps(SESSION_LIMITS).encode()
    if topic.startswith(ATTRIBUTES_REQUEST_PREFIX):
        req_id = topic.rsplit("/", 1)[1]
        return ATTRIBUTES_RESPONSE_PREFIX + req_id, b"{}"
    return None


async def serve_thingsboard_stub(
    mqtt_port: int, host: str = "127.0.0.1", ready: asyncio.Event | None = None
) -> None:
    """Answer the peer's requests to ThingsBoard (:func:`session_limits_reply`) until cancelled.

    Start it before (or right after) the peer: the peer sends nothing until it is answered.
    ``ready`` is set once subscribed.
    """
    import aiomqtt

    async with aiomqtt.Client(host, mqtt_port, identifier="fieldgate-bench-tb-stub") as client:
        await client.subscribe(RPC_REQUEST_PREFIX + "+", qos=1)
        await client.subscribe(ATTRIBUTES_REQUEST_PREFIX + "+", qos=1)
        if ready is not None:
            ready.set()
        async for msg in client.messages:
            reply = session_limits_reply(str(msg.topic), bytes(msg.payload))
            if reply is not None:
                await client.publish(reply[0], reply[1], qos=1)
