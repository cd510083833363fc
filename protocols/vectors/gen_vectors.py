"""Regenerate envelope.json and frames.json from the reference implementation.

    .venv/bin/python protocols/vectors/gen_vectors.py

The vectors pin exact bytes: Ed25519 signatures are deterministic, so the same seed, domain
and fields always give the same envelope. tests/wire/test_vectors.py loads the JSON files and
checks that the code reproduces every byte; regenerate only when the wire format changes on
purpose (and bump its version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack

from phala_p2p.crypto.identity import Identity
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


def main() -> None:
    for name, content in (
        ("envelope.json", envelope_vectors()),
        ("frames.json", frame_vectors()),
    ):
        path = HERE / name
        path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
