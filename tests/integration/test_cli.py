"""The operator's commands against a real store file: queue, dead-letters list and replay."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from gateway.config import load_config_text
from gateway.models import Reading
from gateway.store import Store

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


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        check=False,
        env={"CLI_TEST_TOKEN": "x" * 8, "PATH": "/usr/bin:/bin"},
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
