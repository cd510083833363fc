"""Blocks, votes and commit certificates: signed bytes, verification, wire round trips."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phala_p2p.chain.block import (
    Block,
    CommitSig,
    CommittedBlock,
    Proposal,
    Vote,
    VoteType,
    proposal_sign_bytes,
    verify_commit,
    vote_sign_bytes,
)
from phala_p2p.chain.bodies import Transfer
from phala_p2p.chain.evidence import DoubleSignEvidence
from phala_p2p.chain.sync import SyncRequest, SyncResponse
from phala_p2p.chain.tx import Tx
from phala_p2p.chain.view import ChainView
from phala_p2p.errors import ProtocolViolation
from phala_p2p.wire.codec import decode, encode

from .helpers import CHAIN_ID, commit_for, genesis, identities

IDS = identities(4, seed=31)
GENESIS = genesis(IDS, accounts=[(i, 1_000) for i in IDS])


def _block() -> tuple[ChainView, Block]:
    view = ChainView(GENESIS)
    tx = Tx.sign(IDS[0], chain_id=CHAIN_ID, nonce=0, fee=1, body=Transfer(IDS[1].public_key, 5))
    block = view.build_block([tx], proposer=view.proposer(0), round_=0, time_ms=1_001_000)
    return view, block


def test_sign_bytes_are_domain_separated() -> None:
    h = b"\x01" * 32
    pv = vote_sign_bytes(CHAIN_ID, VoteType.PREVOTE, 1, 0, h)
    pc = vote_sign_bytes(CHAIN_ID, VoteType.PRECOMMIT, 1, 0, h)
    other = vote_sign_bytes("other-chain", VoteType.PREVOTE, 1, 0, h)
    prop = proposal_sign_bytes(CHAIN_ID, 1, 0, -1, h)
    assert len({pv, pc, other, prop}) == 4
    assert pv.startswith(b"phala/vote/1\x00")
    assert prop.startswith(b"phala/proposal/1\x00")


def test_commit_verifies_and_every_defect_is_caught() -> None:
    view, block = _block()
    good = commit_for(view, block.hash, 1, IDS[:3])
    verify_commit(CHAIN_ID, block, good, view.validators)
    cases = {
        "too few": commit_for(view, block.hash, 1, IDS[:2]),
        "other block": commit_for(view, b"\x09" * 32, 1, IDS),
        "bad signatures": replace(
            good,
            sigs=tuple(
                CommitSig(s.validator, identities(4, seed=31)[0].sign(b"x")) for s in good.sigs
            ),
        ),
        "unsorted": replace(good, sigs=tuple(reversed(good.sigs))),
        "repeated": replace(good, sigs=(good.sigs[0], good.sigs[0], good.sigs[1])),
        "wrong round": replace(good, round=1),
        "outsider": replace(
            good,
            sigs=tuple(
                sorted(
                    (*good.sigs[:2], CommitSig(b"\xff" * 32, b"\x00" * 64)),
                    key=lambda s: s.validator,
                )
            ),
        ),
    }
    for name, commit in cases.items():
        with pytest.raises(ProtocolViolation) as err:
            verify_commit(CHAIN_ID, block, commit, view.validators)
        assert err.value.reason == "bad_commit", name


def test_follower_view_refuses_bad_blocks() -> None:
    view, block = _block()
    commit = commit_for(view, block.hash, 1, IDS[:3])
    header = block.header
    bad_blocks = [
        Block(replace(header, state_root=b"\x00" * 32), block.txs),
        Block(replace(header, parent_hash=b"\x00" * 32), block.txs),
        Block(replace(header, validators_hash=b"\x00" * 32), block.txs),
        Block(replace(header, time_ms=GENESIS.genesis_time_ms), block.txs),
        Block(replace(header, height=2), block.txs),
        Block(header, ()),  # txs do not match the root
    ]
    for bad in bad_blocks:
        c = commit_for(view, bad.hash, bad.height, IDS[:3])
        with pytest.raises(ProtocolViolation):
            view.apply(bad, c)
        assert view.height == 0
    view.apply(block, commit)
    assert view.height == 1
    assert view.state.balance(IDS[1].public_key) == 1_005


def _messages() -> list[object]:
    view, block = _block()
    commit = commit_for(view, block.hash, 1, IDS[:3])
    sb = vote_sign_bytes(CHAIN_ID, VoteType.PREVOTE, 1, 0, None)
    vote = Vote(VoteType.PREVOTE, 1, 0, None, IDS[0].public_key, IDS[0].sign(sb))
    other = Vote(VoteType.PREVOTE, 1, 0, block.hash, IDS[0].public_key, IDS[0].sign(b"y"))
    psb = proposal_sign_bytes(CHAIN_ID, 1, 0, -1, block.hash)
    prop = Proposal(1, 0, -1, block, view.proposer(0), IDS[0].sign(psb))
    return [
        block.header,
        block,
        vote,
        commit,
        prop,
        CommittedBlock(block, commit),
        DoubleSignEvidence.of(other, vote),
        SyncRequest(1, 16),
        SyncResponse(1, (CommittedBlock(block, commit),)),
        block.txs[0],
    ]


@pytest.mark.parametrize("msg", _messages(), ids=lambda m: type(m).__name__)
def test_messages_round_trip(msg: object) -> None:
    data = encode(msg)
    assert decode(data, max_size=len(data), expect=type(msg)) == msg
    with pytest.raises(ProtocolViolation):
        decode(data, max_size=len(data) - 1)


def test_validate_rejects_nonsense_fields() -> None:
    vote = _messages()[2]
    assert isinstance(vote, Vote)
    for bad in (replace(vote, height=0), replace(vote, round=-1), replace(vote, block_hash=b"x")):
        with pytest.raises(ProtocolViolation):
            decode(encode(bad), max_size=1 << 16)
    with pytest.raises(ProtocolViolation):
        decode(encode(SyncRequest(1, 10_000)), max_size=64)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_only_raise_protocol_violation(data: bytes) -> None:
    for cls in (Vote, Proposal, CommittedBlock, Tx, SyncResponse, DoubleSignEvidence):
        try:
            decode(data, max_size=1 << 16, expect=cls)
        except ProtocolViolation:
            pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_messages_only_raise_protocol_violation(data: st.DataObject) -> None:
    msg = data.draw(st.sampled_from(_MESSAGES))
    raw = bytearray(encode(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(raw), max_size=1 << 20)
    except ProtocolViolation:
        pass


_MESSAGES = _messages()
