"""tee room: the enclave boundary, attestation quotes and the WebAssembly executor.

* :mod:`~phala_p2p.tee.executor`: wasmtime executor for job ABI v2 (``protocols/job-abi.md``).
* :mod:`~phala_p2p.tee.enclave`: the :class:`Enclave` interface and the simulated enclave,
  which runs in its own OS process and keeps its keys and the jobs' plaintext inside.
* :mod:`~phala_p2p.tee.quote`, :mod:`~phala_p2p.tee.dcap`, :mod:`~phala_p2p.tee.policy`:
  simulated quotes, Intel SGX/TDX DCAP verification, and the attestation policy
  (``protocols/attest.md``).
* :mod:`~phala_p2p.tee.sealing`: job session keys and sealed payloads.
* :mod:`~phala_p2p.tee.keys`: the network's key material, kept inside enclaves: the master
  key, per-epoch cluster keys and client secrets sealed to them (``protocols/attest.md``).

The names below load on first use: the verification modules (quote, dcap, policy, messages)
import neither trio nor the enclave host, so the chain room can use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phala_p2p.tee.dcap import DcapReport, verify_quote
    from phala_p2p.tee.enclave import (
        Enclave,
        EnclaveConfig,
        EnclaveEvidence,
        EnclaveInfo,
        KeyStatus,
        SealedResult,
        SimulatedEnclave,
        answer_attest,
        enclave_evidence,
        open_simulated_enclave,
    )
    from phala_p2p.tee.executor import ExecResult, ExecutorLimits, WasmExecutor
    from phala_p2p.tee.keys import ClusterKey, seal_secret
    from phala_p2p.tee.measurement import compute_measurement
    from phala_p2p.tee.messages import AttestRequest, AttestResponse, SessionOffer, SessionOpen
    from phala_p2p.tee.policy import AttestationPolicy, verify_attestation
    from phala_p2p.tee.quote import (
        SimQuote,
        UsageReceipt,
        make_report_data,
        sign_sim_quote,
        verify_receipt,
        verify_sim_quote,
    )
    from phala_p2p.tee.sealing import ClientSession

_LAZY = {
    "AttestRequest": "phala_p2p.tee.messages",
    "AttestResponse": "phala_p2p.tee.messages",
    "AttestationPolicy": "phala_p2p.tee.policy",
    "ClientSession": "phala_p2p.tee.sealing",
    "ClusterKey": "phala_p2p.tee.keys",
    "DcapReport": "phala_p2p.tee.dcap",
    "Enclave": "phala_p2p.tee.enclave",
    "EnclaveConfig": "phala_p2p.tee.enclave",
    "EnclaveEvidence": "phala_p2p.tee.keyshare",
    "EnclaveInfo": "phala_p2p.tee.enclave",
    "ExecResult": "phala_p2p.tee.executor",
    "ExecutorLimits": "phala_p2p.tee.executor",
    "KeyStatus": "phala_p2p.tee.keyshare",
    "SealedResult": "phala_p2p.tee.enclave",
    "SessionOffer": "phala_p2p.tee.messages",
    "SessionOpen": "phala_p2p.tee.messages",
    "SimQuote": "phala_p2p.tee.quote",
    "SimulatedEnclave": "phala_p2p.tee.enclave",
    "UsageReceipt": "phala_p2p.tee.quote",
    "WasmExecutor": "phala_p2p.tee.executor",
    "answer_attest": "phala_p2p.tee.enclave",
    "compute_measurement": "phala_p2p.tee.measurement",
    "enclave_evidence": "phala_p2p.tee.enclave",
    "make_report_data": "phala_p2p.tee.quote",
    "open_simulated_enclave": "phala_p2p.tee.enclave",
    "seal_secret": "phala_p2p.tee.keys",
    "sign_sim_quote": "phala_p2p.tee.quote",
    "verify_attestation": "phala_p2p.tee.policy",
    "verify_quote": "phala_p2p.tee.dcap",
    "verify_receipt": "phala_p2p.tee.quote",
    "verify_sim_quote": "phala_p2p.tee.quote",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'phala_p2p.tee' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "AttestRequest",
    "AttestResponse",
    "AttestationPolicy",
    "ClientSession",
    "ClusterKey",
    "DcapReport",
    "Enclave",
    "EnclaveConfig",
    "EnclaveEvidence",
    "EnclaveInfo",
    "ExecResult",
    "ExecutorLimits",
    "KeyStatus",
    "SealedResult",
    "SessionOffer",
    "SessionOpen",
    "SimQuote",
    "SimulatedEnclave",
    "UsageReceipt",
    "WasmExecutor",
    "answer_attest",
    "compute_measurement",
    "enclave_evidence",
    "make_report_data",
    "open_simulated_enclave",
    "seal_secret",
    "sign_sim_quote",
    "verify_attestation",
    "verify_quote",
    "verify_receipt",
    "verify_sim_quote",
]
