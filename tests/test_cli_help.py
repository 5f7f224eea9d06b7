"""Every subcommand, option and argument of ``fieldgate`` has help text (issue 15).

Walks the real parser (gateway/__main__.py ``parser()``) through every subparser, so an option
added later without ``help=`` fails here, and checks that ``fieldgate COMMAND -h`` shows it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator

from gateway.__main__ import parser


def walk(p: argparse.ArgumentParser, prog: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in p._actions:
        yield prog, action
        if isinstance(action, argparse._SubParsersAction):
            # The listed subcommands carry the help shown in ``fieldgate -h``.
            for choice in action._choices_actions:
                yield f"{prog} {choice.dest}", choice
            for name, sub in action.choices.items():
                yield from walk(sub, f"{prog} {name}")


def test_every_action_has_help() -> None:
    seen = list(walk(parser(), "fieldgate"))
    missing = [
        f"{prog}: {'/'.join(a.option_strings) or a.dest}"
        for prog, a in seen
        if not a.help or a.help == argparse.SUPPRESS or not a.help.strip()
    ]
    assert missing == []
    progs = {prog for prog, _ in seen}
    assert {
        "fieldgate run",
        "fieldgate demo",
        "fieldgate check-config",
        "fieldgate check-uplink",
        "fieldgate queue",
        "fieldgate dead-letters",
    } <= progs
    # Enough actions walked to mean it: every subcommand's own options were reached.
    options = {o for _, a in seen for o in a.option_strings}
    assert {"--config", "--strict", "--probe", "--json", "--limit", "--health-port"} <= options


def test_the_help_is_shown_for_each_command() -> None:
    for command, wanted in [
        ("check-config", "--strict"),
        ("dead-letters", "replay: requeue them"),
        ("queue", "print the figures as JSON"),
    ]:
        out = subprocess.run(
            [sys.executable, "-m", "gateway", command, "-h"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert wanted in " ".join(out.stdout.split()), out.stdout
