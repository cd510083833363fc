"""The sans-IO rooms import neither trio nor libp2p (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SANS_IO = [
    "phala_p2p.wire",
    "phala_p2p.crypto",
    "phala_p2p.chain",
    "phala_p2p.market",
    "phala_p2p.jobs",
]


@pytest.mark.parametrize("room", SANS_IO)
def test_room_does_not_import_trio_or_libp2p(room: str) -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({room!r})\n"
        "for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('trio', 'libp2p'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{room} pulled in {out.stdout.strip()}"


def test_check_can_fail() -> None:
    """The same probe does see trio when a room that uses it is imported."""
    code = "import sys, phala_p2p.net.streams; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
