"""The enclave's measurement: a hash of the code that runs inside it and of its configuration.

``measurement = BLAKE2b-256(person="phala/tee/meas1",
                            canonical_msgpack([version, sources, config]))`` where

* ``sources`` is a list of ``[relative_path, sha256(file bytes)]`` for every file in
  :data:`ENCLAVE_SOURCES`, in that order (paths relative to the ``phala_p2p`` package);
* ``config`` is a map with the executor limits (:meth:`ExecutorLimits.canonical`), the engine
  settings (:data:`ENGINE_SETTINGS`), the wasmtime version and the job ABI version.

Two enclaves built from the same sources with the same limits have the same measurement; change
one byte of the executor, one limit or the wasmtime version and it changes. The allowed
measurements are kept on chain (see ``protocols/attest.md``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import msgpack

from phala_p2p.errors import UsageError
from phala_p2p.tee.executor import ABI_VERSION, ENGINE_SETTINGS, WASMTIME_VERSION, ExecutorLimits

__all__ = ["ENCLAVE_SOURCES", "MEASUREMENT_VERSION", "compute_measurement", "source_digests"]

MEASUREMENT_VERSION: Final = 1
_PERSON: Final = b"phala/tee/meas1"

# Every module that the enclave process loads from this package (its trusted code base).
ENCLAVE_SOURCES: Final[tuple[str, ...]] = (
    "errors.py",
    "crypto/identity.py",
    "wire/codec.py",
    "tee/executor.py",
    "tee/measurement.py",
    "tee/sealing.py",
    "tee/quote.py",
    "tee/keys.py",
    "tee/statements.py",
    "tee/channel.py",
    "tee/splice.py",
    "tee/enclave_main.py",
    "tee/enclave_boot.py",
    # job sessions (jobs/runner.py) and what they read: agreements, receipts, their layouts
    "crypto/kx.py",
    "crypto/stream.py",
    "jobs/config.py",
    "jobs/enclave.py",
    "jobs/errors.py",
    "jobs/flow.py",
    "jobs/framing.py",
    "jobs/keys.py",
    "jobs/messages.py",
    "jobs/payload.py",
    "jobs/runner.py",
    "jobs/session.py",
    "market/advert.py",
    "market/negotiation.py",
    "market/receipt.py",
    "chain/block.py",
    "chain/bodies.py",
    "chain/evidence.py",
    "chain/miners.py",
    "chain/params.py",
    "chain/payments.py",
    "chain/registry.py",
    "chain/settlement.py",
    "chain/staking.py",
    "chain/tables.py",
    "chain/tx.py",
    "chain/validators.py",
    "tee/dcap.py",
    "tee/messages.py",
    "tee/policy.py",
)

_PACKAGE_DIR: Final = Path(__file__).resolve().parent.parent


def source_digests(package_dir: Path | None = None) -> list[tuple[str, bytes]]:
    """``(relative path, SHA-256)`` of every enclave source file, in measurement order."""
    root = package_dir if package_dir is not None else _PACKAGE_DIR
    out: list[tuple[str, bytes]] = []
    for rel in ENCLAVE_SOURCES:
        path = root / rel
        try:
            data = path.read_bytes()
        except OSError as err:
            raise UsageError(f"enclave source {rel} cannot be read: {err}") from err
        out.append((rel, hashlib.sha256(data).digest()))
    return out


def compute_measurement(
    limits: ExecutorLimits,
    *,
    package_dir: Path | None = None,
    sources: Sequence[tuple[str, bytes]] | None = None,
) -> bytes:
    """The 32-byte measurement of an enclave running these sources with these limits.

    ``sources`` are digests taken earlier with :func:`source_digests` (an enclave takes its
    own once, at start, and measures its peers' configurations against them).
    """
    if not isinstance(limits, ExecutorLimits):
        raise UsageError("limits must be an ExecutorLimits")
    digests = list(sources) if sources is not None else source_digests(package_dir)
    config = {
        "limits": limits.canonical(),
        "engine": dict(sorted(ENGINE_SETTINGS.items())),
        "wasmtime": WASMTIME_VERSION,
        "abi": ABI_VERSION,
    }
    body = [
        MEASUREMENT_VERSION,
        [[rel, digest] for rel, digest in digests],
        dict(sorted(config.items())),
    ]
    packed = msgpack.packb(body, use_bin_type=True)
    return hashlib.blake2b(packed, digest_size=32, person=_PERSON).digest()
