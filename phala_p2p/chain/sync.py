"""Block sync (``/phala/sync/1.0.0``) and block gossip (``phala/blocks/1``), sans-IO.

A node behind asks a peer for finalized blocks by height range; the answer is bounded in count
and bytes. Every received block is verified against the gatekeeper set the node already knows
(its commit must carry > 2/3 of that set's power) before it is applied, so a peer can withhold
blocks but never make a node accept a wrong one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import msgpack

from phala_p2p.chain.block import MAX_HEIGHT, CommittedBlock
from phala_p2p.chain.params import ChainParams
from phala_p2p.chain.view import ChainView
from phala_p2p.errors import ChainError, ProtocolViolation, UsageError
from phala_p2p.wire.codec import WIRE_VERSION, decode, kind_of, message

MAX_STORED_BLOCK = 64 * 1024 * 1024
MAX_SYNC_BLOCKS = 64
MAX_SYNC_BYTES = 8 * 1024 * 1024  # a response never exceeds this (beyond its first block)
# decode bound for a whole response: the byte budget plus one largest possible block
MAX_SYNC_RESPONSE_BYTES = MAX_SYNC_BYTES + 16 * 1024 * 1024 + 64 * 1024
MAX_SYNC_REQUEST_BYTES = 64
SYNC_PROTOCOL = "/phala/sync/1.0.0"


@message(120)
@dataclass(frozen=True)
class SyncRequest:
    """Blocks ``start_height`` .. ``start_height + max_blocks - 1`` with their commits."""

    start_height: int
    max_blocks: int

    def validate(self) -> None:
        if not 1 <= self.start_height <= MAX_HEIGHT:
            raise ProtocolViolation("sync start height out of range")
        if not 1 <= self.max_blocks <= MAX_SYNC_BLOCKS:
            raise ProtocolViolation(f"sync asks 1..{MAX_SYNC_BLOCKS} blocks")


@message(121)
@dataclass(frozen=True)
class SyncResponse:
    """Consecutive finalized blocks from the requested start (possibly none), and the
    responder's head height."""

    head_height: int
    blocks: tuple[CommittedBlock, ...] = field(metadata={"max_len": MAX_SYNC_BLOCKS})

    def validate(self) -> None:
        if not 0 <= self.head_height <= MAX_HEIGHT:
            raise ProtocolViolation("head height out of range")
        for prev, cur in zip(self.blocks, self.blocks[1:], strict=False):
            if cur.block.height != prev.block.height + 1:
                raise ProtocolViolation("sync blocks are not consecutive")


def committed_block_limit(params: ChainParams, validators: int) -> int:
    """Decode bound for a ``CommittedBlock`` on ``phala/blocks/1``."""
    return params.max_block_bytes + 64 * 1024 + 128 * max(validators, 1)


class BlockSource(Protocol):
    """Where a sync server reads blocks (``BlockStore`` fits)."""

    def head(self) -> int: ...

    def get_raw(self, height: int) -> bytes | None: ...


def _stored_answer(
    request: SyncRequest, source: BlockSource, max_bytes: int
) -> tuple[int, list[bytes]]:
    """The responder's head and the stored encodings of the blocks it answers with: from
    ``start_height`` until ``max_blocks``, its head, or ``max_bytes`` of encoded blocks (but
    always the first block if there is one, as a block may be up to ``max_block_bytes``)."""
    if max_bytes <= 0:
        raise UsageError("max_bytes must be > 0")
    head = source.head()
    raws: list[bytes] = []
    used = 0
    last = min(head, request.start_height + request.max_blocks - 1)
    for height in range(request.start_height, last + 1):
        raw = source.get_raw(height)
        if raw is None or (raws and used + len(raw) > max_bytes):
            break
        used += len(raw)
        raws.append(raw)
    return head, raws


def serve_sync(
    request: SyncRequest, source: BlockSource, *, max_bytes: int = MAX_SYNC_BYTES
) -> SyncResponse:
    """Answer ``request`` (bounded as ``_stored_answer`` says)."""
    head, raws = _stored_answer(request, source, max_bytes)
    blocks = tuple(decode(raw, max_size=MAX_STORED_BLOCK, expect=CommittedBlock) for raw in raws)
    return SyncResponse(head, blocks)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + n.to_bytes(2, "big")


