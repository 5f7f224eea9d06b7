"""Config loading: every error named by its TOML path and line; secrets by reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import EX_CONFIG, KNOWN_SECRETS, load_config, load_config_text, locate
from gateway.errors import ConfigError
from gateway.sandbox.demo import DEMO_TOKENS

GOOD = """
[store]
path = "{tmp}/q.db"

[[sources]]
name = "tank"
type = "synthetic"
[[sources.series]]
name = "tank1.level"

[[uplinks]]
name = "qatium"
type = "qatium"
url = "http://127.0.0.1:1/ingest"
token = {{ file = "{tmp}/token" }}
[[uplinks.routes]]
series = "tank1.level"
asset = "T1"
metric = "level"
unit = "m"
"""


@pytest.fixture
def good(tmp_path: Path) -> str:
    (tmp_path / "token").write_text("s3cr3t-token-value\n")
    (tmp_path / "token").chmod(0o600)
    return GOOD.format(tmp=tmp_path)


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    return info.value.problems


def test_good_config_loads_and_resolves_the_secret_masked(good: str) -> None:
    loaded = load_config_text(good)
    secret = loaded.secret("uplinks[0].token")
    assert secret.reveal() == "s3cr3t-token-value"
    assert "s3cr3t" not in repr(secret) and "s3cr3t" not in str(secret)
    assert "s3cr3t" not in repr(loaded.settings)
    assert "s3cr3t-token-value" in KNOWN_SECRETS
    assert loaded.warnings == []


def test_every_error_is_listed_with_path_and_line(good: str) -> None:
    text = good.replace('unit = "m"', 'unit = "bar"\ncolour = "blue"').replace(
        "[store]", '[store]\nquota_bytes = "lots"'
    )
    got = problems(text)
    lines = text.splitlines()
    by_path = {p.split(" (line")[0]: p for p, _ in got}
    assert set(by_path) == {
        "store.quota_bytes",
        "uplinks[0].routes[0].unit",
        "uplinks[0].routes[0].colour",
    }
    for path, shown in by_path.items():
        line = int(shown.split("(line ")[1].rstrip(")"))
        assert path.rsplit(".", 1)[-1] in lines[line - 1]
    msgs = dict(got)
    assert msgs[by_path["uplinks[0].routes[0].colour"]] == "unknown key"
    assert "not valid for metric 'level'" in msgs[by_path["uplinks[0].routes[0].unit"]]


def test_missing_secret_file_is_an_error_naming_the_place(good: str, tmp_path: Path) -> None:
    (tmp_path / "token").unlink()
    [(path, msg)] = problems(good)
    assert path.startswith("uplinks[0].token (line ")
    assert "does not exist" in msg


def test_env_secret_and_missing_env(good: str, monkeypatch: pytest.MonkeyPatch) -> None:
    text = good.replace("token = {", 'token = { env = "QT_TOKEN" } #')
    monkeypatch.delenv("QT_TOKEN", raising=False)
    [(path, msg)] = problems(text)
    assert path.startswith("uplinks[0].token") and "QT_TOKEN" in msg
    monkeypatch.setenv("QT_TOKEN", "from-the-environment")
    assert load_config_text(text).secret("uplinks[0].token").reveal() == "from-the-environment"


def test_plain_text_secret_needs_insisting_and_warns(good: str) -> None:
    text = good.replace("token = {", 'token = { value = "abcd1234" } #')
    [(_path, msg)] = problems(text)
    assert "plain_text = true" in msg
    text = good.replace("token = {", 'token = { value = "abcd1234", plain_text = true } #')
    loaded = load_config_text(text)
    assert any("plain text" in w for w in loaded.warnings)


def test_world_readable_secret_file_warns(good: str, tmp_path: Path) -> None:
    (tmp_path / "token").chmod(0o644)
    assert any("readable by other users" in w for w in load_config_text(good).warnings)


def test_syntax_error_names_the_line() -> None:
    [(path, msg)] = problems("[store\npath = 1\n")
    assert path == "" and "line 1" in msg


def test_unknown_type_and_duplicate_names(good: str) -> None:
    assert (
        "unknown type 'qatum'" in problems(good.replace('type = "qatium"', 'type = "qatum"'))[0][1]
    )
    doubled = good + good[good.index("[[uplinks]]") :]
    [(path, msg)] = problems(doubled)
    first = locate(doubled, "uplinks[0].name")
    assert path == f"uplinks[1].name (line {locate(doubled, 'uplinks[1].name')})"
    assert msg == f"'qatium' is also the name of uplinks[0] (line {first})"


def test_route_to_unknown_series_warns_and_unknown_gps_source_errors(good: str) -> None:
    text = good.replace('series = "tank1.level"\nasset', 'series = "tank9.level"\nasset')
    assert any("tank9.level" in w for w in load_config_text(text).warnings)
    text = good.replace('type = "synthetic"', 'type = "synthetic"\nposition_from = "gps9"')
    [(path, msg)] = problems(text)
    assert path.startswith("sources[0].position_from") and "gps9" in msg


def test_status_metric_takes_no_unit(good: str) -> None:
    text = good.replace('metric = "level"\nunit = "m"', 'metric = "status"\nunit = "m"')
    assert "takes no unit" in problems(text)[0][1]
    text = good.replace('metric = "level"\nunit = "m"', 'metric = "status"')
    assert load_config_text(text).settings.uplinks[0].routes[0].unit == ""


def test_environment_overrides_a_value(good: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FIELDGATE_HEALTH__PORT", "9123")
    assert load_config_text(good).settings.health.port == 9123


def test_locate_finds_nested_array_tables() -> None:
    text = "[[a]]\nx = 1\n[[a.b]]\ny = 2\n[[a]]\nx = 3\n[[a.b]]\ny = 4\n[[a.b]]\ny = 5\n"
    assert locate(text, "a[1].b[1].y") == 10
    assert locate(text, "a[0].b[0].y") == 4
    assert locate(text, "a[1].x") == 6
    assert locate(text, "a[1].b[0].zz") == 7


def test_samples_and_example_configs_all_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Path(__file__).resolve().parents[1] / "config"
    files = sorted(root.glob("*.toml")) + sorted((root / "samples").glob("*.toml"))
    assert files, "config/ holds the example and demo configs"
    for f in files:
        # Secrets referenced by the examples are provided the way an operator would.
        creds = tmp_path / "creds"
        creds.mkdir(exist_ok=True)
        for name in ("qatium", "energydata", "nilu", "datacooee", "vanda", "vanda_secret"):
            (creds / name).write_text("example-secret\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        for var, value in DEMO_TOKENS.items():
            monkeypatch.setenv(var, value)
        try:
            load_config(f)
        except ConfigError as exc:
            pytest.fail(f"{f.name} does not load:\n{exc}")


def test_check_config_cli_exits_78_with_errors_on_stderr(tmp_path: Path, good: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(good.replace('unit = "m"', 'unit = "m"\nbogus = 1'))
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ},
    )
    assert proc.returncode == EX_CONFIG
    assert "uplinks[0].routes[0].bogus (line" in proc.stderr
    good_file = tmp_path / "good.toml"
    good_file.write_text(good)
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(good_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "s3cr3t" not in proc.stdout + proc.stderr


EDK_PATTERNS = """
[store]
path = "{tmp}/q.db"

