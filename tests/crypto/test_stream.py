"""STREAM chunked AEAD: round trips, and typed refusal of tampering, reordering, truncation."""

from __future__ import annotations

import nacl.bindings
import nacl.exceptions
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.crypto.stream import (
    CHUNK_OVERHEAD,
    StreamOpener,
    StreamSealer,
    associated_data,
    chunk_nonce,
)
from phala_p2p.errors import (
    ProtocolViolation,
    StreamReordered,
    StreamTampered,
    StreamTruncated,
    UsageError,
)

KEY = bytes(range(32))
PREFIX = bytes(range(100, 104))
AD = associated_data(b"session-1", "client->server")


def seal_all(chunks: list[bytes], key: bytes = KEY, ad: bytes = AD) -> list[bytes]:
    sealer = StreamSealer(key, PREFIX, ad)
    return [sealer.seal_chunk(c, final=i == len(chunks) - 1) for i, c in enumerate(chunks)]


def opener(key: bytes = KEY, ad: bytes = AD) -> StreamOpener:
    return StreamOpener(key, PREFIX, ad)


@settings(max_examples=50)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=6))
def test_round_trip(chunks: list[bytes]) -> None:
    sealed = seal_all(chunks)
    assert [len(s) for s in sealed] == [len(c) + CHUNK_OVERHEAD for c in chunks]
    o = opener()
    out = [o.open_chunk(s, i) for i, s in enumerate(sealed)]
    assert [p for p, _ in out] == chunks
    assert [f for _, f in out] == [False] * (len(chunks) - 1) + [True]
    o.finish()
    assert o.finished


def test_nonce_layout() -> None:
    nonce = chunk_nonce(PREFIX, 0x0102, True)
    assert nonce == PREFIX + bytes([0, 0, 0, 0, 0, 1, 2]) + b"\x01"
    assert len(nonce) == 12
    # the same plaintext at another index, or as the final chunk, encrypts differently
    sealer = StreamSealer(KEY, PREFIX, AD)
    a = sealer.seal_chunk(b"same", final=False)
    b = sealer.seal_chunk(b"same", final=False)
    c = sealer.seal_chunk(b"same", final=True)
    assert len({a[1:], b[1:], c[1:]}) == 3
    assert (a[0], c[0]) == (0, 1)


def test_a_chunk_is_aes_256_gcm_with_the_documented_nonce() -> None:
    # libsodium's implementation, not the one the sealer uses: the construction as documented
    sealer = StreamSealer(KEY, PREFIX, AD)
    chunks = [sealer.seal_chunk(b"first", final=False), sealer.seal_chunk(b"last", final=True)]
    for index, (chunk, plain) in enumerate(zip(chunks, [b"first", b"last"], strict=True)):
        final = index == 1
        assert chunk[0] == final
        nonce = PREFIX + index.to_bytes(7, "big") + bytes([final])
        try:
            opened = nacl.bindings.crypto_aead_aes256gcm_decrypt(chunk[1:], AD, nonce, KEY)
        except nacl.exceptions.UnavailableError:
            pytest.skip("libsodium's AES-256-GCM needs the CPU's AES instructions")
        assert opened == plain


def test_any_bit_flip_is_tampering() -> None:
    sealed = seal_all([b"hello world"])[0]
    for pos in range(len(sealed)):
        for bit in (0x01, 0x80):
            bad = bytearray(sealed)
            bad[pos] ^= bit
            with pytest.raises(StreamTampered):
                opener().open_chunk(bytes(bad), 0)


def test_wrong_key_or_context_is_tampering() -> None:
    sealed = seal_all([b"x", b"y"])
    with pytest.raises(StreamTampered):
        opener(key=bytes(32)).open_chunk(sealed[0], 0)
    with pytest.raises(StreamTampered):  # the other direction's associated data
        opener(ad=associated_data(b"session-1", "server->client")).open_chunk(sealed[0], 0)
    with pytest.raises(StreamTampered):  # another session
        opener(ad=associated_data(b"session-2", "client->server")).open_chunk(sealed[0], 0)
    with pytest.raises(StreamTampered):
        opener().open_chunk(b"\x00" + bytes(5), 0)  # shorter than a tag
    with pytest.raises(StreamTampered):
        opener().open_chunk(b"\x02" + sealed[0][1:], 0)  # flag neither 0 nor 1


def test_chunk_moved_to_another_index_is_tampering() -> None:
    sealed = seal_all([b"a", b"b", b"c"])
    o = opener()
    with pytest.raises(StreamTampered):
        o.open_chunk(sealed[1], 0)  # chunk 1's bytes presented as chunk 0


