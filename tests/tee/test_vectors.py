"""The test vectors pinned in protocols/attest.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from phala_p2p.crypto.identity import Identity
from phala_p2p.tee.messages import AttestRequest
from phala_p2p.tee.quote import (
    UsageReceipt,
    make_report_data,
    sign_receipt,
    sign_sim_quote,
    verify_receipt,
    verify_sim_quote,
)
from phala_p2p.wire.codec import decode, encode

SPEC = Path(__file__).resolve().parents[2] / "protocols" / "attest.md"
NONCE = b"phala-attest-vector-nonce"


@pytest.fixture(scope="module")
def vectors() -> dict[str, bytes]:
    text = SPEC.read_text()
    block = re.search(r"```vectors\n(.*?)```", text, re.S)
    assert block is not None, "protocols/attest.md lacks its vectors block"
    out = {}
    for line in block.group(1).strip().splitlines():
        name, _, value = line.partition(" = ")
        out[name.strip()] = bytes.fromhex(value.strip())
    return out


def test_report_data_and_sim_quote_vectors(vectors: dict[str, bytes]) -> None:
    root = Identity.from_seed(b"\x01" * 32)
    assert root.public_key == vectors["root_pub"]
    report_data = make_report_data(b"\x11" * 32, b"\x22" * 32, nonce=NONCE)
    assert report_data == vectors["report_data"]
    raw = sign_sim_quote(root, bytes(range(32)), report_data, 1_700_000_000)
    assert raw == vectors["sim_quote"]
    assert verify_sim_quote(vectors["sim_quote"], [root.public_key], 1_700_000_000).timestamp == (
        1_700_000_000
    )


def test_message_vectors(vectors: dict[str, bytes]) -> None:
    assert encode(AttestRequest(nonce=NONCE)) == vectors["attest_request"]
    signer = Identity.from_seed(b"\x03" * 32)
    receipt = sign_receipt(
        signer,
        UsageReceipt(
            session_id=b"s" * 16,
            job_id=b"j" * 16,
            measurement=bytes(range(32)),
            module_hash=b"m" * 32,
            fuel_limit=1000,
            fuel_used=400,
            bytes_in=10,
            bytes_out=20,
            output_hash=b"o" * 32,
            enclave=signer.public_key,
        ),
    )
    assert encode(receipt) == vectors["receipt"]
    decoded = decode(vectors["receipt"], max_size=4096, expect=UsageReceipt)
    verify_receipt(decoded, signer.public_key)
