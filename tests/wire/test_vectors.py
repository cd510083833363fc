"""The code reproduces every byte of protocols/vectors/{envelope,frames}.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from phala_p2p.crypto.identity import Identity, verify_signature
from phala_p2p.errors import ProtocolViolation
from phala_p2p.wire.envelope import SIGNING_CONTEXT, open_envelope, seal, signing_bytes
from phala_p2p.wire.frames import (
    Frame,
    FrameDecoder,
    FrameType,
    MessageAssembler,
    encode_frame,
    encode_message,
)

VECTORS = Path(__file__).resolve().parents[2] / "protocols" / "vectors"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / name).read_text(encoding="utf-8"))
    return data


ENVELOPES = load("envelope.json")
FRAMES = load("frames.json")


def test_vector_files_are_not_empty() -> None:
    assert len(ENVELOPES["valid"]) >= 3
    assert len(ENVELOPES["invalid"]) >= 5
    assert {case["reason"] for case in ENVELOPES["invalid"]} >= {
        "bad_signature",
        "bad_version",
        "malformed",
        "too_large",
    }
    assert any(case["name"] == "wrong domain" for case in ENVELOPES["invalid"])
    assert len(FRAMES["frames"]) >= 4
    assert ENVELOPES["signing_context"] == SIGNING_CONTEXT.decode()


@pytest.mark.parametrize("case", ENVELOPES["valid"], ids=lambda c: c["name"])
def test_envelope_vector(case: dict[str, Any]) -> None:
    identity = Identity.from_seed(bytes.fromhex(case["seed"]))
    assert identity.public_key.hex() == case["public_key"]
    body = bytes.fromhex(case["body"])
    signed = signing_bytes(
        case["domain"],
        case["version"],
        case["kind"],
        body,
        identity.public_key,
        case["seqno"],
        case["time_ms"],
    )
    assert signed.hex() == case["signing_bytes"]
    assert identity.sign(signed).hex() == case["signature"]
    assert verify_signature(identity.public_key, signed, bytes.fromhex(case["signature"]))
    wire = seal(
        identity,
        domain=case["domain"],
        kind=case["kind"],
        body=body,
        seqno=case["seqno"],
        time_ms=case["time_ms"],
    )
    assert wire.hex() == case["envelope"]
    env = open_envelope(bytes.fromhex(case["envelope"]), domain=case["domain"])
    assert (env.version, env.kind, env.body) == (case["version"], case["kind"], body)
    assert (env.signer.hex(), env.seqno, env.time_ms) == (
        case["public_key"],
        case["seqno"],
        case["time_ms"],
    )
    assert env.signature.hex() == case["signature"]


@pytest.mark.parametrize("case", ENVELOPES["invalid"], ids=lambda c: c["name"])
def test_envelope_negative_vector(case: dict[str, Any]) -> None:
    kwargs = {"max_size": case["max_size"]} if "max_size" in case else {}
    with pytest.raises(ProtocolViolation) as info:
        open_envelope(bytes.fromhex(case["envelope"]), domain=case["domain"], **kwargs)
    assert info.value.reason == case["reason"]


@pytest.mark.parametrize("case", FRAMES["frames"], ids=lambda c: c["name"])
def test_frame_vector(case: dict[str, Any]) -> None:
    payload = bytes.fromhex(case["payload"])
    wire = encode_frame(FrameType(case["type"]), payload)
    assert wire.hex() == case["frame"]
    decoder = FrameDecoder()
    decoder.feed(wire)
    assert decoder.next_frame() == Frame(FrameType(case["type"]), payload)
    assert decoder.next_frame() is None


@pytest.mark.parametrize("case", FRAMES["messages"], ids=lambda c: c["message"][:16] or "empty")
def test_message_vector(case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["message"])
    frames = encode_message(data, chunk_size=case["chunk_size"])
    assert [f.hex() for f in frames] == case["frames"]
    decoder = FrameDecoder()
    decoder.feed(b"".join(bytes.fromhex(f) for f in case["frames"]))
    assembler = MessageAssembler(max_message=len(data))
    results = []
    while (frame := decoder.next_frame()) is not None:
        results.append(assembler.add(frame))
    assert results[-1] == data
    assert all(r is None for r in results[:-1])


@pytest.mark.parametrize("case", FRAMES["invalid"], ids=lambda c: c["name"])
def test_frame_negative_vector(case: dict[str, Any]) -> None:
    decoder = FrameDecoder(max_frame=case["max_frame"])
    decoder.feed(bytes.fromhex(case["bytes"]))
    with pytest.raises(ProtocolViolation) as info:
        decoder.next_frame()
    assert info.value.reason == case["reason"]
