"""Hardening defaults of the config: who may read secrets, and where the health server listens.

The loader warns when a secret file, or a config file that holds a plain-text secret, can be read
by other users (group-readable is the documented install: root:fieldgate 0640). The health server
listens on 127.0.0.1 unless the config says otherwise. (That the daemon logs these warnings and
binds only to loopback is checked on a real process in tests/integration/test_secrets.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import HealthConfig, load_config, load_config_text
from gateway.errors import ConfigError

CONFIG = """
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
token = {token}
[[uplinks.routes]]
series = "tank1.level"
asset = "T1"
metric = "level"
unit = "m"
"""
OTHERS = "readable by other users"


def config_file(tmp_path: Path, token: str, mode: int) -> Path:
    path = tmp_path / "fieldgate.toml"
    path.write_text(CONFIG.format(tmp=tmp_path, token=token))
    path.chmod(mode)
    return path


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "qatium.token"
    path.write_text("hardening-token-value\n")
    path.chmod(0o600)
    return path


PLAIN = '{ value = "plain-token-value", plain_text = true }'


def test_a_world_readable_config_holding_a_plain_secret_warns(tmp_path: Path) -> None:
    path = config_file(tmp_path, PLAIN, 0o644)
    warnings = load_config(path).warnings
    assert f"{path} holds a plain-text secret and is {OTHERS}" in warnings
    # The plain value is warned about on its own, and never shown in a warning.
    assert any("plain text" in w for w in warnings)
    assert not any("plain-token-value" in w for w in warnings)


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_a_private_or_group_readable_config_is_not_warned_about_its_readers(
    tmp_path: Path, mode: int
) -> None:
    warnings = load_config(config_file(tmp_path, PLAIN, mode)).warnings
    assert not any(OTHERS in w for w in warnings)
    assert any("plain text" in w for w in warnings)  # the plain value still is


def test_a_world_readable_config_holding_only_references_is_fine(
    tmp_path: Path, token_file: Path
) -> None:
    path = config_file(tmp_path, f'{{ file = "{token_file}" }}', 0o644)
    assert load_config(path).warnings == []


@pytest.mark.parametrize(
    ("mode", "warned"), [(0o600, False), (0o640, False), (0o644, True), (0o604, True)]
)
def test_secret_file_permissions(tmp_path: Path, token_file: Path, mode: int, warned: bool) -> None:
    token_file.chmod(mode)
    text = CONFIG.format(tmp=tmp_path, token=f'{{ file = "{token_file}" }}')
    warnings = load_config_text(text).warnings
    assert warnings == (
        [f"uplinks[0].token: secret file {token_file} is {OTHERS}"] if warned else []
    )


def test_health_listens_on_loopback_unless_configured() -> None:
    assert HealthConfig().host == "127.0.0.1"
    loaded = load_config_text("[store]\npath = '/tmp/x.db'\n")
    assert loaded.settings.health.host == "127.0.0.1"
    assert loaded.settings.health.enabled
    # Beyond loopback the console needs a token (issue 16): refused without one.
    with pytest.raises(ConfigError, match="console_token"):
        load_config_text("[store]\npath = '/tmp/x.db'\n[health]\nhost = '0.0.0.0'\n")
    other = load_config_text(
        "[store]\npath = '/tmp/x.db'\n[health]\nhost = '0.0.0.0'\n"
        "console_token = { value = 'a-long-console-token', plain_text = true }\n"
    )
    assert other.settings.health.host == "0.0.0.0"
