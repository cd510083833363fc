"""Intel SGX and TDX DCAP quote verification (offline, with dcap-qvl).

:func:`verify_quote` checks a raw quote against its collateral (certificate chains, CRLs, TCB
info, QE identity: the ``QuoteCollateralV3`` JSON of dcap-qvl) at a given time and returns a
:class:`DcapReport`. Every failure raises :class:`~phala_p2p.errors.AttestationError` carrying
the verifier's own reason. Whether the report is good enough (measurement, TCB status, report
data) is the job of :class:`~phala_p2p.tee.policy.AttestationPolicy`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Final

import dcap_qvl

from phala_p2p.errors import AttestationError

__all__ = ["MAX_COLLATERAL_CHARS", "MAX_QUOTE_BYTES", "DcapReport", "verify_quote"]

MAX_QUOTE_BYTES: Final = 64 * 1024
MAX_COLLATERAL_CHARS: Final = 1024 * 1024
_TDX_MEASUREMENT_PERSON: Final = b"phala/tee/tdxm1"


@dataclass(frozen=True)
class DcapReport:
    """The verified content of an SGX or TDX quote.

    ``mr_enclave``/``mr_signer`` are set for SGX (32 bytes each), ``mr_td`` (48 bytes) and
    ``rtmrs`` (four 48-byte registers) for TDX; the other platform's fields are ``None``/empty.
    ``verified_at`` is the time the collateral was checked against.
    """

    tee: str
    tcb_status: str
    advisory_ids: tuple[str, ...]
    report_data: bytes
    verified_at: int
    mr_enclave: bytes | None = None
    mr_signer: bytes | None = None
    mr_td: bytes | None = None
    rtmrs: tuple[bytes, ...] = ()
    mr_seam: bytes | None = None

    @property
    def measurement(self) -> bytes:
        """What the attestation policy compares with its allowed measurements.

        SGX: MRENCLAVE. TDX: BLAKE2b-256(person="phala/tee/tdxm1", MRTD || RTMR0..RTMR3).
        """
        if self.tee == "SGX":
            assert self.mr_enclave is not None
            return self.mr_enclave
        assert self.mr_td is not None
        return hashlib.blake2b(
            self.mr_td + b"".join(self.rtmrs), digest_size=32, person=_TDX_MEASUREMENT_PERSON
        ).digest()


def _hex_field(body: dict[str, Any], name: str, length: int) -> bytes:
    value = body.get(name)
    if not isinstance(value, str):
        raise AttestationError(f"verified report lacks {name}")
    try:
        raw = bytes.fromhex(value)
    except ValueError as err:
        raise AttestationError(f"verified report has a malformed {name}") from err
    if len(raw) != length:
        raise AttestationError(f"verified report's {name} is {len(raw)} bytes, not {length}")
    return raw


def verify_quote(raw: bytes, collateral_json: str, now: int) -> DcapReport:
    """Verify a DCAP quote (SGX or TDX) offline against ``collateral_json`` at time ``now``.

    Raises AttestationError with the verifier's reason on any failure: malformed quote or
    collateral, bad signature, broken certificate chain, revoked or expired collateral.
    """
    if not isinstance(raw, bytes | bytearray):
        raise AttestationError("quote must be bytes")
    if not 0 < len(raw) <= MAX_QUOTE_BYTES:
        raise AttestationError(f"quote is {len(raw)} bytes; expected 1..{MAX_QUOTE_BYTES}")
    if not isinstance(collateral_json, str):
        raise AttestationError("collateral must be a JSON string")
    if len(collateral_json) > MAX_COLLATERAL_CHARS:
        raise AttestationError(f"collateral is above {MAX_COLLATERAL_CHARS} characters")
    if isinstance(now, bool) or not isinstance(now, int) or not 0 <= now < 2**63:
        raise AttestationError(f"verification time must be a non-negative int, got {now!r}")
    try:
        collateral = dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    except (ValueError, TypeError, OverflowError, RuntimeError) as err:
        raise AttestationError(f"collateral is invalid: {err}") from err
    try:
        verified = dcap_qvl.verify(bytes(raw), collateral, now)
        report_json = verified.to_json()
    except (ValueError, TypeError, OverflowError, RuntimeError) as err:
        raise AttestationError(str(err).strip() or type(err).__name__) from err
    return _report_from_json(report_json, now)


def _report_from_json(report_json: str, now: int) -> DcapReport:
    try:
        doc = json.loads(report_json)
    except ValueError as err:
        raise AttestationError("verifier returned a malformed report") from err
    if not isinstance(doc, dict):
        raise AttestationError("verifier returned a malformed report")
    status = doc.get("status")
    advisories = doc.get("advisory_ids")
    report = doc.get("report")
    if not isinstance(status, str) or not isinstance(advisories, list):
        raise AttestationError("verified report lacks its status or advisories")
    if not all(isinstance(a, str) for a in advisories):
        raise AttestationError("verified report has malformed advisory ids")
    if not isinstance(report, dict) or len(report) != 1:
        raise AttestationError("verified report lacks its enclave or TD report")
    ((kind, body),) = report.items()
    if not isinstance(body, dict):
        raise AttestationError("verified report body is malformed")
    report_data = _hex_field(body, "report_data", 64)
    if kind == "SgxEnclave":
        return DcapReport(
            tee="SGX",
            tcb_status=status,
            advisory_ids=tuple(advisories),
            report_data=report_data,
            verified_at=now,
            mr_enclave=_hex_field(body, "mr_enclave", 32),
            mr_signer=_hex_field(body, "mr_signer", 32),
        )
    if kind.startswith("TD"):
        return DcapReport(
            tee="TDX",
            tcb_status=status,
            advisory_ids=tuple(advisories),
            report_data=report_data,
            verified_at=now,
            mr_td=_hex_field(body, "mr_td", 48),
            rtmrs=tuple(_hex_field(body, f"rt_mr{i}", 48) for i in range(4)),
            mr_seam=_hex_field(body, "mr_seam", 48),
        )
    raise AttestationError(f"unsupported report type {kind!r}")
