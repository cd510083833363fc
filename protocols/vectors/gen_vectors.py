"""Regenerate envelope.json, frames.json and market.json from the reference implementation.

    .venv/bin/python protocols/vectors/gen_vectors.py

The vectors pin exact bytes: Ed25519 signatures are deterministic, so the same seed, domain
and fields always give the same envelope. tests/wire/test_vectors.py loads the JSON files and
checks that the code reproduces every byte (tests/market/test_vectors.py for market.json);
regenerate only when the wire format changes on purpose (and bump its version).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import msgpack

from phala_p2p.crypto.identity import Identity
from phala_p2p.market.advert import CapacityAdvert, SignedAdvert, advert_payload
from phala_p2p.market.negotiation import (
    Agreement,
    AgreementTerms,
    Counter,
    Proposal,
    Refusal,
    agreement_id,
)
from phala_p2p.tee.statements import PURPOSES, statement_bytes
from phala_p2p.wire.codec import encode
from phala_p2p.wire.envelope import SIGNING_CONTEXT, seal, signing_bytes
from phala_p2p.wire.frames import (
    FrameType,
    encode_cancel,
    encode_error,
    encode_frame,
    encode_message,
)

HERE = Path(__file__).resolve().parent

ENVELOPE_CASES: list[dict[str, Any]] = [
    {
        "name": "small body, seed 00..1f",
        "seed": bytes(range(32)),
        "domain": "phala/txs/1",
        "kind": 1,
        "body": b"hello",
        "seqno": 1,
        "time_ms": 1_700_000_000_000,
    },
    {
        "name": "empty body, zero seqno and time",
        "seed": bytes(32),
        "domain": "phala/blocks/1",
        "kind": 0,
        "body": b"",
        "seqno": 0,
        "time_ms": 0,
    },
    {
        "name": "largest kind and seqno, bin16 body",
        "seed": b"\xff" * 32,
        "domain": "phala/capacity/1",
        "kind": 65535,
        "body": bytes(range(256)) + bytes(44),
        "seqno": (1 << 64) - 1,
        "time_ms": 1 << 48,
    },
    {
        "name": "non-ASCII domain (UTF-8 in the signed bytes)",
        "seed": bytes(range(32, 64)),
        "domain": "phala/tést/1",
        "kind": 7,
        "body": b"\x00\x01\x02",
        "seqno": 1_700_000_000_000_000_000,
        "time_ms": 1_700_000_000_123,
    },
]


def _pack(obj: Any) -> bytes:
    packed: bytes = msgpack.packb(obj, use_bin_type=True)
    return packed


def envelope_vectors() -> dict[str, Any]:
    valid = []
    for case in ENVELOPE_CASES:
        identity = Identity.from_seed(case["seed"])
        wire = seal(
            identity,
            domain=case["domain"],
            kind=case["kind"],
            body=case["body"],
            seqno=case["seqno"],
            time_ms=case["time_ms"],
        )
        signed = signing_bytes(
            case["domain"],
            1,
            case["kind"],
            case["body"],
            identity.public_key,
            case["seqno"],
            case["time_ms"],
        )
        signature = identity.sign(signed)
        valid.append(
            {
                "name": case["name"],
                "seed": case["seed"].hex(),
                "public_key": identity.public_key.hex(),
                "domain": case["domain"],
                "version": 1,
                "kind": case["kind"],
                "body": case["body"].hex(),
                "seqno": case["seqno"],
                "time_ms": case["time_ms"],
                "signing_bytes": signed.hex(),
                "signature": signature.hex(),
                "envelope": wire.hex(),
            }
        )

    first = ENVELOPE_CASES[0]
    identity = Identity.from_seed(first["seed"])
    good = seal(
        identity,
        domain=first["domain"],
        kind=first["kind"],
        body=first["body"],
        seqno=first["seqno"],
        time_ms=first["time_ms"],
    )
    fields = msgpack.unpackb(good)
    signer, signature = fields[3], fields[6]

    def variant(index: int, value: Any) -> bytes:
        copy = list(fields)
        copy[index] = value
        return _pack(copy)

    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    other = Identity.from_seed(bytes(range(1, 33)))
    # The same values with seqno 1 written as a uint64 (0xcf + 8 bytes) instead of a fixint.
    non_canonical_seqno = (
        b"\x97"
        + b"".join(_pack(v) for v in fields[:4])
        + b"\xcf"
        + fields[4].to_bytes(8, "big")
        + b"".join(_pack(v) for v in fields[5:])
    )
    negative = [
        (
            "forged signature (one bit flipped)",
            variant(6, flipped),
            first["domain"],
            None,
            "bad_signature",
        ),
        ("wrong domain", good, "phala/blocks/1", None, "bad_signature"),
        (
            "body changed after signing",
            variant(2, b"hellO"),
            first["domain"],
            None,
            "bad_signature",
        ),
        (
            "signer replaced by another key",
            variant(3, other.public_key),
            first["domain"],
            None,
            "bad_signature",
        ),
        ("version 2", variant(0, 2), first["domain"], None, "bad_version"),
        ("six fields", _pack(fields[:6]), first["domain"], None, "malformed"),
        ("body as str instead of bin", variant(2, "hello"), first["domain"], None, "malformed"),
        ("signer of 31 bytes", variant(3, signer[:31]), first["domain"], None, "malformed"),
        ("negative seqno", variant(4, -1), first["domain"], None, "malformed"),
        ("non-canonical int encoding", non_canonical_seqno, first["domain"], None, "malformed"),
        ("trailing byte", good + b"\x00", first["domain"], None, "malformed"),
        ("truncated", good[:-1], first["domain"], None, "malformed"),
        ("not an array", _pack({"version": 1}), first["domain"], None, "malformed"),
        ("over max_size", good, first["domain"], len(good) - 1, "too_large"),
    ]
    return {
        "description": (
            "Signed envelopes (protocols/envelope.md). 'valid': sealing with the seed gives "
            "exactly 'envelope'; 'signing_bytes' is what the signature covers. 'invalid': "
            "opening 'envelope' with 'domain' (and 'max_size' when given) fails with 'reason'."
        ),
        "signing_context": SIGNING_CONTEXT.decode("ascii"),
        "valid": valid,
        "invalid": [
            {
                "name": name,
                "envelope": wire.hex(),
                "domain": domain,
                **({"max_size": max_size} if max_size is not None else {}),
                "reason": reason,
            }
            for name, wire, domain, max_size, reason in negative
        ],
    }


def frame_vectors() -> dict[str, Any]:
    frames = [
        ("DATA", encode_frame(FrameType.DATA, b"abc"), "616263"),
        ("END of a 3-byte message", encode_frame(FrameType.END, (3).to_bytes(8, "big")), None),
        ("END of an empty message", encode_frame(FrameType.END, bytes(8)), None),
        ("ERROR 404 'not found'", encode_error(404, "not found"), None),
        ("ERROR code 0, empty message", encode_error(0, ""), None),
        ("CANCEL 'timeout'", encode_cancel("timeout"), None),
        ("CANCEL, empty reason", encode_cancel(""), None),
    ]
    messages = [
        (b"", 4),
        (b"hello", 4),
        (b"hello, world", 4),
        (bytes(range(10)), 10),
    ]
    bad = [
        ("unknown frame type 0", bytes([0, 0, 0, 0, 1, 0]), 1 << 20, "bad_frame_type"),
        ("unknown frame type 5", bytes([5, 0, 0, 0, 0]), 1 << 20, "bad_frame_type"),
        (
            "DATA header over max_frame (no payload needed)",
            bytes([1, 0, 0, 0, 17]),
            16,
            "frame_too_large",
        ),
        (
            "DATA header announcing 4 GiB - 1",
            bytes([1, 255, 255, 255, 255]),
            1 << 20,
            "frame_too_large",
        ),
        ("empty DATA frame", bytes([1, 0, 0, 0, 0]), 1 << 20, "malformed"),
        ("END with a 4-byte payload", bytes([2, 0, 0, 0, 4, 0, 0, 0, 3]), 1 << 20, "malformed"),
        ("ERROR with a 1-byte payload", bytes([3, 0, 0, 0, 1, 0]), 1 << 20, "malformed"),
        ("ERROR over 1026 bytes", bytes([3, 0, 0, 4, 3]), 1 << 20, "malformed"),
        ("CANCEL over 1024 bytes", bytes([4, 0, 0, 4, 1]), 1 << 20, "malformed"),
    ]
    return {
        "description": (
            "Stream frames (protocols/framing.md): type (1 byte), payload length (4 bytes, "
            "big-endian), payload. 'frames': one frame each. 'messages': a message split in "
            "DATA frames of at most 'chunk_size' bytes, then END. 'invalid': bytes that a "
            "decoder with 'max_frame' refuses as soon as the header is complete."
        ),
        "frames": [
            {"name": name, "type": wire[0], "payload": wire[5:].hex(), "frame": wire.hex()}
            for name, wire, _ in frames
        ],
        "messages": [
            {
                "message": data.hex(),
                "chunk_size": chunk,
                "frames": [f.hex() for f in encode_message(data, chunk_size=chunk)],
            }
            for data, chunk in messages
        ],
        "invalid": [
            {"name": name, "bytes": raw.hex(), "max_frame": max_frame, "reason": reason}
            for name, raw, max_frame, reason in bad
        ],
    }


# -- market.json -----------------------------------------------------------------------------

MARKET_SEEDS = {
    "enclave": bytes(range(0x40, 0x60)),  # the miner's enclave identity key
    "operator": bytes(range(0x60, 0x80)),  # the miner's account (its public key is paid)
    "client": bytes(range(0x80, 0xA0)),  # the client's account
}
MARKET_CHAIN = "phala-vectors"
MARKET_NOW = 1_700_000_000_000


def to_json(value: Any) -> Any:
    """A message's fields as JSON, in declaration order: bytes as hex, nested messages as
    objects, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple | list):
        return [to_json(v) for v in value]
    return value


