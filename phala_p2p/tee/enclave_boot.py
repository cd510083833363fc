"""Start of the simulated enclave process, run by path: ``python -I .../tee/enclave_boot.py``.

It loads only the enclave's own modules (those listed in
:data:`phala_p2p.tee.measurement.ENCLAVE_SOURCES`): the package ``__init__`` files, which pull
in the networking stack, are replaced by empty namespace modules, so the enclave's trusted
code base stays small and its start stays fast.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path


def _install_minimal_packages() -> None:
    package_dir = Path(__file__).resolve().parent.parent
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    sys.path.insert(0, str(package_dir.parent))
    for name, path in (
        ("phala_p2p", package_dir),
        ("phala_p2p.tee", package_dir / "tee"),
        ("phala_p2p.crypto", package_dir / "crypto"),
        ("phala_p2p.wire", package_dir / "wire"),
        ("phala_p2p.jobs", package_dir / "jobs"),
        ("phala_p2p.market", package_dir / "market"),
        ("phala_p2p.chain", package_dir / "chain"),
    ):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(path)]
            module.__package__ = name
            sys.modules[name] = module


def main() -> int:
    _install_minimal_packages()
    enclave_main = importlib.import_module("phala_p2p.tee.enclave_main")
    code = enclave_main.main()
    assert isinstance(code, int)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
