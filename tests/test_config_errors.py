"""Errors that name the thing a person can change (issue 15), and secrets resolved only as far as
the command needs them.

* An environment override with a bad value names the variable, not a line of the file it
  replaced; an override naming a key that does not exist is an error naming the variable.
* A repeated source or uplink name points at both lines; a missing or unknown ``type`` lists the
  types there are; backoff and reconnect bounds the wrong way round are refused.
* A config with no (enabled) sources or uplinks loads with a warning saying what that means.
* ``secrets="available"`` leaves systemd credentials to the service when ``$CREDENTIALS_DIRECTORY``
  is unset (a note, the reference unbound: ``secret()`` raises LookupError naming the place);
  ``secrets="none"`` resolves nothing. env and file references still fail as before.

The same through real ``fieldgate`` processes: tests/integration/test_cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.config import SecretMode, load_config_text, locate
from gateway.errors import ConfigError

HEAD = """
[store]
path = "{tmp}/q.db"

[health]
port = 5
"""
SOURCE = """
[[sources]]
name = "{name}"
type = "synthetic"
[[sources.series]]
name = "{name}.level"
"""
UPLINK = """
[[uplinks]]
name = "{name}"
type = "qatium"
url = "http://127.0.0.1:1/ingest"
token = {token}
{extra}
[[uplinks.routes]]
series = "tank.level"
asset = "T1"
metric = "level"
unit = "m"
"""
SOURCE_TYPES = "synthetic, serial_lines, nmea, sdi12, modbus"
UPLINK_TYPES = "qatium, nilu, vanda, energydata, datacooee"


def source(name: str) -> str:
    return SOURCE.format(name=name)


def uplink(
    name: str, token: str = '{ value = "abcd1234", plain_text = true }', extra: str = ""
) -> str:
    return UPLINK.format(name=name, token=token, extra=extra)


@pytest.fixture
def head(tmp_path: Path) -> str:
    return HEAD.format(tmp=tmp_path)


def problems(text: str, secrets: SecretMode = "all") -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, secrets=secrets)
    return info.value.problems


def at(text: str, tpath: str) -> str:
    """``tpath (line N)``, the way the loader shows a place in the file."""
    return f"{tpath} (line {locate(text, tpath)})"


def also(text: str, name: str, first: str) -> str:
    """The message of a repeated name: the first holder and the line of its name."""
    return f"{name!r} is also the name of {first} (line {locate(text, f'{first}.name')})"


# ----------------------------------------------------------------------------------------------
# Environment overrides


def test_a_bad_override_names_the_variable_not_the_file(
    head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIELDGATE_HEALTH__PORT", "abc")
    [(where, what)] = problems(head + source("tank"))
    assert where == "FIELDGATE_HEALTH__PORT=abc"
    assert what.startswith("Input should be a valid integer")


def test_a_bad_section_given_as_json_names_the_variable_and_the_key(
    head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIELDGATE_HEALTH", '{"port": "x"}')
    [(where, what)] = problems(head + source("tank"))
    assert where == 'FIELDGATE_HEALTH={"port": "x"}'
    assert what.startswith("health.port: Input should be a valid integer")
    monkeypatch.setenv("FIELDGATE_HEALTH", "not json")
    [(where, what)] = problems(head + source("tank"))
    assert (where, what) == (
        "FIELDGATE_HEALTH=not json",
        "not JSON: health as a whole is given as JSON; one key as FIELDGATE_HEALTH__<KEY>",
    )


@pytest.mark.parametrize(
    ("var", "message"),
    [
        (
            "FIELDGATE_HEALTH__PROT",
            "unknown override: [health] has no key 'prot' (known: enabled, host, port, "
            "stuck_after_s, console_token)",
        ),
        (
            "FIELDGATE_BOGUS__X",
            "unknown override: the config has no key 'bogus' (known: store, health, log, clock, "
            "sources, uplinks)",
        ),
        (
            "FIELDGATE_HEALTH_PORT",
            "not an override: a section and its key are separated by two underscores "
            "(FIELDGATE_HEALTH__PORT)",
        ),
        ("FIELDGATE_STORE__PATH__X", "unknown override: store.path has no keys of its own"),
        ("FIELDGATE_SOURCES__0__NAME", "unknown override: sources has no keys of its own"),
    ],
)
def test_an_unknown_override_is_an_error_naming_it(
    head: str, monkeypatch: pytest.MonkeyPatch, var: str, message: str
) -> None:
    monkeypatch.setenv(var, "1")
    # Exactly one problem: not a second one for what the override broke in the model.
    assert problems(head + source("tank")) == [(f"{var}=1", message)]


def test_other_fieldgate_variables_are_not_overrides(
    head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CLI's config path, and secrets named by the file (even with a double underscore).
    monkeypatch.setenv("FIELDGATE_CONFIG", "/etc/fieldgate/other.toml")
    monkeypatch.setenv("FIELDGATE_DEMO_TOKEN", "x")
    monkeypatch.setenv("FIELDGATE_QATIUM__TOKEN", "secret-from-env")
    text = head + source("tank") + uplink("q", '{ env = "FIELDGATE_QATIUM__TOKEN" }')
    loaded = load_config_text(text)
    assert loaded.secret("uplinks[0].token").reveal() == "secret-from-env"
    monkeypatch.setenv("fieldgate_health__port", "7")  # names are case-insensitive
    assert load_config_text(text).settings.health.port == 7


def test_a_table_check_names_the_overrides_it_compared(
    head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIELDGATE_CLOCK__MAX_FUTURE_S", "60")
    monkeypatch.setenv("FIELDGATE_CLOCK__STEP_THRESHOLD_S", "100")
    [(where, what)] = problems(head + source("tank"))
    assert where == "clock"
    assert what == (
        "max_future_s must be larger than step_threshold_s (with "
        "FIELDGATE_CLOCK__MAX_FUTURE_S=60, FIELDGATE_CLOCK__STEP_THRESHOLD_S=100 from the "
        "environment)"
    )


# ----------------------------------------------------------------------------------------------
# Names, types, bounds


def test_a_repeated_source_name_points_at_both_lines(head: str) -> None:
    text = head + source("pump") + source("tank") + source("well") + source("pump")
    assert problems(text) == [(at(text, "sources[3].name"), also(text, "pump", "sources[0]"))]
    line = locate(text, "sources[3].name")
    assert line is not None and text.splitlines()[line - 1] == 'name = "pump"'


def test_every_repeated_uplink_name_is_listed(head: str) -> None:
    text = head + source("tank") + uplink("a") + uplink("b") + uplink("a") + uplink("b")
    assert problems(text) == [
        (at(text, "uplinks[2].name"), also(text, "a", "uplinks[0]")),
        (at(text, "uplinks[3].name"), also(text, "b", "uplinks[1]")),
    ]


def test_a_source_or_uplink_without_type_lists_the_types(head: str) -> None:
    text = head + source("tank") + '[[sources]]\nname = "pump"\n'
    [(where, what)] = problems(text)
    assert where == at(text, "sources[1].type")
    assert what == f"type is missing: give one of {SOURCE_TYPES}"
    assert "discriminator" not in what
    text = head + source("tank") + '[[uplinks]]\nname = "q"\n'
    assert problems(text) == [
        (at(text, "uplinks[0].type"), f"type is missing: give one of {UPLINK_TYPES}")
    ]


def test_an_unknown_type_lists_the_types(head: str) -> None:
    text = head + source("tank").replace("synthetic", "synthetik")
    assert problems(text) == [
        (at(text, "sources[0]"), f"unknown type 'synthetik' (known: {SOURCE_TYPES})")
    ]
    text = head + source("tank") + uplink("q").replace('"qatium"', '"qatum"')
    assert problems(text)[0][1] == f"unknown type 'qatum' (known: {UPLINK_TYPES})"


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ("backoff_initial_s = 600", "backoff_initial_s (600 s) is above backoff_max_s (300 s)"),
        ("backoff_initial_s = 10\nbackoff_max_s = 5", "backoff_initial_s (10 s) is above"),
        ("backoff_initial_s = 300", None),
        ("backoff_max_s = 0.5", "backoff_initial_s (1 s) is above backoff_max_s (0.5 s)"),
    ],
)
def test_backoff_initial_above_max_is_refused(head: str, extra: str, error: str | None) -> None:
    text = head + source("tank") + uplink("q", extra=extra)
    if error is None:
        load_config_text(text)
        return
    [(where, what)] = problems(text)
    assert where == at(text, "uplinks[0]")
    assert what.startswith(error) and "lower backoff_initial_s or raise backoff_max_s" in what


def test_energydata_backoff_is_checked_against_its_own_default(
    head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDK_TOKEN_15", "x" * 8)
    text = head + (
        '[[uplinks]]\nname = "edk"\ntype = "energydata"\ntoken = { env = "EDK_TOKEN_15" }\n'
        "backoff_initial_s = 200\n"
        '[[uplinks.datasets]]\nname = "site"\nprefix = "siteA"\n'
        '[[uplinks.routes]]\nseries = "tank.level"\ndataset = "site"\nsuffix = "t"\n'
    )
    [(_, what)] = problems(text)
    assert what.startswith("backoff_initial_s (200 s) is above backoff_max_s (120 s)")


@pytest.mark.parametrize(
    "table",
    [
        '[[sources]]\nname = "m"\ntype = "modbus"\nhost = "127.0.0.1"\n{bounds}\n'
        '[[sources.devices]]\nname = "meter"\nunit = 1\n'
        '[[sources.devices.fields]]\nname = "p"\naddress = 0\n',
        '[[sources]]\nname = "s"\ntype = "serial_lines"\nport = "/dev/ttyUSB0"\n{bounds}\n'
        '[sources.parser]\nkind = "keyvalue"\n',
    ],
    ids=["modbus", "serial"],
)
def test_source_reconnect_bounds_the_wrong_way_round_are_refused(head: str, table: str) -> None:
    bad = head + table.format(bounds="reconnect_min_s = 30\nreconnect_max_s = 10")
    found = problems(bad)
    assert any("reconnect_max_s must not be below reconnect_min_s" in m for _, m in found), found
    good = head + table.format(bounds="reconnect_min_s = 10\nreconnect_max_s = 30")
    try:
        load_config_text(good)
    except ConfigError as exc:  # only the bounds matter here: no other problem about them
        assert not any("reconnect" in m for _, m in exc.problems), exc.problems


NO_SOURCES = "no sources: the gateway will only deliver what the store already holds"
NO_UPLINKS = (
    "no uplinks: the store keeps every reading (capture only, up to [store] quota_bytes and "
    "retention_days); an uplink configured later starts with what is captured from then on"
)


def test_an_empty_config_is_warned_about(head: str) -> None:
    assert load_config_text(head).warnings == [NO_SOURCES, NO_UPLINKS]
    warnings = load_config_text(head + uplink("q")).warnings
    assert NO_SOURCES in warnings and NO_UPLINKS not in warnings
    assert load_config_text(head + source("tank")).warnings == [NO_UPLINKS]


def test_only_disabled_sources_or_uplinks_are_warned_about(head: str) -> None:
    disabled = source("tank").replace('type = "synthetic"', 'type = "synthetic"\nenabled = false')
    text = head + disabled + uplink("q", extra="enabled = false")
    warnings = load_config_text(text).warnings
    assert (
        "no enabled sources: the gateway will only deliver what the store already holds" in warnings
    )
    assert any(w.startswith("no enabled uplinks: the store keeps every reading") for w in warnings)


# ----------------------------------------------------------------------------------------------
# Secrets resolved as far as the command needs


CREDENTIAL = '{ credential = "qatium" }'
NOTE = "uplinks[0].token: systemd credential 'qatium' is resolved by the service (LoadCredential=)"


def credential_config(head: str) -> str:
    return head + source("tank") + uplink("q", CREDENTIAL).replace("tank.level", "tank.level")


def test_outside_systemd_a_credential_is_left_to_the_service(
    head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    text = credential_config(head)
    [(where, what)] = problems(text)  # "all" (fieldgate run): unchanged, an error
    assert where == at(text, "uplinks[0].token") and "CREDENTIALS_DIRECTORY" in what

    loaded = load_config_text(text, secrets="available")
    assert loaded.notes == [NOTE]
    assert loaded.secrets == {}
    ref: Any = loaded.settings.uplinks[0].token
    with pytest.raises(LookupError) as info:
        ref.secret()
    assert "credential 'qatium'" in str(info.value) and "uplinks[0].token" in str(info.value)


def test_a_plugin_cannot_be_built_from_a_deferred_secret(
    head: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.uplinks.registry import build_uplink

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    loaded = load_config_text(credential_config(head), secrets="available")
    with pytest.raises(LookupError, match=r"uplinks\[0\]\.token: systemd credential 'qatium'"):
        build_uplink(loaded.settings.uplinks[0])


def test_under_systemd_available_resolves_credentials(
    head: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    text = credential_config(head)
    [(where, what)] = problems(text, "available")  # the unit gives no such credential: an error
    assert where == at(text, "uplinks[0].token") and "does not exist" in what
    (creds / "qatium").write_text("credential-value-15\n")
    loaded = load_config_text(text, secrets="available")
    assert loaded.notes == []
    assert loaded.settings.uplinks[0].token.secret().reveal() == "credential-value-15"


@pytest.mark.parametrize("ref", ['{ env = "NO_SUCH_VAR_15" }', '{ file = "/nonexistent/15" }'])
def test_env_and_file_references_must_resolve_unless_nothing_is_resolved(
    head: str, monkeypatch: pytest.MonkeyPatch, ref: str
) -> None:
    monkeypatch.delenv("NO_SUCH_VAR_15", raising=False)
    text = head + source("tank") + uplink("q", ref)
    for mode in ("all", "available"):
        [(where, _)] = problems(text, mode)  # type: ignore[arg-type]
        assert where == at(text, "uplinks[0].token")
    loaded = load_config_text(text, secrets="none")  # queue, dead-letters
    assert loaded.secrets == {} and loaded.notes == []
    with pytest.raises(LookupError, match=r"uplinks\[0\]\.token is not resolved"):
        loaded.settings.uplinks[0].token.secret()


def test_a_plugin_union_keeps_its_own_tag_and_choices(head: str) -> None:
    # A serial parser is chosen by ``kind``: its error names kind and the parsers, not the types.
    text = head + (
        '[[sources]]\nname = "s"\ntype = "serial_lines"\nport = "/dev/ttyUSB0"\n'
        '[sources.parser]\nkind = "kv"\n'
    )
    assert problems(text) == [
        (at(text, "sources[0].parser"), "unknown kind 'kv' (known: regex, delimited, keyvalue)")
    ]