def market_messages() -> dict[str, Any]:
    """The market messages pinned by market.json (the test rebuilds them the same way)."""
    enclave = Identity.from_seed(MARKET_SEEDS["enclave"])
    operator = Identity.from_seed(MARKET_SEEDS["operator"])
    client = Identity.from_seed(MARKET_SEEDS["client"])
    advert = CapacityAdvert(
        chain_id=MARKET_CHAIN,
        peer_id="12D3KooWVectorMiner",
        addrs=("/ip4/192.0.2.1/tcp/4001", "/ip6/2001:db8::1/tcp/4001"),
        operator=operator.public_key,
        enclave=enclave.public_key,
        registered_height=42,
        cores=8,
        memory=1 << 30,
        fuel_per_s=25_000_000,
        price=1_000,
        max_input=1 << 20,
        max_fuel=1 << 32,
        slots=4,
        free_slots=3,
        tags=("wasm", "sim"),
        seq=MARKET_NOW,
        issued_ms=MARKET_NOW,
        expires_ms=MARKET_NOW + 60_000,
    )
    payload = advert_payload(advert)
    signed = SignedAdvert(payload, enclave.sign(statement_bytes("advert", payload)))

    proposal_id = bytes(range(0xB0, 0xC0))
    terms = AgreementTerms(
        agreement_id=agreement_id(MARKET_CHAIN, client.public_key, proposal_id),
        chain_id=MARKET_CHAIN,
        client=client.public_key,
        client_peer="12D3KooWVectorClient",
        miner_peer=advert.peer_id,
        enclave=enclave.public_key,
        operator=operator.public_key,
        escrow_id=bytes(range(0xC0, 0xE0)),
        job_bytes=4_096,
        max_fuel=2_000_000,
        price=800,  # below the miner's ask: it counters
        deadline_ms=MARKET_NOW + 300_000,
    )
    proposal = Proposal(
        proposal_id=proposal_id,
        round=0,
        terms=terms,
        escrow_height=57,
        expires_ms=MARKET_NOW + 10_000,
        client_sig=client.sign(statement_bytes("agreement", terms.payload())),
    )
    # the ask (1,000 per million fuel) and the fuel a 1,600 escrow buys at it
    offered = dataclasses.replace(terms, price=1_000, max_fuel=1_600_000)
    unsigned = Counter(proposal_id, 1, offered, MARKET_NOW + 10_000, b"")
    counter = dataclasses.replace(
        unsigned, miner_sig=enclave.sign(statement_bytes("counter", unsigned.unsigned()))
    )
    agreement = Agreement(
        terms=offered,
        client_sig=client.sign(statement_bytes("agreement", offered.payload())),
        miner_sig=enclave.sign(statement_bytes("agreement", offered.payload())),
    )
    refusal = Refusal(proposal_id, 0, "no_slots", "all 4 slots are taken", 2_500)
    return {
        "keys": {"enclave": enclave, "operator": operator, "client": client},
        "advert": advert,
        "signed_advert": signed,
        "proposal": proposal,
        "counter": counter,
        "agreement": agreement,
        "refusal": refusal,
    }


