"""The chain room is sans-IO: no trio, no libp2p, no clock, no upper rooms.

It may use the tee room's attestation verifiers (quotes, DCAP, policy), which are sans-IO
themselves: importing the chain must not load trio, libp2p or the enclave host.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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
ALLOWED = ("phala_p2p.tee.dcap", "phala_p2p.tee.messages", "phala_p2p.tee.policy")


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
            if name in ALLOWED:
                continue
            assert not any(name == m or name.startswith(m + ".") for m in FORBIDDEN_MODULES), (
                f"{path.name} imports {name}"
            )
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
                assert not (isinstance(node.value, ast.Name) and node.value.id == "time"), path


def test_importing_the_chain_loads_no_io_modules() -> None:
    code = (
        "import sys, phala_p2p.chain, phala_p2p.chain.miners\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p') "
        "or m in ('phala_p2p.tee.enclave', 'phala_p2p.net', 'phala_p2p.node')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
