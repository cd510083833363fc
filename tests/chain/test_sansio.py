"""The chain room is sans-IO: no trio, no libp2p, no clock, no upper rooms."""

from __future__ import annotations

import ast
from pathlib import Path

import phala_p2p.chain

ROOM = Path(phala_p2p.chain.__file__).parent
FORBIDDEN_MODULES = (
    "trio",
    "libp2p",
    "phala_p2p.net",
    "phala_p2p.services",
    "phala_p2p.node",
    "phala_p2p.tee",
    "phala_p2p.market",
    "time",
    "asyncio",
    "socket",
)
FORBIDDEN_CALLS = {"time", "monotonic", "perf_counter"}


def _imports(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_chain_modules_do_no_io_and_read_no_clock() -> None:
    files = sorted(ROOM.glob("*.py"))
    assert len(files) > 10
    for path in files:
        tree = ast.parse(path.read_text())
        for name in _imports(tree):
            assert not any(name == m or name.startswith(m + ".") for m in FORBIDDEN_MODULES), (
                f"{path.name} imports {name}"
            )
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
                assert not (isinstance(node.value, ast.Name) and node.value.id == "time"), path
