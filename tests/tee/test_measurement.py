"""The enclave measurement and the enclave's trusted code base."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import phala_p2p
from phala_p2p.errors import UsageError
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.measurement import ENCLAVE_SOURCES, compute_measurement, source_digests

PACKAGE_DIR = Path(phala_p2p.__path__[0]).resolve()


def _copy_sources(dest: Path) -> Path:
    for rel in ENCLAVE_SOURCES:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_DIR / rel, target)
    return dest


def test_measurement_is_deterministic_and_covers_config() -> None:
    limits = ExecutorLimits()
    first = compute_measurement(limits)
    assert len(first) == 32
    assert compute_measurement(ExecutorLimits()) == first
    assert compute_measurement(ExecutorLimits(max_fuel=limits.max_fuel - 1)) != first
    assert compute_measurement(ExecutorLimits(wall_clock_s=limits.wall_clock_s + 1)) != first


def test_measurement_covers_every_source_file(tmp_path: Path) -> None:
    copy = _copy_sources(tmp_path / "pkg")
    limits = ExecutorLimits()
    assert compute_measurement(limits, package_dir=copy) == compute_measurement(limits)
    seen = {compute_measurement(limits)}
    for rel in ENCLAVE_SOURCES:
        path = copy / rel
        original = path.read_bytes()
        path.write_bytes(original + b"\n# changed\n")
        seen.add(compute_measurement(limits, package_dir=copy))
        path.write_bytes(original)
    assert len(seen) == len(ENCLAVE_SOURCES) + 1
    assert [rel for rel, _ in source_digests(copy)] == list(ENCLAVE_SOURCES)


def test_missing_source_is_a_usage_error(tmp_path: Path) -> None:
    copy = _copy_sources(tmp_path / "pkg")
    (copy / "tee" / "executor.py").unlink()
    with pytest.raises(UsageError, match=r"tee/executor\.py"):
        compute_measurement(ExecutorLimits(), package_dir=copy)


def test_enclave_process_loads_only_its_measured_sources() -> None:
    probe = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(PACKAGE_DIR / 'tee')!r})\n"
        "import enclave_boot\n"
        "enclave_boot._install_minimal_packages()\n"
        "import importlib\n"
        "importlib.import_module('phala_p2p.tee.enclave_main')\n"
        "mods = sorted(n for n, m in sys.modules.items()\n"
        "              if n.startswith('phala_p2p.') and getattr(m, '__file__', None))\n"
        "heavy = [m for m in ('trio', 'libp2p') if m in sys.modules]\n"
        "print(json.dumps([mods, heavy]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", probe], capture_output=True, check=True, timeout=60
    )
    mods, heavy = json.loads(out.stdout)
    loaded = set(mods)
    measured = {"phala_p2p." + rel.removesuffix(".py").replace("/", ".") for rel in ENCLAVE_SOURCES}
    assert loaded <= measured, loaded - measured
    assert "phala_p2p.tee.executor" in loaded
    assert not any(name.startswith("phala_p2p.net") for name in loaded)
    assert heavy == []
