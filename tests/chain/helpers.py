"""Shared fixtures for the chain tests: deterministic identities, genesis, blocks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from phala_p2p.chain.block import Block, Commit, CommitSig, VoteType, vote_sign_bytes
from phala_p2p.chain.params import ChainParams, Genesis
from phala_p2p.chain.tx import Tx
from phala_p2p.chain.view import ChainView
from phala_p2p.crypto.identity import Identity

CHAIN_ID = "phala-test"
GENESIS_TIME = 1_000


def identities(n: int, seed: int = 0) -> list[Identity]:
    out = [Identity.from_seed(hashlib.sha256(f"id-{seed}-{i}".encode()).digest()) for i in range(n)]
    return sorted(out, key=lambda ident: ident.public_key)


FAST = ChainParams(
    block_time_ms=100,
    timeout_propose_ms=400,
    timeout_propose_delta_ms=200,
    timeout_prevote_ms=200,
    timeout_prevote_delta_ms=100,
    timeout_precommit_ms=200,
    timeout_precommit_delta_ms=100,
    unbonding_blocks=5,
    min_stake=100,
    tx_fee=1,
    slash_fraction_ppm=100_000,
    voting_period_blocks=4,
)


def genesis(
    gatekeepers: Sequence[Identity],
    *,
    stakes: Sequence[int] | None = None,
    accounts: Sequence[tuple[Identity, int]] = (),
    params: ChainParams = FAST,
    treasury: int = 0,
) -> Genesis:
    stakes = stakes or [1_000] * len(gatekeepers)
    return Genesis(
        chain_id=CHAIN_ID,
        genesis_time=GENESIS_TIME,
        gatekeepers=tuple((g.public_key, s) for g, s in zip(gatekeepers, stakes, strict=True)),
        accounts=tuple((a.public_key, bal) for a, bal in accounts),
        params=params,
        treasury=treasury,
    )


def commit_for(
    view: ChainView, block_hash: bytes, height: int, signers: Sequence[Identity], round_: int = 0
) -> Commit:
    """A commit certificate signed by ``signers`` (sorted by key as the wire requires)."""
    sb = vote_sign_bytes(view.chain_id, VoteType.PRECOMMIT, height, round_, block_hash)
    sigs = sorted((CommitSig(s.public_key, s.sign(sb)) for s in signers), key=lambda c: c.validator)
    return Commit(height, round_, block_hash, tuple(sigs))


def extend(
    view: ChainView,
    signers: Sequence[Identity],
    txs: Sequence[Tx] = (),
    time_ms: int | None = None,
) -> tuple[Block, Commit]:
    """Build, certify and apply the next block on ``view``; returns (block, commit)."""
    proposer = view.proposer(0)
    block = view.build_block(
        list(txs),
        proposer=proposer,
        round_=0,
        time_ms=time_ms if time_ms is not None else view.head_time_ms + 1000,
    )
    commit = commit_for(view, block.hash, block.height, signers)
    view.apply(block, commit)
    return block, commit


def try_txs(view: ChainView, txs: Sequence[Tx]) -> list[str | None]:
    """Each transaction's rejection reason (None: applied) in a block after ``view``'s head,
    applied in order and then rolled back: a block's worth of checks without the block."""
    state = view.state
    reasons: list[str | None] = []
    token = state.checkpoint()
    state.block_time_ms = view.head_time_ms + 1000
    for tx in txs:
        result = state.apply_tx(tx, view.next_height)
        reasons.append(None if result.ok else result.reason)
    state.rollback(token)
    return reasons
