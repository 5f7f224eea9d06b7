"""The web console (gateway/console) in a real headless Chromium against a running daemon: every
source and uplink with the numbers /status has, plots with points, updates as the backlog moves,
no error in the browser's console; a daemon in trouble renders; beyond loopback it needs a token.

Needs Debian's ``chromium`` and ``chromium-driver`` (.ci/setup): missing, the test fails."""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from gateway.config import HealthConfig, SecretRef, load_config_text
from gateway.console.history import RECENT, History, SeriesLog, rates
from gateway.errors import ConfigError
from gateway.health import HealthServer
from gateway.models import Reading
from gateway.sandbox.qatium import QatiumEmulator

from .daemon import DAEMON_HEAD, Daemon

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "console-test-token-8125"
T = TypeVar("T")

SOURCES = """
[[sources]]
name = "tanks"
type = "synthetic"
interval_s = 2
[[sources.series]]
name = "tank1.level"
waveform = "random_walk"
min = 1
max = 5
"""

UPLINK = """
[[uplinks]]
name = "{name}"
type = "qatium"
url = "{url}/ingest"
token = {{ file = "{token}" }}
rate_limit_requests = 0
backoff_initial_s = {backoff}
backoff_max_s = {backoff}
[[uplinks.routes]]
series = "tank1.level"
asset = "Tank1"
metric = "level"
unit = "m"
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def qatium() -> AsyncIterator[QatiumEmulator]:
    async with QatiumEmulator(token=TOKEN, rate_limit=100_000) as emu:
        yield emu


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    for exe in (CHROMIUM, CHROMEDRIVER):  # no skip: CI installs both (.ci/setup)
        assert Path(exe).exists(), f"{exe} is missing: run .ci/setup (chromium, chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    opts.add_argument("--window-size=1100,1400")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


async def off(fn: Callable[..., T], *args: Any) -> T:
    """A blocking WebDriver call, off the event loop (the emulator and daemon reader run on it)."""
    return await asyncio.to_thread(fn, *args)


def write_token(tmp_path: Path, value: str) -> Path:
    p = tmp_path / f"{value}.token"
    p.write_text(value + "\n")
    p.chmod(0o600)
    return p


def digits(text: str) -> int:
    return int(re.sub(r"[^0-9]", "", text) or -1)


async def refreshes(driver: webdriver.Chrome) -> int:
    v = await off(driver.execute_script, "return document.body.dataset.refreshes || '0'")
    return int(v)


async def next_refresh(driver: webdriver.Chrome, timeout: float = 15) -> None:
    """Wait for the page's next refresh: its ``fg-refreshed`` event after the one seen now."""
    seen = await refreshes(driver)
    await off(driver.set_script_timeout, timeout)
    await off(
        driver.execute_async_script,
        "const seen = arguments[0], done = arguments[arguments.length - 1];"
        "if (+(document.body.dataset.refreshes || 0) > seen) { done(true); return; }"
        "document.addEventListener('fg-refreshed', () => done(true), {once: true});",
        seen,
    )


READ = """
const out = {};
for (const row of document.querySelectorAll("tr[data-uplink], tr[data-source]")) {
  const kind = row.dataset.uplink !== undefined ? "uplink" : "source";
  const name = row.dataset.uplink ?? row.dataset.source;
  for (const c of row.querySelectorAll("[data-k]")) {
    out[`${kind} ${name} ${c.dataset.k}`] = c.innerText;
  }
}
return out;
"""


def cells(driver: webdriver.Chrome) -> dict[str, str]:
    """Every table cell by "uplink|source <name> <key>", read in one go (the page re-renders)."""
    return dict(driver.execute_script(READ))


def cell(driver: webdriver.Chrome, kind: str, name: str, key: str) -> str:
    return cells(driver)[f"{kind} {name} {key}"].strip()


def page_numbers(driver: webdriver.Chrome, st: dict[str, Any]) -> dict[str, int]:
    shown = cells(driver)
    out = {}
    for n in st["uplinks"]:
        out[f"uplink {n} delivered"] = digits(shown[f"uplink {n} delivered"])
        out[f"uplink {n} backlog"] = digits(shown[f"uplink {n} backlog"])
    for n in st["sources"]:
        out[f"source {n} readings"] = digits(shown[f"source {n} readings"])
    return out


def status_numbers(st: dict[str, Any]) -> dict[str, int]:
    out = {}
    for n, u in st["uplinks"].items():
        out[f"uplink {n} delivered"] = u["delivered"]
        out[f"uplink {n} backlog"] = u["backlog"]
    for n, s in st["sources"].items():
        out[f"source {n} readings"] = s["readings"]
    return out