def test_reordering_and_replay() -> None:
    sealed = seal_all([b"a", b"b", b"c"])
    o = opener()
    with pytest.raises(StreamReordered) as info:
        o.open_chunk(sealed[1], 1)  # chunk 0 skipped
    assert info.value.reason == "stream_reordered"

    o = opener()
    o.open_chunk(sealed[0], 0)
    with pytest.raises(StreamReordered) as info:
        o.open_chunk(sealed[0], 0)  # replayed
    assert info.value.reason == "stream_replayed"
    with pytest.raises(UsageError):  # a failed stream is abandoned
        o.open_chunk(sealed[1], 1)


def test_truncation_and_extension() -> None:
    sealed = seal_all([b"a", b"b", b"c"])
    o = opener()
    o.open_chunk(sealed[0], 0)
    o.open_chunk(sealed[1], 1)
    with pytest.raises(StreamTruncated) as info:
        o.finish()  # the final chunk never came
    assert info.value.reason == "stream_truncated"

    # a stream cut after a non-final chunk cannot be passed off as complete by flipping
    # that chunk's flag: the flag is part of the nonce
    forged_final = b"\x01" + sealed[1][1:]
    o = opener()
    o.open_chunk(sealed[0], 0)
    with pytest.raises(StreamTampered):
        o.open_chunk(forged_final, 1)

    # data after the final chunk
    other = StreamSealer(KEY, PREFIX, AD)
    first = other.seal_chunk(b"a", final=True)
    o = opener()
    assert o.open_chunk(first, 0) == (b"a", True)
    with pytest.raises(StreamTruncated) as info:
        o.open_chunk(sealed[1], 1)
    assert info.value.reason == "stream_extended"


def test_errors_are_protocol_violations() -> None:
    for cls in (StreamTampered, StreamTruncated, StreamReordered):
        assert issubclass(cls, ProtocolViolation)


def test_empty_stream_is_one_empty_final_chunk() -> None:
    sealed = seal_all([b""])
    o = opener()
    assert o.open_chunk(sealed[0], 0) == (b"", True)
    o.finish()


@pytest.mark.parametrize("final", [False, True])
def test_sealing_into_a_frame_is_sealing(final: bool) -> None:
    """The sender seals into its frame's buffer: the same bytes as seal_chunk, index by index."""
    a, b = StreamSealer(KEY, PREFIX, AD), StreamSealer(KEY, PREFIX, AD)
    for n, data in enumerate((b"first", bytes(1000), b"")):
        last = final and n == 2
        out = bytearray(len(data) + CHUNK_OVERHEAD)
        b.seal_chunk_into(data, memoryview(out), final=last)
        assert bytes(out) == a.seal_chunk(data, final=last)
        if last:
            break
    with pytest.raises(UsageError):  # the place must fit exactly; nothing is sealed
        b.seal_chunk_into(b"x", memoryview(bytearray(CHUNK_OVERHEAD)), final=False)
    assert b.index == a.index


def test_sealer_refuses_after_final_and_bad_arguments() -> None:
    sealer = StreamSealer(KEY, PREFIX, AD)
    sealer.seal_chunk(b"x", final=True)
    with pytest.raises(UsageError):
        sealer.seal_chunk(b"y", final=False)
    with pytest.raises(UsageError):
        StreamSealer(bytes(31), PREFIX, AD)
    with pytest.raises(UsageError):
        StreamSealer(KEY, bytes(24), AD)
    with pytest.raises(UsageError):
        StreamOpener(KEY, PREFIX, "ad")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        opener().open_chunk(b"x" * 20, -1)


def test_opener_chunk_limit() -> None:
    sealed = seal_all([bytes(101)])
    with pytest.raises(StreamTampered) as info:
        StreamOpener(KEY, PREFIX, AD, max_chunk=100).open_chunk(sealed[0], 0)
    assert info.value.reason == "stream_too_large"
    assert StreamOpener(KEY, PREFIX, AD, max_chunk=101).open_chunk(sealed[0], 0)[0] == bytes(101)


@settings(max_examples=200)
@given(st.binary(max_size=80), st.integers(0, 3))
def test_arbitrary_chunks_raise_only_protocol_violation(data: bytes, index: int) -> None:
    try:
        opener().open_chunk(data, index)
    except ProtocolViolation:
        return
    raise AssertionError("a random chunk opened")
