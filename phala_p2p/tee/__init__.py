"""tee room: the enclave boundary, attestation quotes and the WebAssembly executor.

* :mod:`~phala_p2p.tee.executor`: wasmtime executor for job ABI v1 (``protocols/job-abi.md``).
* :mod:`~phala_p2p.tee.enclave`: the :class:`Enclave` interface and the simulated enclave,
  which runs in its own OS process and keeps its keys and the jobs' plaintext inside.
* :mod:`~phala_p2p.tee.quote`, :mod:`~phala_p2p.tee.dcap`, :mod:`~phala_p2p.tee.policy`:
  simulated quotes, Intel SGX/TDX DCAP verification, and the attestation policy
  (``protocols/attest.md``).
* :mod:`~phala_p2p.tee.sealing`: job session keys and sealed payloads.
"""

from __future__ import annotations

from phala_p2p.tee.dcap import DcapReport, verify_quote
from phala_p2p.tee.enclave import (
    Enclave,
    EnclaveConfig,
    EnclaveInfo,
    SealedResult,
    SimulatedEnclave,
    answer_attest,
    open_simulated_enclave,
)
from phala_p2p.tee.executor import ExecResult, ExecutorLimits, WasmExecutor
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

__all__ = [
    "AttestRequest",
    "AttestResponse",
    "AttestationPolicy",
    "ClientSession",
    "DcapReport",
    "Enclave",
    "EnclaveConfig",
    "EnclaveInfo",
    "ExecResult",
    "ExecutorLimits",
    "SealedResult",
    "SessionOffer",
    "SessionOpen",
    "SimQuote",
    "SimulatedEnclave",
    "UsageReceipt",
    "WasmExecutor",
    "answer_attest",
    "compute_measurement",
    "make_report_data",
    "open_simulated_enclave",
    "sign_sim_quote",
    "verify_attestation",
    "verify_quote",
    "verify_receipt",
    "verify_sim_quote",
]
