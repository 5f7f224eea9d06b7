"""The web console: one page (``index.html``, inline CSS and vanilla JS, no external assets)
served by the health server at ``/``, polling ``/status`` and ``/history``.

This module stays light (no aiohttp): the config loader imports :func:`auth_problems` to refuse
a health endpoint bound beyond loopback without ``console_token``.
"""

from __future__ import annotations

import ipaddress
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.configbase import HealthConfig


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only this machine: localhost, 127.0.0.0/8 or ::1."""
    h = host.strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a name or an empty host (every address): not loopback


def auth_problems(cfg: HealthConfig) -> list[tuple[str, str]]:
    """``(toml_path, message)`` for a health endpoint reachable beyond this machine without a
    console token; empty when fine."""
    if not cfg.enabled or is_loopback(cfg.host) or cfg.console_token is not None:
        return []
    return [
        (
            "health.host",
            f"{cfg.host!r} is not loopback: the console and /status would be open to the "
            "network; set health.console_token (a secret reference, e.g. "
            '{ file = "/etc/fieldgate/console.token" }) or bind 127.0.0.1',
        )
    ]


@cache
def page() -> bytes:
    """The console page (package data)."""
    return resources.files(__package__).joinpath("index.html").read_bytes()


LOGIN_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>fieldgate console</title>
<style>body{font:16px system-ui,sans-serif;margin:2em auto;max-width:22em;padding:0 1em}
input,button{font:inherit;padding:.4em;width:100%;box-sizing:border-box;margin:.3em 0}</style>
</head><body><h1>fieldgate</h1>
<form method="get" action="/"><label>Console token
<input type="password" name="token" autocomplete="current-password" required></label>
<button>Open console</button></form>
<script>
var t = sessionStorage.getItem("fg_token");
if (t) {
  sessionStorage.removeItem("fg_token");
  location.replace("/?token=" + encodeURIComponent(t));
}
</script></body></html>
"""