def serve_sync_bytes(
    request: SyncRequest, source: BlockSource, *, max_bytes: int = MAX_SYNC_BYTES
) -> bytes:
    """``encode(serve_sync(...))``, byte for byte, spliced from the stored encodings
    without decoding them (a server's work per block is a read and a copy)."""
    head, raws = _stored_answer(request, source, max_bytes)
    parts = [_fields_of_stored(raw) for raw in raws]
    return b"".join(
        (
            _array_header(3),
            msgpack.packb(WIRE_VERSION),
            msgpack.packb(kind_of(SyncResponse)),
            _array_header(2),
            msgpack.packb(head),
            _array_header(len(parts)),
            *parts,
        )
    )


def _fields_of_stored(raw: bytes) -> bytes:
    """The field array of a stored top-level ``CommittedBlock`` encoding."""
    unpacker = msgpack.Unpacker(max_buffer_size=len(raw))
    unpacker.feed(raw)
    try:
        size = unpacker.read_array_header()
        version = unpacker.unpack()
        kind = unpacker.unpack()
    except (msgpack.UnpackException, ValueError) as err:
        raise ChainError(f"stored block is corrupt: {err}") from err
    if size != 3 or version != WIRE_VERSION or kind != kind_of(CommittedBlock):
        raise ChainError("stored block is not a CommittedBlock")
    return raw[unpacker.tell() :]


def check_response(request: SyncRequest, response: SyncResponse) -> None:
    """The response answers the request (ProtocolViolation otherwise)."""
    if len(response.blocks) > request.max_blocks:
        raise ProtocolViolation("more blocks than asked", reason="bad_sync")
    if response.blocks and response.blocks[0].block.height != request.start_height:
        raise ProtocolViolation("sync answer starts at another height", reason="bad_sync")


class BlockVerdict(StrEnum):
    ACCEPTED = "accepted"  # verified and applied: persist it, then relay
    OLD = "old"  # at or below the head: ignore
    AHEAD = "ahead"  # beyond the next height: ignore, and sync


@dataclass
class SyncOutcome:
    applied: list[CommittedBlock]  # persist these, in order
    error: ProtocolViolation | None  # the first bad block (penalise the peer)
    remote_head: int


class Follower:
    """Follows the chain for a node that does not take part in consensus.

    ``on_block`` handles block gossip; ``request``/``on_response`` catch up through sync. The
    driver persists every block this reports as applied (``BlockStore.put_block``).
    """

    def __init__(self, view: ChainView, *, batch: int = MAX_SYNC_BLOCKS) -> None:
        if not 1 <= batch <= MAX_SYNC_BLOCKS:
            raise UsageError(f"batch must be 1..{MAX_SYNC_BLOCKS}")
        self.view = view
        self.batch = batch
        self.best_known_height = view.height

    @property
    def behind(self) -> bool:
        return self.best_known_height > self.view.height

    def on_block(self, cb: CommittedBlock) -> BlockVerdict:
        """A gossiped finalized block; ProtocolViolation if it is the next one and bad."""
        height = cb.block.height
        if height <= self.view.height:
            return BlockVerdict.OLD
        if height > self.view.next_height:
            self.best_known_height = max(self.best_known_height, height)
            return BlockVerdict.AHEAD
        self.view.apply(cb.block, cb.commit)
        return BlockVerdict.ACCEPTED

    def request(self) -> SyncRequest:
        return SyncRequest(self.view.next_height, self.batch)

    def on_response(self, request: SyncRequest, response: SyncResponse) -> SyncOutcome:
        """Apply the answer's blocks in order, stopping at the first bad one."""
        self.best_known_height = max(self.best_known_height, response.head_height)
        applied: list[CommittedBlock] = []
        try:
            check_response(request, response)
            for cb in response.blocks:
                if cb.block.height <= self.view.height:
                    continue
                self.view.apply(cb.block, cb.commit)
                applied.append(cb)
        except ProtocolViolation as err:
            return SyncOutcome(applied, err, response.head_height)
        return SyncOutcome(applied, None, response.head_height)