def market_vectors() -> dict[str, Any]:
    m = market_messages()
    keys = m["keys"]
    advert, signed = m["advert"], m["signed_advert"]
    proposal, counter, agreement = m["proposal"], m["counter"], m["agreement"]
    enclave = keys["enclave"]

    def resigned(bad: CapacityAdvert) -> str:
        data = encode(bad)
        return encode(SignedAdvert(data, enclave.sign(statement_bytes("advert", data)))).hex()

    wrong_domain = SignedAdvert(
        signed.advert, enclave.sign(statement_bytes("counter", signed.advert))
    )
    invalid = [
        ("signed under the counter domain", encode(wrong_domain).hex(), "bad_signature"),
        (
            "signed by another key",
            encode(
                SignedAdvert(
                    signed.advert, keys["client"].sign(statement_bytes("advert", signed.advert))
                )
            ).hex(),
            "bad_signature",
        ),
        (
            "more free slots than slots",
            resigned(dataclasses.replace(advert, free_slots=5)),
            "over_limit",
        ),
        (
            "lives longer than 10 minutes",
            resigned(dataclasses.replace(advert, expires_ms=advert.issued_ms + 600_001)),
            "over_limit",
        ),
        (
            "expires when issued",
            resigned(dataclasses.replace(advert, expires_ms=advert.issued_ms)),
            "malformed",
        ),
    ]
    return {
        "description": (
            "Market messages (protocols/market.md). Keys are Ed25519 from 'seeds'. 'fields' "
            "list each message's fields in wire order (bytes as hex); 'wire' is the message's "
            "encoding; 'statement' is what a signature covers: the purpose's domain, then the "
            "signed bytes. 'invalid': SignedAdvert wire bytes that decode, whose advert fails "
            "with 'reason' when decoded and its signature checked."
        ),
        "seeds": {name: seed.hex() for name, seed in MARKET_SEEDS.items()},
        "public_keys": {name: key.public_key.hex() for name, key in keys.items()},
        "domains": {name: domain.hex() for name, domain in PURPOSES.items()},
        "signed_advert": {
            "advert": {"fields": to_json(advert), "wire": signed.advert.hex()},
            "statement": statement_bytes("advert", signed.advert).hex(),
            "signature": signed.signature.hex(),
            "wire": encode(signed).hex(),
        },
        "proposal": {
            "agreement_id": {
                "chain_id": MARKET_CHAIN,
                "client": proposal.terms.client.hex(),
                "proposal_id": proposal.proposal_id.hex(),
                "agreement_id": proposal.terms.agreement_id.hex(),
            },
            "terms_wire": proposal.terms.payload().hex(),
            "statement": statement_bytes("agreement", proposal.terms.payload()).hex(),
            "fields": to_json(proposal),
            "wire": encode(proposal).hex(),
        },
        "counter": {
            "unsigned": counter.unsigned().hex(),
            "statement": statement_bytes("counter", counter.unsigned()).hex(),
            "fields": to_json(counter),
            "wire": encode(counter).hex(),
        },
        "agreement": {
            "terms_wire": agreement.terms.payload().hex(),
            "statement": statement_bytes("agreement", agreement.terms.payload()).hex(),
            "fields": to_json(agreement),
            "wire": encode(agreement).hex(),
        },
        "refusal": {"fields": to_json(m["refusal"]), "wire": encode(m["refusal"]).hex()},
        "invalid": [
            {"name": name, "signed_advert": wire, "reason": reason}
            for name, wire, reason in invalid
        ],
    }


def main() -> None:
    for name, content in (
        ("envelope.json", envelope_vectors()),
        ("frames.json", frame_vectors()),
        ("market.json", market_vectors()),
    ):
        path = HERE / name
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
