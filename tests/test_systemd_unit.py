"""The systemd unit: the directives the daemon relies on, and its sandboxing exposure."""

from __future__ import annotations

import configparser
import re
import subprocess
from pathlib import Path

from gateway.__main__ import EX_STORE_UNUSABLE
from gateway.config import EX_CONFIG

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "fieldgate.service"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            k, v = line.split("=", 1)
            out.setdefault(k, []).append(v)
    return out


def test_unit_has_what_the_daemon_relies_on() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    d = directives()
    assert d["Type"] == ["notify"]
    assert d["Restart"] == ["on-failure"]
    # gateway.config.EX_CONFIG and gateway.__main__.EX_STORE_UNUSABLE
    assert d["RestartPreventExitStatus"] == [f"{EX_CONFIG} {EX_STORE_UNUSABLE}"]
    # Reload is SIGHUP to the daemon itself (tests/integration/test_reload.py).
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert int(d["WatchdogSec"][0]) >= 10
    assert d["StateDirectory"] == ["fieldgate"] and d["ConfigurationDirectory"] == ["fieldgate"]
    assert d["User"] == ["fieldgate"] and "dialout" in d["SupplementaryGroups"][0]
    assert any(v.startswith("char-ttyUSB") for v in d["DeviceAllow"])
    assert any(v.startswith("qatium:") for v in d["LoadCredential"])


def test_exposure_is_at_most_2() -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert m is not None, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 2.0
