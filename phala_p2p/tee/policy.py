"""Attestation policy: which verified quotes a node accepts (sans-IO; time is a parameter).

The allowed measurements live on chain and change by governance; a node builds an
:class:`AttestationPolicy` from the chain state and checks every verified quote with it.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from phala_p2p.errors import AttestationError, UsageError
from phala_p2p.tee.dcap import DcapReport, verify_quote
from phala_p2p.tee.messages import AttestResponse
from phala_p2p.tee.quote import SIM_PLATFORM, SimQuote, make_report_data, verify_sim_quote

__all__ = ["DEFAULT_TCB_STATUSES", "AttestationPolicy", "verify_attestation"]

DEFAULT_TCB_STATUSES: Final = frozenset({"UpToDate"})
_PLATFORMS: Final = frozenset({SIM_PLATFORM, "SGX", "TDX"})


@dataclass(frozen=True)
class AttestationPolicy:
    """What a verified quote must satisfy.

    * ``allowed_measurements``: enclave measurements accepted (SIM: the enclave measurement,
      SGX: MRENCLAVE, TDX: :attr:`DcapReport.measurement`).
    * ``accepted_tcb_statuses``: DCAP TCB statuses accepted (simulated quotes have none).
    * ``max_quote_age_s``: a simulated quote's timestamp, or the time a DCAP quote's collateral
      was checked, may be at most this old; ``max_clock_skew_s`` bounds how far in the future.
    * ``platforms``: which of ``SIM``, ``SGX``, ``TDX`` are accepted at all.
    """

    allowed_measurements: frozenset[bytes]
    accepted_tcb_statuses: frozenset[str] = DEFAULT_TCB_STATUSES
    max_quote_age_s: int = 600
    max_clock_skew_s: int = 60
    platforms: frozenset[str] = field(default=_PLATFORMS)

    def __post_init__(self) -> None:
        if not isinstance(self.allowed_measurements, frozenset) or not all(
            isinstance(m, bytes) and 1 <= len(m) <= 64 for m in self.allowed_measurements
        ):
            raise UsageError("allowed_measurements must be a frozenset of 1..64-byte values")
        if not isinstance(self.accepted_tcb_statuses, frozenset) or not all(
            isinstance(s, str) for s in self.accepted_tcb_statuses
        ):
            raise UsageError("accepted_tcb_statuses must be a frozenset of str")
        for name in ("max_quote_age_s", "max_clock_skew_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{name} must be a non-negative int")
        if not isinstance(self.platforms, frozenset) or not self.platforms <= _PLATFORMS:
            raise UsageError(f"platforms must be a subset of {sorted(_PLATFORMS)}")

    def check(self, report: DcapReport | SimQuote, now: int, expected_report_data: bytes) -> None:
        """Raise AttestationError unless ``report`` (already verified) meets this policy."""
        if isinstance(report, SimQuote):
            platform, issued, status = report.platform, report.timestamp, None
        elif isinstance(report, DcapReport):
            platform, issued, status = report.tee, report.verified_at, report.tcb_status
        else:
            raise UsageError("report must be a SimQuote or a DcapReport")
        if platform not in self.platforms:
            raise AttestationError(f"platform {platform} is not accepted by the policy")
        if report.measurement not in self.allowed_measurements:
            raise AttestationError(
                f"unknown measurement {report.measurement.hex()} (not in the allowed set)"
            )
        if status is not None and status not in self.accepted_tcb_statuses:
            raise AttestationError(
                f"TCB status {status} is not accepted "
                f"(accepted: {', '.join(sorted(self.accepted_tcb_statuses)) or 'none'})"
            )
        if issued > now + self.max_clock_skew_s:
            raise AttestationError(f"quote is from the future ({issued - now} s ahead)")
        if now - issued > self.max_quote_age_s:
            raise AttestationError(
                f"quote is stale: {now - issued} s old, the maximum is {self.max_quote_age_s} s"
            )
        if not isinstance(expected_report_data, bytes) or not hmac.compare_digest(
            report.report_data, expected_report_data
        ):
            raise AttestationError("report data does not match the enclave's keys and nonce")


def verify_attestation(
    response: AttestResponse,
    *,
    nonce: bytes,
    policy: AttestationPolicy,
    sim_roots: Iterable[bytes],
    now: int,
) -> DcapReport | SimQuote:
    """Verify a miner's :class:`AttestResponse` to our ``nonce``, end to end.

    Checks the quote (simulated: signed by one of ``sim_roots``; SGX/TDX: DCAP with the given
    collateral at ``now``), then the policy, with the report data recomputed from the keys in
    the response and ``nonce``. Returns the verified report; raises AttestationError.
    """
    if not isinstance(response, AttestResponse):
        raise UsageError("response must be an AttestResponse")
    report: DcapReport | SimQuote
    if response.platform == SIM_PLATFORM:
        report = verify_sim_quote(response.quote, sim_roots, now)
    else:
        report = verify_quote(response.quote, response.collateral, now)
        if report.tee != response.platform:
            raise AttestationError(
                f"response claims platform {response.platform} but the quote is {report.tee}"
            )
    try:
        expected = make_report_data(response.identity_pub, response.x25519_pub, nonce=nonce)
    except UsageError as err:
        raise AttestationError(f"cannot recompute report data: {err}") from err
    policy.check(report, now, expected)
    return report
