"""The SQLite block store: durability across reopen, signing record, replay."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from phala_p2p.chain.block import Vote, VoteType, vote_sign_bytes
from phala_p2p.chain.bodies import Transfer
from phala_p2p.chain.consensus import SignedState
from phala_p2p.chain.store import BlockStore
from phala_p2p.chain.tx import Tx
from phala_p2p.chain.view import ChainView
from phala_p2p.errors import ChainError, UsageError

from .helpers import CHAIN_ID, extend, genesis, identities

IDS = identities(4, seed=41)
GENESIS = genesis(IDS, accounts=[(i, 1_000) for i in IDS])


def _chain(store: BlockStore, n: int) -> ChainView:
    view = ChainView(GENESIS)
    for k in range(n):
        txs = [
            Tx.sign(IDS[0], chain_id=CHAIN_ID, nonce=k, fee=1, body=Transfer(IDS[1].public_key, 1))
        ]
        block, commit = extend(view, IDS[:3], txs)
        store.put_block(block, commit)
    return view


def test_blocks_survive_reopen_and_replay_gives_the_same_state(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    with BlockStore(path, genesis_hash=GENESIS.genesis_hash) as store:
        view = _chain(store, 12)
    with BlockStore(path, genesis_hash=GENESIS.genesis_hash) as store:
        assert store.head() == 12
        replayed = store.open_view(GENESIS)
        assert replayed.height == 12
        assert replayed.head_hash == view.head_hash
        assert replayed.state.state_root() == view.state.state_root()
        assert [cb.block.height for cb in store.range(3, 7)] == [3, 4, 5, 6, 7]
        assert [cb.block.height for cb in store.range(11, 40)] == [11, 12]
        assert store.get_block(13) is None
        cb = store.get_block(5)
        assert cb is not None
        assert cb.commit.block_hash == cb.block.hash


def test_store_refuses_gaps_and_foreign_chains(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    with BlockStore(path, genesis_hash=GENESIS.genesis_hash) as store:
        view = ChainView(GENESIS)
        b1, c1 = extend(view, IDS[:3])
        b2, c2 = extend(view, IDS[:3])
        with pytest.raises(UsageError):
            store.put_block(b2, c2)
        with pytest.raises(UsageError):
            store.put_block(b1, c2)
        store.put_block(b1, c1)
    with pytest.raises(UsageError):
        BlockStore(path, genesis_hash=b"\x00" * 32)


def test_signing_record_and_own_messages_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    me = IDS[0]

    def vote(h: int, r: int, t: VoteType) -> Vote:
        sb = vote_sign_bytes(CHAIN_ID, t, h, r, None)
        return Vote(t, h, r, None, me.public_key, me.sign(sb))

    with BlockStore(path, genesis_hash=GENESIS.genesis_hash) as store:
        assert store.load_signed() is None
        store.save_signed(SignedState(3, 0, 1, b"a" * 32), vote(3, 0, VoteType.PREVOTE))
        store.save_signed(SignedState(4, 1, 1, b"b" * 32), vote(4, 1, VoteType.PREVOTE))
        state = SignedState(4, 1, 2, b"c" * 32, 1, b"d" * 32)
        store.save_signed(state, vote(4, 1, VoteType.PRECOMMIT))
    with BlockStore(path, genesis_hash=GENESIS.genesis_hash) as store:
        assert store.load_signed() == state
        own = store.load_own_messages(4)
        assert [(m.height, m.round, m.vote_type) for m in own] == [  # type: ignore[union-attr]
            (4, 1, VoteType.PREVOTE),
            (4, 1, VoteType.PRECOMMIT),
        ]
        assert store.load_own_messages(3) == []  # older heights are pruned


def test_a_block_is_durable_once_put_returns(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    store = BlockStore(path, genesis_hash=GENESIS.genesis_hash)
    _chain(store, 3)
    # read it back through an independent connection while the store is still open
    db = sqlite3.connect(path)
    assert db.execute("SELECT MAX(height) FROM blocks").fetchone() == (3,)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    db.close()
    store.close()


def test_corrupt_stored_block_is_a_chain_error(tmp_path: Path) -> None:
    path = tmp_path / "chain.sqlite"
    with BlockStore(path, genesis_hash=GENESIS.genesis_hash) as store:
        _chain(store, 2)
    db = sqlite3.connect(path)
    db.execute("UPDATE blocks SET data = x'c0' WHERE height = 2")
    db.commit()
    db.close()
    with BlockStore(path, genesis_hash=GENESIS.genesis_hash) as store, pytest.raises(ChainError):
        store.open_view(GENESIS)
