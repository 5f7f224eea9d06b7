"""The operator's commands as real processes: queue, dead-letters list and replay against a real
store file, and check-config's view of secrets, environment overrides and config mistakes.

``queue`` and ``dead-letters`` read only the store: they work on the recommended install (a
systemd credential in the config, no $CREDENTIALS_DIRECTORY outside the unit, no env secrets).
``check-config`` outside the unit notes what only the service can resolve and exits 0;
``--strict`` makes every reference resolve; ``run`` still fails on a missing one.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.config import load_config_text
from gateway.models import Reading
from gateway.store import Store

from .daemon import DAEMON_HEAD, Daemon

CONFIG = """
[store]
path = "{tmp}/fg.db"
[[uplinks]]
name = "qatium"
type = "qatium"
url = "http://127.0.0.1:1/ingest"
token = {{ env = "CLI_TEST_TOKEN" }}
[[uplinks.routes]]
series = "tank1.level"
asset = "Tank1"
metric = "level"
unit = "m"
"""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``fieldgate ARGS`` in a clean environment: ``env``, else the test token alone."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", **({"CLI_TEST_TOKEN": "x" * 8} if env is None else env)},
    )


async def seed(cfg_text: str) -> None:
    loaded = load_config_text(
        cfg_text.replace('{ env = "CLI_TEST_TOKEN" }', '{ value = "xxxxxxxx", plain_text = true }')
    )
    s = loaded.settings
    store = await Store.open(s.store, {"qatium": ["tank1.level"]})
    writer = asyncio.create_task(store.run())
    t = int(time.time() * 1000) - 90_000
    await store.ingest([Reading("tank1.level", t + i, float(i)) for i in range(10)], durable=True)
    lease = await store.lease("qatium", 3, live_first=False)
    assert lease is not None
    await store.complete(lease, [], {i.id: "unit 'x' is not valid" for i in lease.items})
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await store.aclose()


async def test_queue_and_dead_letters(tmp_path: Path) -> None:
    text = CONFIG.format(tmp=tmp_path)
    cfg = tmp_path / "fg.toml"
    cfg.write_text(text)
    await seed(text)

    out = cli("queue", "-c", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    q = json.loads(out.stdout)["uplinks"]["qatium"]
    assert (q["backlog"], q["dead_letters"]) == (7, 3)
    assert 60 < q["oldest_pending_s"] < 3600

    table = cli("queue", "-c", str(cfg))
    assert "qatium" in table.stdout and " 7 " in table.stdout

    listed = cli("dead-letters", "list", "qatium", "-c", str(cfg))
    assert listed.returncode == 0
    assert listed.stdout.count("unit 'x' is not valid") == 3

    replay = cli("dead-letters", "replay", "qatium", "-c", str(cfg))
    assert replay.returncode == 0 and replay.stdout.startswith("3 dead letters")
    q = json.loads(cli("queue", "-c", str(cfg), "--json").stdout)["uplinks"]["qatium"]
    assert (q["backlog"], q["dead_letters"]) == (10, 0)

    unknown = cli("dead-letters", "replay", "nosuch", "-c", str(cfg))
    assert unknown.returncode == 2 and "no uplink named 'nosuch'" in unknown.stderr


async def test_tools_never_touch_the_clean_shutdown_mark(tmp_path: Path) -> None:
    import sqlite3

    text = CONFIG.format(tmp=tmp_path)
    cfg = tmp_path / "fg.toml"
    cfg.write_text(text)
    await seed(text)
    with sqlite3.connect(tmp_path / "fg.db") as raw:  # as while a daemon is running
        raw.execute("UPDATE meta SET value = 0 WHERE key = 'clean'")
    assert cli("dead-letters", "replay", "qatium", "-c", str(cfg)).returncode == 0
    assert cli("queue", "-c", str(cfg)).returncode == 0
    with sqlite3.connect(tmp_path / "fg.db") as raw:
        assert raw.execute("SELECT value FROM meta WHERE key = 'clean'").fetchone()[0] == 0


# ----------------------------------------------------------------------------------------------
# Secrets: only what the command needs


@pytest.mark.parametrize(
    "token",
    ['{ credential = "qatium" }', '{ env = "CLI_TEST_TOKEN" }', '{ file = "/nonexistent/qt" }'],
    ids=["credential", "env", "file"],
)
async def test_queue_and_dead_letters_need_no_secret(tmp_path: Path, token: str) -> None:
    text = CONFIG.format(tmp=tmp_path)
    await seed(text)
    cfg = tmp_path / "fg.toml"
    cfg.write_text(text.replace('{ env = "CLI_TEST_TOKEN" }', token))
    bare: dict[str, str] = {}  # no $CREDENTIALS_DIRECTORY, no CLI_TEST_TOKEN
    # The token cannot be resolved here: anything that needs it still says so.
    assert cli("check-config", "--strict", str(cfg), env=bare).returncode == 78

    out = cli("queue", "-c", str(cfg), "--json", env=bare)
    assert out.returncode == 0, out.stderr
    q = json.loads(out.stdout)["uplinks"]["qatium"]
    assert (q["backlog"], q["dead_letters"]) == (7, 3)
    table = cli("queue", "-c", str(cfg), env=bare)
    assert table.returncode == 0 and "qatium" in table.stdout, table.stderr

    listed = cli("dead-letters", "list", "qatium", "-c", str(cfg), env=bare)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("unit 'x' is not valid") == 3
    replay = cli("dead-letters", "replay", "qatium", "-c", str(cfg), env=bare)
    assert replay.returncode == 0 and replay.stdout.startswith("3 dead letters"), replay.stderr
    # None left: it says so (not an empty answer that looks like a failure).
    empty = cli("dead-letters", "list", "qatium", "-c", str(cfg), env=bare)
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout == f"no dead letters of qatium in {tmp_path / 'fg.db'}\n"


CREDENTIAL_CONFIG = """
[store]
path = "{tmp}/fg.db"