SHOWN_SERIES = """
const e = document.querySelector('tr[data-source="tanks"] [data-series="tank1.level"]');
return e ? e.dataset.value : null;
"""


def stored_last(db: Path, series: str, until_ms: int) -> float | None:
    """The store's last reading of ``series`` captured by ``until_ms``."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        row = conn.execute(
            "SELECT r.value FROM readings r JOIN series s ON s.id = r.series"
            " WHERE s.name = ? AND r.ts <= ? ORDER BY r.ts DESC, r.id DESC LIMIT 1",
            (series, until_ms),
        ).fetchone()
    return None if row is None else float(row[0])


def browser_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


async def test_console_in_chromium_matches_status(
    tmp_path: Path, qatium: QatiumEmulator, daemons: list[Daemon], browser: webdriver.Chrome
) -> None:
    token = write_token(tmp_path, TOKEN)
    config = tmp_path / "fieldgate.toml"
    config.write_text(
        DAEMON_HEAD.format(db=tmp_path / "fg.db")
        + SOURCES
        + UPLINK.format(name="qatium", url=qatium.url, token=token, backoff=0.2)
        # Its service never answers: backing off, its backlog grows with every reading.
        + UPLINK.format(
            name="witness", url=f"http://127.0.0.1:{closed_port()}", token=token, backoff=60
        )
    )
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    base = await d.health_url()
    async with httpx.AsyncClient(base_url=base) as client:
        await d.status_until(client, lambda st: st["uplinks"]["qatium"]["delivered"] > 0)
        await off(browser.get, base + "/")
        await next_refresh(browser)

        # Every source and uplink, with the numbers of /status (read right after the page; each
        # number matched at some refresh: they move while the test reads).
        st = (await client.get("/status")).json()
        assert set(st["uplinks"]) == {"qatium", "witness"} and set(st["sources"]) == {"tanks"}
        pending = set(status_numbers(st))
        last: tuple[dict[str, int], dict[str, int]] = ({}, {})
        for _ in range(20):
            shown = await off(page_numbers, browser, st)
            now = status_numbers((await client.get("/status")).json())
            pending -= {k for k in pending if shown[k] == now[k]}
            last = (shown, now)
            if not pending:
                break
            await next_refresh(browser)
        assert not pending, f"page and /status differ on {pending}: {last}"
        text = await off(lambda: browser.find_element(By.TAG_NAME, "body").text)
        assert "backing off" in text and "next try in" in text
        assert not re.search(r"\b1[6-9]\d{8}(\.\d+)?\b", text), "an epoch number on the page"

        # A plot with points: the history's samples plus the current values.
        pts = await off(
            browser.execute_script,
            "return Array.from(document.querySelectorAll('#p-backlog polyline'))"
            ".map(p => [p.dataset.name, p.getAttribute('points').trim().split(/\\s+/).length])",
        )
        assert dict(pts).keys() == {"qatium", "witness"}
        assert all(n >= 2 for _, n in pts), pts

        # Each series' last value under its source: the store's last reading of it when the
        # page's history was taken (retried: a reading may land between the two).
        db = tmp_path / "fg.db"
        for _ in range(8):
            shown_v = await off(browser.execute_script, SHOWN_SERIES)
            h = (await client.get("/history")).json()
            at_ms = int(h["t_epoch"][-1] * 1000)
            want = stored_last(db, "tank1.level", at_ms)
            if h["series"]["tanks"]["tank1.level"]["value"] == want and shown_v is not None:
                page_v = await off(browser.execute_script, SHOWN_SERIES)
                if page_v is not None and float(page_v) == want:
                    break
            await next_refresh(browser)
        else:
            raise AssertionError(f"page {shown_v} vs store {want}")

        # Choosing a series plots its recent values.
        await off(
            lambda: Select(browser.find_element(By.ID, "series-pick")).select_by_value(
                "tank1.level"
            )
        )
        for _ in range(10):  # the history is fetched every 10 s, the page refreshes every 2 s
            n = await off(
                browser.execute_script,
                "const p = document.querySelector('#p-series polyline');"
                "return p ? p.getAttribute('points').trim().split(/\\s+/).length : 0",
            )
            if n >= 2:
                break
            await next_refresh(browser)
        else:
            raise AssertionError("the chosen series was not plotted")

        # No plotted rate implies more readings in its window (at least 0.9 of a sample
        # interval) than the source made in all.
        h = (await client.get("/history")).json()
        made = h["sources"]["tanks"]["readings"][-1]
        bound = made * 60 / (0.9 * h["interval_s"])
        assert all(r is None or r <= bound for r in h["sources"]["tanks"]["readings_per_min"])
        label = await off(
            browser.execute_script, "return document.querySelector('#p-readings text').textContent"
        )
        assert digits(label) <= bound * 1.1 + 1, (label, made)

        # The page follows the backlog as it changes.
        before = digits(await off(cell, browser, "uplink", "witness", "backlog"))
        for _ in range(10):
            await next_refresh(browser)
            if digits(await off(cell, browser, "uplink", "witness", "backlog")) > before:
                break
        else:
            raise AssertionError("the page's backlog did not move in 10 refreshes")

    await off(browser.save_screenshot, str(tmp_path / "console.png"))
    assert (tmp_path / "console.png").stat().st_size > 5000
    assert await off(browser_errors, browser) == []


async def test_console_renders_a_daemon_in_trouble(
    tmp_path: Path, qatium: QatiumEmulator, daemons: list[Daemon], browser: webdriver.Chrome
) -> None:
    db = tmp_path / "fg.db"
    db.write_bytes(b"\x00garbage, not SQLite\x00" * 500)  # moved aside at start
    wrong = write_token(tmp_path, "not-the-token-0000")
    config = tmp_path / "fieldgate.toml"
    config.write_text(
        DAEMON_HEAD.format(db=db)
        + SOURCES
        + f"""
