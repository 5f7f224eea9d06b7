"""The stand-ins in gateway/sandbox/ are transcribed from the service documents and device specs,
not from the client: they import nothing of the gateway but the shared models and, where a
simulator serves a map from the same config file, the config model (issue 14)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SANDBOX = Path(__file__).resolve().parents[1] / "gateway" / "sandbox"
#: The demo runs the gateway itself next to the stand-ins: it is not one of them.
NOT_A_STAND_IN = {"demo.py"}
ALLOWED = {
    "gateway.models",
    "gateway.sources.modbus.config",  # modbus_sim serves a device profile the config names
}


def gateway_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "gateway" or m.startswith("gateway.")}


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(SANDBOX.glob("*.py")) if p.name not in NOT_A_STAND_IN],
    ids=lambda p: p.name,
)
def test_stand_ins_import_only_shared_models(path: Path) -> None:
    outside = {
        m for m in gateway_imports(path) if not m.startswith("gateway.sandbox") and m not in ALLOWED
    }
    assert outside == set(), f"{path.name} imports client code: {sorted(outside)}"