[[sources]]
name = "tank"
type = "synthetic"
[[sources.series]]
name = "tank1.level"

[[uplinks]]
name = "qatium"
type = "qatium"
url = "http://127.0.0.1:1/ingest"
token = {{ credential = "qatium" }}
[[uplinks.routes]]
series = "tank1.level"
asset = "Tank1"
metric = "level"
unit = "m"

[[uplinks]]
name = "datacooee"
type = "datacooee"
url = "http://127.0.0.1:1/api"
organization_id = "org-1"
api_key = {{ env = "CLI_TEST_TOKEN" }}
[[uplinks.routes]]
series = "tank1.level"
input_pk = "sen0000000001"
"""
NOTE = (
    "note: uplinks[0].token: systemd credential 'qatium' is resolved by the service "
    "(LoadCredential=)"
)


@pytest.fixture
def credential_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "fieldgate.toml"
    cfg.write_text(CREDENTIAL_CONFIG.format(tmp=tmp_path))
    return cfg


def test_check_config_leaves_systemd_credentials_to_the_service(
    tmp_path: Path, credential_config: Path
) -> None:
    cfg = str(credential_config)
    out = cli("check-config", cfg)  # as the README's install step: no $CREDENTIALS_DIRECTORY
    assert out.returncode == 0, out.stderr
    assert NOTE in out.stdout.splitlines()
    assert out.stdout.splitlines()[-1] == f"{cfg}: ok (1 sources, 2 uplinks)"

    strict = cli("check-config", "--strict", cfg)
    assert strict.returncode == 78
    line = "  uplinks[0].token (line 15) -> credential 'qatium' needs $CREDENTIALS_DIRECTORY"
    assert any(x.startswith(line) for x in strict.stderr.splitlines()), strict.stderr

    # The service's view (ExecStartPre=, or a CI pipeline that has the secrets): resolved.
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "qatium").write_text("qatium-credential-value\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "CLI_TEST_TOKEN": "x" * 8}
    for args in (["check-config", cfg], ["check-config", "--strict", cfg]):
        ok = cli(*args, env=env)
        assert ok.returncode == 0, ok.stderr
        assert "note:" not in ok.stdout and "qatium-credential-value" not in ok.stdout


def test_check_config_still_fails_on_env_and_file_references(credential_config: Path) -> None:
    out = cli("check-config", str(credential_config), env={})  # CLI_TEST_TOKEN unset
    assert out.returncode == 78
    assert (
        "  uplinks[1].api_key (line 27) -> environment variable CLI_TEST_TOKEN is not set or empty"
    ) in out.stderr.splitlines()
    assert "uplinks[0].token" not in out.stderr  # the credential is no problem here


def test_run_still_needs_every_secret(credential_config: Path) -> None:
    out = cli("run", "-c", str(credential_config))
    assert out.returncode == 78
    assert "uplinks[0].token (line 15) -> credential 'qatium' needs" in out.stderr


def test_probe_outside_systemd_skips_what_needs_a_credential(credential_config: Path) -> None:
    out = cli("check-config", "--probe", str(credential_config))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "tank: nothing to probe for type 'synthetic'" in lines
    assert any(x.startswith("qatium: not probed: secret credential 'qatium'") for x in lines)
    assert "datacooee: nothing to probe for type 'datacooee'" in lines


# ----------------------------------------------------------------------------------------------
# Errors that name the thing to change


@pytest.mark.parametrize(
    ("var", "line"),
    [
        (
            "FIELDGATE_HEALTH__PORT=abc",
            "  FIELDGATE_HEALTH__PORT=abc -> Input should be a valid integer, unable to parse "
            "string as an integer",
        ),
        (
            "FIELDGATE_HEALTH__PROT=1",
            "  FIELDGATE_HEALTH__PROT=1 -> unknown override: [health] has no key 'prot' (known: "
            "enabled, host, port, stuck_after_s, console_token)",
        ),
        (
            "FIELDGATE_BOGUS__X=1",
            "  FIELDGATE_BOGUS__X=1 -> unknown override: the config has no key 'bogus' (known: "
            "store, health, log, clock, sources, uplinks)",
        ),
    ],
)
def test_environment_override_errors_name_the_variable(tmp_path: Path, var: str, line: str) -> None:
    cfg = tmp_path / "fieldgate.toml"
    cfg.write_text(CONFIG.format(tmp=tmp_path) + "\n[health]\nport = 8081\n")
    name, value = var.split("=", 1)
    out = cli("check-config", str(cfg), env={"CLI_TEST_TOKEN": "x" * 8, name: value})
    assert out.returncode == 78
    assert out.stderr.splitlines() == [f"{cfg}: configuration is invalid:", line]


BROKEN = """
[store]
path = "{tmp}/fg.db"

