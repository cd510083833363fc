from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import wasmtime

REPO = Path(__file__).resolve().parents[2]
JOBS_DIR = REPO / "examples" / "jobs"
# real Intel SGX/TDX quotes with their collateral (copied from ../shared, MIT, see its README)
SAMPLES_DIR = REPO / "tests" / "data" / "attestation-samples"


def compile_wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


@pytest.fixture(scope="session")
def job() -> Callable[[str], bytes]:
    """Compiled example job by name (``examples/jobs/<name>.wat``)."""
    cache: dict[str, bytes] = {}

    def load(name: str) -> bytes:
        if name not in cache:
            cache[name] = compile_wat((JOBS_DIR / f"{name}.wat").read_text())
        return cache[name]

    return load


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES_DIR / "sgx_quote").is_file():
        pytest.skip(f"DCAP attestation samples not found at {SAMPLES_DIR}")
    return SAMPLES_DIR
