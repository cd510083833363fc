"""DCAP verification against the real Intel samples in tests/data/attestation-samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from phala_p2p.errors import AttestationError
from phala_p2p.tee.dcap import DcapReport, verify_quote
from phala_p2p.tee.messages import AttestResponse
from phala_p2p.tee.policy import AttestationPolicy, verify_attestation

NOW = 1751328000  # 2025-07-01, inside both samples' collateral windows
SGX_MRENCLAVE = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"
SGX_MRSIGNER = "815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"
TDX_MRTD = (
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407"
    "de03ae6dc5f87f27428b2538873118b7"
)
TDX_RTMRS = (
    "44c0197b39157fdd7a4dcc44767f9d6b0bb3977c7a8e347b8492f827fe9d9e5c"
    "48aca29b220b80b6a540cf994b9bc9c0",
    "0084452c01668329d4bc06acdf58a7205c26743304509973949e5619bf81a6a7"
    "aea8c323c173019b3093d54e579e9378",
    "d833feef2cd945148aa38ead2c53e9b7f138190aaaebfc551dccd829fc207aa3"
    "ba80b70870d7330733642e01d48c3132",
    "00" * 48,
)
TDX_REPORT_DATA = (
    "9a9d48e7f6799642d3d1b34e1e5e1742d4bb02dd6ddd551862c1211d35c304f9"
    "eca3efdbb481601c163cf52493d6e44aed55d51ec39b7e518fadb92c2b523f20"
)


def _load(samples: Path, tee: str) -> tuple[bytes, str]:
    return (
        (samples / f"{tee}_quote").read_bytes(),
        (samples / f"{tee}_quote_collateral.json").read_text(),
    )


def test_good_sgx_quote(samples: Path) -> None:
    raw, collateral = _load(samples, "sgx")
    report = verify_quote(raw, collateral, NOW)
    assert report.tee == "SGX"
    assert report.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert report.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert report.mr_enclave is not None
    assert report.mr_enclave.hex() == SGX_MRENCLAVE
    assert report.mr_signer is not None
    assert report.mr_signer.hex() == SGX_MRSIGNER
    assert report.report_data == b"Hello, world!" + bytes(51)
    assert report.report_data == raw[368 : 368 + 64]
    assert report.mr_td is None
    assert report.rtmrs == ()
    assert report.measurement == report.mr_enclave
    assert report.verified_at == NOW


def test_good_tdx_quote(samples: Path) -> None:
    raw, collateral = _load(samples, "tdx")
    report = verify_quote(raw, collateral, NOW)
    assert report.tee == "TDX"
    assert report.tcb_status == "UpToDate"
    assert report.advisory_ids == ()
    assert report.mr_td is not None
    assert report.mr_td.hex() == TDX_MRTD
    assert tuple(r.hex() for r in report.rtmrs) == TDX_RTMRS
    assert report.report_data.hex() == TDX_REPORT_DATA
    assert report.report_data == raw[568 : 568 + 64]
    assert report.mr_enclave is None
    assert report.mr_signer is None
    assert len(report.measurement) == 32


@pytest.mark.parametrize(("tee", "offset"), [("sgx", 368), ("tdx", 568), ("sgx", 112)])
def test_flipped_byte_is_refused(samples: Path, tee: str, offset: int) -> None:
    raw, collateral = _load(samples, tee)
    tampered = bytearray(raw)
    tampered[offset] ^= 0x01
    with pytest.raises(AttestationError, match="signature is invalid"):
        verify_quote(bytes(tampered), collateral, NOW)


@pytest.mark.parametrize(
    ("tee", "now", "reason"),
    [
        ("sgx", 1752919279, "QE Identity expired"),
        ("sgx", 1750330570, "issue date is in the future"),
        ("tdx", 1752919235, "CrlExpired"),
        ("tdx", 1750329146, "issue date is in the future"),
    ],
)
def test_outside_the_collateral_window_is_refused(
    samples: Path, tee: str, now: int, reason: str
) -> None:
    raw, collateral = _load(samples, tee)
    with pytest.raises(AttestationError, match=reason):
        verify_quote(raw, collateral, now)


def test_window_edges_verify(samples: Path) -> None:
    raw, collateral = _load(samples, "sgx")
    assert verify_quote(raw, collateral, 1750330571).tee == "SGX"
    assert verify_quote(raw, collateral, 1752919278).tee == "SGX"


def test_malformed_inputs_are_attestation_errors(samples: Path) -> None:
    raw, collateral = _load(samples, "sgx")
    _, tdx_collateral = _load(samples, "tdx")
    with pytest.raises(AttestationError, match="Failed to decode quote"):
        verify_quote(raw[:100], collateral, NOW)
    with pytest.raises(AttestationError, match="collateral is invalid"):
        verify_quote(raw, "{}", NOW)
    with pytest.raises(AttestationError, match="collateral is invalid"):
        verify_quote(raw, "not json", NOW)
    with pytest.raises(AttestationError, match="QE Identity"):
        verify_quote(raw, tdx_collateral, NOW)
    with pytest.raises(AttestationError):
        verify_quote(b"", collateral, NOW)
    with pytest.raises(AttestationError):
        verify_quote(raw, collateral, -1)
    with pytest.raises(AttestationError):
        verify_quote(raw, collateral, 2**64)
    with pytest.raises(AttestationError):
        verify_quote("quote", collateral, NOW)  # type: ignore[arg-type]


def test_policy_on_dcap_reports(samples: Path) -> None:
    sgx = verify_quote(*_load(samples, "sgx"), NOW)
    tdx = verify_quote(*_load(samples, "tdx"), NOW)
    strict = AttestationPolicy(allowed_measurements=frozenset({sgx.measurement, tdx.measurement}))
    strict.check(tdx, NOW, tdx.report_data)
    with pytest.raises(AttestationError, match="TCB status ConfigurationAndSWHardeningNeeded"):
        strict.check(sgx, NOW, sgx.report_data)
    relaxed = AttestationPolicy(
        allowed_measurements=frozenset({sgx.measurement}),
        accepted_tcb_statuses=frozenset({"UpToDate", "ConfigurationAndSWHardeningNeeded"}),
    )
    relaxed.check(sgx, NOW, sgx.report_data)
    with pytest.raises(AttestationError, match="unknown measurement"):
        relaxed.check(tdx, NOW, tdx.report_data)
    with pytest.raises(AttestationError, match="report data"):
        relaxed.check(sgx, NOW, bytes(64))
    with pytest.raises(AttestationError, match="stale"):
        relaxed.check(sgx, NOW + relaxed.max_quote_age_s + 1, sgx.report_data)
    only_tdx = AttestationPolicy(
        allowed_measurements=frozenset({sgx.measurement}), platforms=frozenset({"TDX"})
    )
    with pytest.raises(AttestationError, match="platform SGX"):
        only_tdx.check(sgx, NOW, sgx.report_data)


def test_verify_attestation_recomputes_report_data(samples: Path) -> None:
    # The sample's report data is not bound to keys of ours, so end-to-end binding must fail
    # at the report-data check, after the quote itself verified.
    raw, collateral = _load(samples, "tdx")
    report = verify_quote(raw, collateral, NOW)
    response = AttestResponse(
        platform="TDX",
        quote=raw,
        collateral=collateral,
        identity_pub=b"i" * 32,
        x25519_pub=b"x" * 32,
    )
    policy = AttestationPolicy(allowed_measurements=frozenset({report.measurement}))
    with pytest.raises(AttestationError, match="report data does not match"):
        verify_attestation(response, nonce=b"n" * 16, policy=policy, sim_roots=(), now=NOW)
    lying = AttestResponse(
        platform="SGX",
        quote=raw,
        collateral=collateral,
        identity_pub=b"i" * 32,
        x25519_pub=b"x" * 32,
    )
    with pytest.raises(AttestationError, match="claims platform SGX"):
        verify_attestation(lying, nonce=b"n" * 16, policy=policy, sim_roots=(), now=NOW)


def test_report_is_frozen(samples: Path) -> None:
    report = verify_quote(*_load(samples, "tdx"), NOW)
    assert isinstance(report, DcapReport)
    with pytest.raises(AttributeError):
        report.tcb_status = "UpToDate"  # type: ignore[misc]


def test_public_api_of_the_room() -> None:
    import phala_p2p.tee as tee

    assert tee.verify_quote is verify_quote
    assert tee.DcapReport is DcapReport
    assert tee.AttestationPolicy is AttestationPolicy