[[sources]]
name = "pump"
type = "synthetic"
[[sources.series]]
name = "pump.flow"

[[sources]]
name = "pump"
type = "synthetic"
[[sources.series]]
name = "pump.head"

[[sources]]
name = "well"

[[uplinks]]
name = "qatium"
type = "qatium"
url = "http://127.0.0.1:1/ingest"
token = {{ env = "CLI_TEST_TOKEN" }}
backoff_initial_s = 900
[[uplinks.routes]]
series = "pump.flow"
asset = "P1"
metric = "flow"
unit = "m^3/h"

[[uplinks]]
name = "vanda"
"""


def test_check_config_names_both_lines_the_types_and_the_backoff(tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.toml"
    cfg.write_text(BROKEN.format(tmp=tmp_path))
    out = cli("check-config", str(cfg))
    assert out.returncode == 78
    assert sorted(out.stderr.splitlines()[1:]) == sorted(
        [
            "  sources[2].type (line 17) -> type is missing: give one of synthetic, serial_lines, "
            "nmea, sdi12, modbus",
            "  uplinks[0] (line 20) -> backoff_initial_s (900 s) is above backoff_max_s (300 s): "
            "the first retry would wait longer than the longest; lower backoff_initial_s or "
            "raise backoff_max_s",
            "  uplinks[1].type (line 32) -> type is missing: give one of qatium, nilu, vanda, "
            "energydata, datacooee",
        ]
    )
    # With the types given, the repeated name is shown with both of its lines.
    fixed = BROKEN.format(tmp=tmp_path).replace(
        'name = "well"', 'name = "well"\ntype = "synthetic"\n[[sources.series]]\nname = "w.l"'
    )
    cfg.write_text(fixed.replace('name = "vanda"\n', "").replace("[[uplinks]]\n\n", ""))
    out = cli("check-config", str(cfg))
    assert "  sources[1].name (line 12) -> 'pump' is also the name of sources[0] (line 6)" in (
        out.stderr.splitlines()
    ), out.stderr


EMPTY_WARNINGS = [
    "no sources: the gateway will only deliver what the store already holds",
    "no uplinks: the store keeps every reading (capture only, up to [store] quota_bytes and "
    "retention_days); an uplink configured later starts with what is captured from then on",
]


async def test_an_empty_config_is_warned_about_by_check_config_and_run(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    cfg = tmp_path / "fieldgate.toml"
    cfg.write_text(DAEMON_HEAD.format(db=tmp_path / "fg.db"))
    out = cli("check-config", str(cfg), env={})
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == [f"warning: {w}" for w in EMPTY_WARNINGS]

    d = Daemon(cfg)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    warned = [e["detail"] for e in d.events if e.get("event") == "config_warning"]
    assert warned == EMPTY_WARNINGS
    assert await d.terminate() == 0
