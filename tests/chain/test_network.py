"""Four gatekeepers on the simulated network: progress, crashes, partitions, byzantine."""

from __future__ import annotations

from pathlib import Path

from phala_p2p.chain.bodies import Transfer
from phala_p2p.chain.tx import Tx

from .helpers import CHAIN_ID, genesis, identities
from .sim import SimNet


def _net(tmp_path: Path, **kw: object) -> SimNet:
    ids = identities(4, seed=kw.pop("id_seed", 1))  # type: ignore[arg-type]
    g = genesis(ids, accounts=[(i, 100_000) for i in ids])
    return SimNet(g, ids, tmp_path, **kw)  # type: ignore[arg-type]


def _same_chain(net: SimNet, nodes: list[int]) -> None:
    """Every listed node stored the same block at every height it has."""
    for i in nodes:
        store = net.nodes[i].store
        assert store is not None
        for h in range(1, store.head() + 1):
            cb = store.get_block(h)
            assert cb is not None
            assert cb.block.hash == net.finalized[h]


def test_four_gatekeepers_finalize_fifty_blocks_with_transactions(tmp_path: Path) -> None:
    net = _net(tmp_path, seed=1)
    a, b = net.nodes[0], net.nodes[1]
    sent = [net.submit_tx(0, Transfer(b.key, 10 + k)) for k in range(5)]
    assert net.run_until(lambda: net.min_height() >= 50, timeout=60)
    _same_chain(net, [0, 1, 2, 3])
    roots = {n.c.view.state.state_root() for n in net.nodes if n.c.view.height == 50}
    assert len(roots) == 1 or net.min_height() > 50
    for n in net.nodes:
        assert n.c.view.state.balance(b.key) == 100_000 + sum(10 + k for k in range(5))
        assert n.c.view.state.nonce(a.key) == 5
    included = set()
    assert a.store is not None
    for h in range(1, a.store.head() + 1):
        cb = a.store.get_block(h)
        assert cb is not None
        included |= {tx.id for tx in cb.block.txs}
    assert {t.id for t in sent} <= included
    assert all(not n.violations for n in net.nodes)
    net.close()


def test_proposers_rotate(tmp_path: Path) -> None:
    net = _net(tmp_path, seed=2)
    assert net.run_until(lambda: net.min_height() >= 20, timeout=60)
    store = net.nodes[0].store
    assert store is not None
    proposers = [store.get_block(h).block.header.proposer for h in range(1, 21)]  # type: ignore[union-attr]
    assert {p for p in proposers} == {n.key for n in net.nodes}
    net.close()


def test_one_stopped_the_rest_continue(tmp_path: Path) -> None:
    net = _net(tmp_path, seed=3)
    assert net.run_until(lambda: net.min_height() >= 5, timeout=30)
    net.crash(3)
    stopped_at = max(net.heights())
    live = [0, 1, 2]
    assert net.run_until(lambda: net.min_height(live) >= stopped_at + 20, timeout=120)
    _same_chain(net, live)
    net.close()


def test_two_two_partition_never_finalizes_and_never_forks(tmp_path: Path) -> None:
    net = _net(tmp_path, seed=4)
    assert net.run_until(lambda: net.min_height() >= 3, timeout=30)
    net.partition([0, 1], [2, 3])
    net.run_for(1.0)  # messages already in flight may still finish one height
    frozen = net.heights()
    finalized = dict(net.finalized)
    net.run_for(60.0)
    assert net.heights() == frozen
    assert net.finalized == finalized
    net.heal()
    assert net.run_until(lambda: net.min_height() >= max(frozen) + 5, timeout=120)
    _same_chain(net, [0, 1, 2, 3])
    net.close()


def test_three_one_partition_then_the_one_catches_up_via_blocks(tmp_path: Path) -> None:
    net = _net(tmp_path, seed=5)
    assert net.run_until(lambda: net.min_height() >= 3, timeout=30)
    net.partition([0, 1, 2], [3])
    net.run_for(1.0)
    alone = net.nodes[3].c.view.height
    assert net.run_until(lambda: net.min_height([0, 1, 2]) >= alone + 20, timeout=120)
    assert net.nodes[3].c.view.height <= alone + 1
    net.heal()
    target = max(net.heights())
    assert net.run_until(lambda: net.nodes[3].c.view.height >= target + 3, timeout=60)
    _same_chain(net, [0, 1, 2, 3])
    assert net.nodes[3].synced_blocks >= 15  # caught up through sync, not by voting
    assert not net.nodes[3].violations
    net.close()


def test_byzantine_double_signer_is_slashed_and_removed(tmp_path: Path) -> None:
    net = _net(tmp_path, seed=6, byzantine=[3])
    offender = net.nodes[3].key

    def removed_everywhere() -> bool:
        return all(offender not in n.c.view.validators for n in net.nodes[:3])

    assert net.run_until(removed_everywhere, timeout=60)
    assert net.evidence_seen
    for n in net.nodes[:3]:
        state = n.c.view.state
        assert not state.is_registered_gatekeeper(offender)
        assert state.stake(offender) == 1_000 - 1_000 * state.params.slash_fraction_ppm // 1_000_000
    h = net.min_height([0, 1, 2])
    assert net.run_until(lambda: net.min_height([0, 1, 2]) >= h + 10, timeout=60)
    store = net.nodes[0].store
    assert store is not None
    last = store.get_block(store.head())
    assert last is not None
    assert offender not in {s.validator for s in last.commit.sigs}
    net.close()


def test_crashes_at_any_point_and_restarts_never_double_sign(tmp_path: Path) -> None:
    net = _net(tmp_path, seed=7, durable=True)
    victim = 2
    for k in range(12):
        # crash at an arbitrary event, mid-round, then come back from disk
        for _ in range(7 + 5 * k):
            net.step(net.now + 10)
        before = net.nodes[victim].c.view.height
        net.crash(victim)
        net.run_for(0.05 * (k % 4))
        net.start(victim)
        assert net.nodes[victim].c.view.height == before  # nothing finalized was lost
    assert net.run_until(lambda: net.min_height() >= 25, timeout=120)
    _same_chain(net, [0, 1, 2, 3])
    net.close()


def test_invalid_transactions_never_reach_a_block(tmp_path: Path) -> None:
    net = _net(tmp_path, seed=8)
    a, b = net.nodes[0], net.nodes[1]
    bad = Tx.sign(a.identity, chain_id=CHAIN_ID, nonce=0, fee=1, body=Transfer(b.key, 10**9))
    net.gossip_tx(0, bad)  # overspend: the mempool refuses it
    assert bad.id not in a.mempool  # type: ignore[operator]
    assert net.run_until(lambda: net.min_height() >= 5, timeout=30)
    assert all(n.c.view.state.balance(b.key) == 100_000 for n in net.nodes)
    net.close()
