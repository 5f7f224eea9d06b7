"""The samples document every option: each plugin's config model is mapped to its sample file
(config/samples/<plugin>.toml) and every field of it, nested models included (devices, fields,
routes, sensors, datasets, backfill, each parser variant, timestamp, position), must appear there
as a key under its own table, set or commented out (``# key = default``). The Modbus device
profile format is held to hardware/profiles/README.md the same way, and the README's Modbus table
to the decoder's types and register counts. (tests/test_config.py loads every sample.)"""

from __future__ import annotations

import re
import tomllib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from gateway.config import SecretRef, SourceConfig, UplinkConfig
from gateway.sources.modbus.config import ModbusProfile, ModbusSourceConfig
from gateway.sources.modbus.decode import DATA_TYPES, ORDERS, register_count
from gateway.sources.serial.config import (
    NmeaConfig,
    Sdi12Config,
    SerialLinesConfig,
)
from gateway.sources.synthetic.config import SyntheticSourceConfig
from gateway.uplinks.datacooee.config import DatacooeeConfig
from gateway.uplinks.energydata.config import EnergydataConfig
from gateway.uplinks.nilu.config import NiluConfig
from gateway.uplinks.qatium.config import QatiumConfig
from gateway.uplinks.vanda.config import VandaConfig

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_DIR = ROOT / "config" / "samples"

#: Each plugin's config model, the sample that documents it, and the array its entries are in.
SAMPLES: dict[type[BaseModel], tuple[str, str]] = {
    ModbusSourceConfig: ("modbus.toml", "sources"),
    SerialLinesConfig: ("serial_lines.toml", "sources"),
    NmeaConfig: ("nmea.toml", "sources"),
    Sdi12Config: ("sdi12.toml", "sources"),
    SyntheticSourceConfig: ("synthetic.toml", "sources"),
    QatiumConfig: ("qatium.toml", "uplinks"),
    EnergydataConfig: ("energydata.toml", "uplinks"),
    NiluConfig: ("nilu.toml", "uplinks"),
    VandaConfig: ("vanda.toml", "uplinks"),
    DatacooeeConfig: ("datacooee.toml", "uplinks"),
}

#: Models documented once for all (README "Configuration", config/fieldgate.example.toml), not
#: per plugin: a secret reference's forms (credential, file, env, value).
SHARED = (SecretRef,)


# ----------------------------------------------------------------------------------------------
# What the models have


def nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    """Config models inside a field's type (lists, optionals, unions, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not issubclass(annotation, SHARED):
            yield annotation
        return
    for arg in get_args(annotation):
        yield from nested_models(arg)


def model_keys(model: type[BaseModel], table: str) -> Iterator[tuple[str, str, str]]:
    """(table path, key, model name) of every field of ``model`` and of the models nested in it;
    a nested model's table is its field's path (``sources.devices.fields``)."""
    for name, info in model.model_fields.items():
        key = info.alias or name
        yield table, key, model.__name__
        for sub in nested_models(info.annotation):
            yield from model_keys(sub, f"{table}.{key}" if table else key)


def union_members(union: Any) -> set[type[BaseModel]]:
    members: set[type[BaseModel]] = set()
    for arg in get_args(union):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            members.add(arg)
        elif get_origin(arg) in (Union, types.UnionType):
            members |= union_members(arg)
    return members


# ----------------------------------------------------------------------------------------------
# What a sample shows


_HEADER = re.compile(r"^\[\[?\s*([A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*)\s*\]\]?$")
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_\-]*)\s*=\s*(.*)$")
_INLINE_KEY = re.compile(r"(?:^|[{,])\s*([A-Za-z_][A-Za-z0-9_\-]*)\s*=")


def _without_comment(line: str) -> str:
    """``line`` up to a ``#`` that is not inside a string."""
    quote = ""
    i = 0
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "#":
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def _strings_blanked(text: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', '""', text)


def documented_keys(text: str) -> set[tuple[str, str]]:
    """(table path, key) of every key in TOML ``text``, commented out or not.

    A commented line counts as if uncommented: ``# key = value`` is a key of the table whose
    header (commented or not) comes last before it, so a commented option has to sit where
    uncommenting it would put it. Array indexes are dropped (``sources.devices``); an inline
    table's keys belong to its key's table (``position = { lat = ... }``: ``sources.position``).
    """
    found: set[tuple[str, str]] = set()
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        line = _without_comment(line)
        if not line:
            continue
        header = _HEADER.match(line)
        if header:
            parts = header.group(1).split(".")
            table = ".".join(parts)
            found.add((".".join(parts[:-1]), parts[-1]))
            continue
        kv = _KEY.match(line)
        if kv is None:
            continue
        key, value = kv.groups()
        found.add((table, key))
        if value.startswith("{"):
            inner = f"{table}.{key}" if table else key
            found.update((inner, k) for k in _INLINE_KEY.findall(_strings_blanked(value)))
    return found


def missing_keys(model: type[BaseModel], table: str, text: str) -> list[str]:
    shown = documented_keys(text)
    return [
        f"{t}.{k} ({name})" if t else f"{k} ({name})"
        for t, k, name in model_keys(model, table)
        if (t, k) not in shown
    ]


# ----------------------------------------------------------------------------------------------
# The tests


def test_every_plugin_has_a_sample_and_every_sample_a_plugin() -> None:
    plugins = union_members(SourceConfig) | union_members(UplinkConfig)
    assert set(SAMPLES) == plugins, "map each plugin's config model to its sample in SAMPLES"
    assert {f for f, _ in SAMPLES.values()} == {p.name for p in SAMPLES_DIR.glob("*.toml")}


@pytest.mark.parametrize("model", list(SAMPLES), ids=lambda m: SAMPLES[m][0])
def test_the_sample_holds_entries_of_its_plugin_that_validate(model: type[BaseModel]) -> None:
    file, array = SAMPLES[model]
    data = tomllib.loads((SAMPLES_DIR / file).read_text(encoding="utf-8"))
    entries = data.get(array, [])
    want = model.model_fields["type"].annotation
    assert entries, f"{file} has no [[{array}]] entry"
    for i, entry in enumerate(entries):
        assert entry.get("type") in get_args(want), f"{file} {array}[{i}] is not {want}"
        # Relative profile paths resolve as the loader resolves them (the file's directory first).
        model.model_validate(entry, context={"base_dir": SAMPLES_DIR})


@pytest.mark.parametrize("model", list(SAMPLES), ids=lambda m: SAMPLES[m][0])
def test_the_sample_documents_every_option_of_its_plugin(model: type[BaseModel]) -> None:
    file, array = SAMPLES[model]
    missing = missing_keys(model, array, (SAMPLES_DIR / file).read_text(encoding="utf-8"))
    assert not missing, (
        f"config/samples/{file} lacks these keys of its config model (add each where it "
        f"belongs, commented out with its default and one line of meaning): {', '.join(missing)}"
    )


def test_the_line_logger_sample_uses_every_parser() -> None:
    data = tomllib.loads((SAMPLES_DIR / "serial_lines.toml").read_text(encoding="utf-8"))
    kinds = {s["parser"]["kind"] for s in data["sources"]}
    variants = nested_models(SerialLinesConfig.model_fields["parser"].annotation)
    assert kinds == {get_args(v.model_fields["kind"].annotation)[0] for v in variants}


def test_the_key_finder_reads_tables_comments_and_inline_tables() -> None:
    text = (
        '[[sources]]\nname = "a"  # x = 1\n# port = 502   # default\n'
        "# position = { lat = 1.0, lon = 2.0 }\n"
        '  [[sources.devices]]\n  # [sources.timestamp]\n  # field = "t"\n'
        "# [store] commit_interval_ms is prose\n"
        "label = 'a # b'\n"
    )
    assert documented_keys(text) == {
        ("", "sources"),
        ("sources", "name"),
        ("sources", "port"),
        ("sources", "position"),
        ("sources.position", "lat"),
        ("sources.position", "lon"),
        ("sources", "devices"),
        ("sources", "timestamp"),
        ("sources.timestamp", "field"),
        ("sources.timestamp", "label"),
    }


def _toml_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```toml\n(.*?)```", markdown, flags=re.S))


def test_the_profile_format_is_documented_in_hardware() -> None:
    profiles = ROOT / "hardware" / "profiles"
    doc = (profiles / "README.md").read_text(encoding="utf-8")
    example = _toml_blocks(doc)
    missing = missing_keys(ModbusProfile, "", example)
    assert not missing, f"hardware/profiles/README.md lacks profile keys: {', '.join(missing)}"
    ModbusProfile.model_validate(tomllib.loads(example))
    for profile in profiles.glob("*.toml"):
        assert f"`{profile.name}`" in doc, f"hardware/profiles/README.md does not list {profile}"


def test_the_readme_modbus_table_matches_the_decoder() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Modbus: types, tables and byte orders", 1)[1].split("\n## ", 1)[0]
    counts: dict[str, str] = {}
    for row in re.findall(r"^\|(.+)\|\s*$", section, flags=re.M):
        cells = [c.strip() for c in row.split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        if names and all(n in DATA_TYPES for n in names):
            counts.update(dict.fromkeys(names, cells[1]))
    assert set(counts) == set(DATA_TYPES), "one row per Modbus type"
    for dtype, cell in counts.items():
        if dtype == "string":  # register_count: (length + 1) // 2
            assert "`length` / 2, rounded up" in cell, cell
        else:
            assert int(cell.split()[0]) == register_count(dtype), dtype
    for order in ORDERS:
        assert f"`{order}`" in section