[[sources]]
name = "river"
type = "serial_lines"
port = "{tmp_path}/no-such-tty"
reconnect_min_s = 0.05
reconnect_max_s = 0.2
series_prefix = "river."
  [sources.parser]
  kind = "delimited"
  columns = ["time", "level"]
  [sources.timestamp]
  field = "time"
  format = "%Y-%m-%d %H:%M:%S"
"""
        + UPLINK.format(name="qatium", url=qatium.url, token=wrong, backoff=0.2)
    )
    d = Daemon(config)
    daemons.append(d)
    await d.start()
    await d.wait_event("gateway_ready")
    base = await d.health_url()
    async with httpx.AsyncClient(base_url=base) as client:
        st = await d.status_until(
            client,
            lambda st: (
                st["uplinks"]["qatium"]["state"] == "auth_failed"
                and st["sources"]["river"]["state"] != "ok"
                and st["sources"]["river"]["errors"] > 0
            ),
        )
        assert st["store"]["events"][0]["kind"] == "moved_aside"
        page = await client.get("/")
        assert page.status_code == 200 and "<script>" in page.text
        assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")
        await off(browser.get, base + "/")
        await next_refresh(browser)
        await next_refresh(browser)
        state = await off(cell, browser, "uplink", "qatium", "state")
        assert state == "auth failed"
        assert await off(cell, browser, "uplink", "qatium", "last_error") != "none"
        river = await off(cell, browser, "source", "river", "state")
        assert river == st["sources"]["river"]["state"], river
        events = await off(
            lambda: browser.find_elements(
                By.CSS_SELECTOR, '#store-events li[data-kind="moved_aside"]'
            )
        )
        assert len(events) == 1
        assert "moved aside" in await off(lambda: events[0].text)
    await off(browser.save_screenshot, str(tmp_path / "trouble.png"))
    assert await off(browser_errors, browser) == []


class Provider:
    def status(self) -> dict[str, Any]:
        store = {"captured_total": 7, "evicted_total": 0, "bytes": 4096, "quota_bytes": 1 << 20}
        return {
            "store": {**store, "buffered": 0, "free_disk_bytes": None},
            "clock": {"synchronized": True},
            "sources": {},
            "uplinks": {},
        }

    def health(self) -> tuple[bool, list[str]]:
        return True, []


def test_beyond_loopback_without_a_token_is_refused() -> None:
    for host in ("0.0.0.0", "192.168.1.20", "::", "gateway.local"):
        with pytest.raises(ConfigError) as err:
            load_config_text(f'[health]\nhost = "{host}"\n')
        assert "health.host" in str(err.value) and "console_token" in str(err.value)
        with pytest.raises(ConfigError):
            HealthServer(HealthConfig(host=host), Provider())
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        load_config_text(f'[health]\nhost = "{host}"\n')
    loaded = load_config_text(
        f'[health]\nhost = "0.0.0.0"\nconsole_token = {{ value = "{TOKEN}", plain_text = true }}\n'
    )
    assert loaded.settings.health.console_token is not None


async def test_with_a_token_every_route_but_health_needs_it() -> None:
    ref = SecretRef(value=TOKEN, plain_text=True)
    ref.bind(ref.resolve())
    cfg = HealthConfig(host="0.0.0.0", port=0, console_token=ref)
    async with (
        HealthServer(cfg, Provider()) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client,
    ):
        assert (await client.get("/health")).status_code == 200
        for path in ("/", "/status", "/history", "/metrics"):
            r = await client.get(path)
            assert r.status_code == 401, path
            assert TOKEN not in r.text
            r = await client.get(path, headers={"Authorization": "Bearer wrong-token"})
            assert r.status_code == 401, path
            r = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, path
            assert TOKEN not in r.text
            assert (await client.get(path, params={"token": TOKEN})).status_code == 200
        login = await client.get("/")
        assert 'type="password"' in login.text


def test_rates_span_a_sample_interval_not_the_sliver_before_now() -> None:
    # Samples every 10 s, then the current values 0.3 s after the last one, just after a
    # serial logger's burst: the old page drew (142 - 130) / 0.3 s = 2,400/min there.
    t = [0.0, 10.0, 20.0, 30.0, 40.0, 40.3]
    v: list[int | None] = [0, 30, 60, 100, 130, 142]
    r = rates(t, v, 9.0)
    assert r[0] is None
    assert r[1:5] == [180.0, 180.0, 240.0, 180.0]
    assert r[5] == round((142 - 100) / 10.3 * 60, 3)  # since the sample 10.3 s before
    assert all(x is None or x * 9.0 / 60 <= 142 for x in r)
    # A missing value (a source added by a reload) has no rate; a counter reset is not negative.
    assert rates([0.0, 10.0, 20.0], [None, 5, 0], 9.0) == [None, None, 0.0]


def test_history_serves_rates_and_bounded_series() -> None:
    h = History(interval_s=10.0)
    st = {"uplinks": {"u": {"backlog": 1, "delivered": 0}}, "sources": {"s": {"readings": 0}}}
    h.record(0.0, st)
    st2 = {"uplinks": {"u": {"backlog": 0, "delivered": 20}}, "sources": {"s": {"readings": 20}}}
    d = h.as_dict(h.sample(10.0, st2))
    assert d["uplinks"]["u"]["delivered_per_min"] == [None, 120.0]
    assert d["sources"]["s"]["readings_per_min"] == [None, 120.0]

    log = SeriesLog(max_series=2)
    log.note("a", [Reading("x", 1000, 1.5), Reading("y", 1000, "on"), Reading("z", 1000, 3)])
    log.note("a", [Reading("x", 500, 9.0)])  # older: not the last value
    for i in range(RECENT + 5):
        log.note("a", [Reading("x", 2000 + i * 1000, float(i))])
    assert log.last() == {
        "a": {
            "x": {"value": float(RECENT + 4), "ts_epoch": 2.0 + RECENT + 4},
            "y": {"value": "on", "ts_epoch": 1.0},
        }
    }
    rx = log.recent("x")
    assert rx is not None and len(rx["values"]) == RECENT
    assert rx["values"][-1] == RECENT + 4 and rx["t_epoch"] == sorted(rx["t_epoch"])
    ry = log.recent("y")
    assert ry is not None and ry["values"] == []
    assert log.recent("z") is None  # over the cap


def test_a_poll_noted_as_a_batch_leaves_the_log_as_its_readings_one_by_one() -> None:
    from gateway.models import ReadingBatch

    polls = [
        ReadingBatch(("x", "y", "z"), 1000, [1.5, "on", 3]),
        ReadingBatch(("x", "w"), 500, [9.0, True]),  # x older: not its last value
        ReadingBatch(("z", "x", "v"), 3000, [4, 2.5, 7.0]),  # the log is full: v not kept
        ReadingBatch(("v", "u"), 4000, [1, 2]),  # none of the kept series: nothing changes
    ]
    whole, single = SeriesLog(max_series=4), SeriesLog(max_series=4)
    for p in polls:
        whole.note("a", p)
        single.note("a", list(p))
    assert whole.last() == single.last()
    assert set(whole.last()["a"]) == {"x", "y", "z", "w"}
    assert whole.last()["a"]["x"] == {"value": 2.5, "ts_epoch": 3.0}
    for name in ("x", "y", "z", "w", "v"):
        assert whole.recent(name) == single.recent(name)
