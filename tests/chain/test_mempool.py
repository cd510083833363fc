"""Mempool admission, nonce ordering, reaping and eviction."""

from __future__ import annotations

from typing import Any

from phala_p2p.chain.bodies import Transfer
from phala_p2p.chain.mempool import Mempool, MempoolConfig
from phala_p2p.chain.tx import Tx, TxRejectReason
from phala_p2p.chain.view import ChainView
from phala_p2p.crypto.identity import Identity

from .helpers import CHAIN_ID, extend, genesis, identities

IDS = identities(6, seed=51)
GKS, USERS = IDS[:3], IDS[3:]
GENESIS = genesis(GKS, accounts=[(u, 1_000) for u in USERS])


def _tx(who: Identity, nonce: int, amount: int = 1, fee: int = 1) -> Tx:
    return Tx.sign(
        who, chain_id=CHAIN_ID, nonce=nonce, fee=fee, body=Transfer(GKS[0].public_key, amount)
    )


def test_admission_reasons() -> None:
    view = ChainView(GENESIS)
    pool = Mempool(MempoolConfig(max_per_account=4))
    u = USERS[0]
    assert pool.add(_tx(u, 0), view).ok
    cases: list[tuple[Any, TxRejectReason]] = [
        (_tx(u, 0), TxRejectReason.DUPLICATE),
        (_tx(u, 0, amount=2), TxRejectReason.DUPLICATE),  # nonce already pending
        (_tx(u, 9), TxRejectReason.BAD_NONCE),  # beyond the window
        (_tx(u, 1, fee=0), TxRejectReason.FEE_TOO_LOW),
        (_tx(Identity.from_seed(b"q" * 32), 0), TxRejectReason.UNKNOWN_ACCOUNT),
        (_tx(USERS[1], 0, amount=5_000), TxRejectReason.INSUFFICIENT_FUNDS),  # trial run
        (
            Tx.sign(u, chain_id="x", nonce=1, fee=1, body=Transfer(u.public_key, 1)),
            TxRejectReason.WRONG_CHAIN,
        ),
    ]
    for tx, reason in cases:
        result = pool.add(tx, view)
        assert (result.ok, result.reason) == (False, reason)
    assert len(pool) == 1
    assert pool.rejected == len(cases)


def test_bounded_by_count() -> None:
    view = ChainView(GENESIS)
    pool = Mempool(MempoolConfig(max_txs=3))
    results = [pool.add(_tx(u, n), view) for u in USERS for n in range(2)]
    assert [r.ok for r in results].count(True) == 3
    assert results[-1].reason == TxRejectReason.MEMPOOL_FULL
    assert len(pool) == 3


def test_reap_orders_by_nonce_round_robin_and_skips_gaps() -> None:
    view = ChainView(GENESIS)
    pool = Mempool()
    a, b, c = USERS
    for tx in (_tx(a, 1), _tx(a, 0), _tx(b, 0), _tx(a, 2), _tx(b, 1), _tx(c, 1)):
        assert pool.add(tx, view).ok
    reaped = pool.reap(view, 10)
    assert [(t.sender, t.nonce) for t in reaped] == [
        (a.public_key, 0),
        (b.public_key, 0),
        (a.public_key, 1),
        (b.public_key, 1),
        (a.public_key, 2),
    ]  # c's nonce 1 waits for its nonce 0
    assert len(pool.reap(view, 3)) == 3
    assert pool.next_nonce(a.public_key, view) == 3
    assert pool.next_nonce(c.public_key, view) == 0


def test_update_drops_included_and_invalidated() -> None:
    view = ChainView(GENESIS)
    pool = Mempool()
    a, b = USERS[0], USERS[1]
    for tx in (_tx(a, 0), _tx(a, 1), _tx(b, 0, amount=900), _tx(b, 1, amount=50)):
        assert pool.add(tx, view).ok
    # a block spends most of b's money through another transaction with b's nonce 0
    drain = _tx(b, 0, amount=990)
    extend(view, GKS, [pool.reap(view, 10)[0], drain])
    pool.update(view)
    # a's nonce 0 was included; b's nonce 0 was replaced by the drain, and b's nonce 1 can no
    # longer pay, so it goes too
    assert len(pool) == 1
    assert [t.nonce for t in pool.reap(view, 10)] == [1]
    assert pool.size_bytes == _tx(a, 1).size