[[sources]]
name = "plant"
type = "synthetic"
[[sources.series]]
name = "u1.r0"
[[sources.series]]
name = "u1.r1"
[[sources.series]]
name = "u12.r0"

[[uplinks]]
name = "edk"
type = "energydata"
token = {{ env = "UNUSED" }}
[[uplinks.datasets]]
name = "site"
prefix = "siteA"
[[uplinks.routes]]
series = "{series}"
dataset = "site"
suffix = "{suffix}"
"""


def edk(tmp_path: Path, series: str, suffix: str, extra: str = "") -> str:
    return EDK_PATTERNS.format(tmp=tmp_path, series=series, suffix=suffix) + extra


@pytest.mark.parametrize(
    ("series", "suffix", "message"),
    [
        (
            "u*.r*",
            "unit{1}/reg{3}",
            "unknown placeholder {3} (this route knows {series}, {1}, {2})",
        ),
        ("u*.r*", "unit{1}", "must use {series} or every capture {1}..{2} of 'u*.r*'"),
        ("u*.r*", "unit{1}/reg{2", "unbalanced { or }"),
        ("u*.r*", "unit {1}/{2}", "one or more parts of A-Z a-z 0-9 _ . - separated by /"),
        ("u1.r0", "unit{1}", "placeholder {1} in the route of one series"),
        ("u1.r0", "{series}", "placeholder {series} in the route of one series"),
    ],
)
def test_energydata_pattern_route_templates_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, series: str, suffix: str, message: str
) -> None:
    monkeypatch.setenv("UNUSED", "x")
    got = problems(edk(tmp_path, series, suffix))
    assert len(got) == 1 and got[0][0].startswith("uplinks[0].routes[0] (line ")
    assert message in got[0][1]


def test_a_pattern_route_takes_no_datastream_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNUSED", "x")
    got = problems(edk(tmp_path, "u*.r*", "u{1}/r{2}") + "datastream = 7\n")
    assert "no datastream id" in got[0][1]


def test_pattern_routes_loaded_against_the_declared_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UNUSED", "x")
    ok = load_config_text(edk(tmp_path, "u*.r*", "unit{1}/reg{2}"))
    assert ok.warnings == []
    # A second pattern that matches nothing declared is accepted with a warning.
    more = '[[uplinks.routes]]\nseries = "pump*"\ndataset = "site"\nsuffix = "p/{series}"\n'
    loaded = load_config_text(edk(tmp_path, "u*.r*", "unit{1}/reg{2}", more))
    assert loaded.warnings == [
        "uplinks[0].routes[1].series: the pattern 'pump*' matches no "
        "series a configured source declares (it will take any that "
        "appears)"
    ]
    # "u1.r23" and "u12.r3" would both publish to siteA/x123 with this (legal) template...
    text = edk(tmp_path, "u*.r*", "x{1}{2}")
    got = problems(text.replace('"u12.r0"', '"u12.r3"').replace('"u1.r1"', '"u1.r23"'))
    assert got == [(got[0][0], "series 'u1.r23' and 'u12.r3' both publish to topic 'siteA/x123'")]
    assert got[0][0].startswith("uplinks[0].routes[0].suffix (line ")
    # ... and a capture that makes no topic part is named before anything runs.
    got = problems(edk(tmp_path, "u*", "u/{1}").replace('"u12.r0"', '"u12 r0"'))
    assert "series 'u12 r0' makes topic suffix 'u/12 r0'" in got[0][1]


def test_series_patterns_are_refused_where_the_plugin_has_fixed_identifiers(good: str) -> None:
    got = problems(good.replace('series = "tank1.level"', 'series = "tank*.level"'))
    assert got[0][0].startswith("uplinks[0] (line ")
    assert "series patterns (tank*.level) are not supported by this uplink" in got[0][1]


def test_loading_config_imports_no_transport_library() -> None:
    """Config models live in each plugin folder's pure config.py: loading a config (every
    plugin's model, a sample file) must not import httpx, aiomqtt, pymodbus, pyserial or the
    plugins themselves. In a fresh interpreter, so nothing imported by other tests counts."""
    code = (
        "import sys, pathlib, gateway.config as c\n"
        "for f in sorted(pathlib.Path('config/samples').glob('*.toml')):\n"
        "    try: c.load_config(f)\n"
        "    except c.ConfigError: pass\n"
        "heavy = {'httpx', 'aiomqtt', 'paho', 'pymodbus', 'serial', 'aiohttp'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
        "print(sorted(m for m in sys.modules if m.endswith(('.uplink', '.source', '.mqtt',\n"
        "    '.csvimport', '.port', '.lines', '.link', '.registry'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.splitlines() == ["[]", "[]"], out.stdout
