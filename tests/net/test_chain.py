"""The chain on real py-libp2p hosts: gatekeepers finalize, followers verify, partitions,
crashes, a byzantine gatekeeper, governance, staking and rejected transactions.

Timeouts are shortened so that the suite stays quick; the algorithm is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from phala_p2p.chain.block import CommitSig, CommittedBlock
from phala_p2p.chain.bodies import Stake, Transfer
from phala_p2p.chain.consensus import Step
from phala_p2p.chain.params import ChainParams
from phala_p2p.chain.tx import Tx, TxRejectReason
from phala_p2p.config import ChainConfig, NodeConfig, Role
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import UsageError
from phala_p2p.node import Node
from phala_p2p.services.chain import TOPIC_BLOCKS, TOPIC_TXS
from phala_p2p.testing import open_devnet, wait_until
from phala_p2p.wire.codec import encode

FAST = {
    "block_time_ms": 100,
    "timeout_propose_ms": 800,
    "timeout_propose_delta_ms": 200,
    "timeout_prevote_ms": 400,
    "timeout_prevote_delta_ms": 200,
    "timeout_precommit_ms": 400,
    "timeout_precommit_delta_ms": 200,
}


def heights(nodes: Sequence[Node]) -> list[int]:
    return [n.chain.head.height for n in nodes]


def assert_same_chain(nodes: Sequence[Node], upto: int | None = None) -> None:
    """Every height up to ``upto`` (default: the lowest head) has one hash on all nodes."""
    top = min(heights(nodes)) if upto is None else upto
    assert top >= 1
    for h in range(1, top + 1):
        hashes = {n.chain.block(h).hash for n in nodes}
        assert len(hashes) == 1, f"fork at height {h}"


async def reach(nodes: Sequence[Node], height: int, timeout: float = 60) -> None:
    await wait_until(
        lambda: all(n.chain.head.height >= height for n in nodes),
        timeout,
        message=f"height {height} on {len(nodes)} nodes",
    )


async def test_four_gatekeepers_finalize_50_blocks_and_survive_one_stop(tmp_path: Path) -> None:
    async with open_devnet(gatekeepers=4, clients=1, seed=11, chain_params=FAST) as net:
        await reach(net.all_nodes, 50, timeout=120)
        assert_same_chain(net.all_nodes, 50)
        # every block carries a commit from > 2/3 of the gatekeepers' power
        cb = net.clients[0].chain.committed_block(50)
        assert cb is not None
        assert len(cb.commit.sigs) >= 3
        stopped = net.gatekeepers[3]
        await net.stop(stopped)
        rest = [n for n in net.running if n is not stopped]
        start = max(heights(rest))
        await reach(rest, start + 5, timeout=60)
        assert_same_chain(rest)


async def test_two_two_partition_halts_three_one_continues_and_heals() -> None:
    async with open_devnet(gatekeepers=4, clients=1, seed=12, chain_params=FAST) as net:
        g = net.gatekeepers
        everyone = net.all_nodes
        await reach(everyone, 3)
        # 2|2: neither half has more than 2/3 of the power, nothing is finalized
        await net.partition([*g[:2], net.bootstrap], g[2:] + net.clients)
        tops = heights(everyone)
        polls = [n.metrics.get("sync_attempts") for n in g]
        # each gatekeeper sees its chain stall and polls for blocks twice (sync_interval apart)
        await wait_until(
            lambda: all(
                n.metrics.get("sync_attempts") >= p + 2 for n, p in zip(g, polls, strict=True)
            ),
            30,
        )
        # nothing new is finalized (a follower may still fetch the last block decided
        # before the cut from its side, so compare the highest head)
        assert heights(g) == tops[1:5]
        assert max(heights(everyone)) == max(tops)
        assert_same_chain(everyone)
        # 3|1: the three go on, the one halts
        await net.heal()
        await net.partition([*g[:3], net.bootstrap, *net.clients], g[3:])
        lone = g[3]
        lone_height = lone.chain.head.height
        majority = [n for n in everyone if n is not lone]
        await reach(majority, max(heights(majority)) + 5)
        assert lone.chain.head.height <= lone_height + 1
        # heal: the lone gatekeeper catches up (through sync, or gossip's repair of the
        # announcements it missed when they are still in its peers' message caches) and
        # takes part again: it proposes a block of the chain the others finalize
        await net.heal()
        healed = max(heights(everyone))
        target = healed + 3
        await reach(everyone, target)
        assert_same_chain(everyone, target)

        def lone_proposed() -> bool:
            top = min(heights(everyone))
            return any(
                g[0].chain.block(h).header.proposer == lone.account
                for h in range(healed + 1, top + 1)
            )

        await wait_until(lone_proposed, 30, message="the lone gatekeeper proposes again")
        assert_same_chain(everyone)


async def test_byzantine_gatekeeper_is_slashed_and_removed() -> None:
    def configure(i: int, cfg):  # type: ignore[no-untyped-def]
        if i == 4:
            return cfg.with_(chain=ChainConfig(byzantine_double_sign=True))
        return cfg

    async with open_devnet(
        gatekeepers=4, clients=1, seed=13, chain_params=FAST, configure=configure
    ) as net:
        bad = net.gatekeepers[3]
        client = net.clients[0]
        # from genesis: the double-signer may be slashed before the devnet is even returned
        assert net.genesis is not None
        stake_before = dict(net.genesis.gatekeepers)[bad.account]

        def slashed() -> bool:
            return bad.account not in client.chain.state.gatekeepers()

        await wait_until(slashed, 60, message="offender removed from the set")
        state = client.chain.state
        fraction = state.params.slash_fraction_ppm
        assert state.stake(bad.account) == stake_before - stake_before * fraction // 1_000_000
        assert state.treasury() >= stake_before * fraction // 1_000_000
        assert sum(n.metrics.get("evidence_seen") for n in net.gatekeepers[:3]) > 0
        # the three honest ones go on without it
        honest = net.gatekeepers[:3]
        await reach([*honest, client], max(heights(honest)) + 3)
        assert_same_chain([*honest, client])


async def test_gatekeeper_stopped_mid_height_restarts_from_disk_without_double_signing() -> None:
    async with open_devnet(gatekeepers=4, clients=1, seed=14, chain_params=FAST) as net:
        await reach(net.all_nodes, 3)
        victim = net.gatekeepers[1]
        machine = victim.chain.consensus
        assert machine is not None

        def signed_mid_height() -> bool:
            last = machine.last_signed
            return (
                last is not None and last.height == machine.height and machine.step >= Step.PREVOTE
            )

        await wait_until(signed_mid_height, 30)
        signed = machine.last_signed
        assert signed is not None
        before = victim.chain.head.height
        await net.stop(victim)
        fresh = await net.restart(victim)
        # it restarted from its own store, not from scratch
        assert fresh.chain.head.height >= before
        assert fresh.chain.consensus is not None
        restored = fresh.chain.consensus.last_signed
        assert restored is not None
        assert restored.hrs >= signed.hrs
        others = [n for n in net.running if n is not fresh]
        target = max(heights(others)) + 5
        await reach(net.running, target)
        assert_same_chain(net.running, target)
        # nobody saw two conflicting votes from it, and it keeps its whole stake
        assert all(n.metrics.get("evidence_seen") == 0 for n in net.gatekeepers)
        assert fresh.account in net.clients[0].chain.state.gatekeepers()


async def test_governance_passes_above_half_and_fails_at_exactly_half() -> None:
    params = {**FAST, "voting_period_blocks": 6, "min_stake": 1}
    async with open_devnet(
        gatekeepers=4,
        clients=1,
        seed=15,
        chain_params=params,
        genesis_stakes=(5_100, 4_900, 10_000, 10_000),
    ) as net:
        g1, g2, g3, g4 = net.gatekeepers
        old_fee = g1.chain.state.params.tx_fee
        passing = await g1.wallet.propose("param_change", param="tx_fee", value=old_fee + 1)
        failing = await g3.wallet.propose("param_change", param="unbonding_blocks", value=7)
        assert passing.ok
        assert failing.ok
        assert passing.proposal_id is not None
        assert failing.proposal_id is not None
        assert passing.proposal_id != failing.proposal_id
        await reach(net.all_nodes, max(passing.height or 0, failing.height or 0))
        votes = await _gather(
            g1.wallet.vote(passing.proposal_id, True),  # 5,100 yes
            g2.wallet.vote(passing.proposal_id, False),  # 4,900 no -> 51% yes
            g3.wallet.vote(failing.proposal_id, True),  # 10,000 yes
            g4.wallet.vote(failing.proposal_id, False),  # 10,000 no -> exactly 50%
        )
        assert all(r.ok for r in votes), votes
        client = net.clients[0]

        def decided() -> bool:
            return all(p.status != "open" for p in client.chain.state.proposals())

        await wait_until(decided, 60)
        by_id = {p.id: p for p in client.chain.state.proposals()}
        assert by_id[passing.proposal_id].status == "passed"
        assert (by_id[passing.proposal_id].yes, by_id[passing.proposal_id].no) == (5_100, 4_900)
        assert by_id[failing.proposal_id].status == "rejected"
        # the passed change is in force, on every node
        for n in net.all_nodes:
            await wait_until(lambda n=n: n.chain.state.params.tx_fee == old_fee + 1, 30)
        assert client.chain.state.params.unbonding_blocks != 7
        # and the chain charges it
        before = client.chain.state.balance(client.account)
        receipt = await client.wallet.transfer(g1.account, 5)
        assert receipt.ok
        assert client.chain.state.balance(client.account) == before - 5 - (old_fee + 1)
        # a vote after the period is refused with its reason
        late = await g4.wallet.vote(passing.proposal_id, True)
        assert not late.ok
        assert late.error == TxRejectReason.VOTING_CLOSED


async def _gather(*calls):  # type: ignore[no-untyped-def]
    results: list = [None] * len(calls)  # type: ignore[type-arg]

    async def one(i, call):  # type: ignore[no-untyped-def]
        results[i] = await call

    async with trio.open_nursery() as n:
        for i, call in enumerate(calls):
            n.start_soon(one, i, call)
    return results


async def test_unstake_returns_funds_only_after_unbonding() -> None:
    params = {**FAST, "unbonding_blocks": 8, "min_stake": 100}
    async with open_devnet(gatekeepers=4, clients=1, seed=16, chain_params=params) as net:
        client = net.clients[0]
        me = client.account
        state = client.chain.state
        fee = state.params.tx_fee
        start = state.balance(me)
        r = await client.wallet.stake(1_000)
        assert r.ok
        assert state.stake(me) == 1_000
        assert state.balance(me) == start - 1_000 - fee
        r = await client.wallet.unstake(400)
        assert r.ok
        assert r.height is not None
        assert state.stake(me) == 600
        assert state.balance(me) == start - 1_000 - 2 * fee
        (release_height, amount), *_ = state.unbonding(me)
        assert amount == 400
        assert release_height == r.height + 8
        await reach([client], release_height - 1)
        assert state.balance(me) == start - 1_000 - 2 * fee  # still bonded
        await reach([client], release_height)
        assert state.balance(me) == start - 600 - 2 * fee
        assert state.unbonding(me) == []


async def test_invalid_transactions_are_rejected_with_their_reason() -> None:
    params = {**FAST, "min_stake": 1_000}
    async with open_devnet(gatekeepers=4, clients=1, seed=17, chain_params=params) as net:
        client = net.clients[0]
        chain = client.chain
        state = chain.state
        me = client.account
        fee = state.params.tx_fee
        cid = chain.view.chain_id
        nonce = state.nonce(me)
        stranger = Identity.generate()
        nobody = Identity.generate()  # never funded
        balances = {n.account: state.balance(n.account) for n in net.all_nodes}

        class Forged:
            public_key = me

            @staticmethod
            def sign(msg: bytes) -> bytes:
                return stranger.sign(msg)

        cases = {
            TxRejectReason.BAD_SIGNATURE: Tx.sign(
                Forged(), chain_id=cid, nonce=nonce, fee=fee, body=Transfer(stranger.public_key, 1)
            ),
            TxRejectReason.BAD_NONCE: Tx.sign(
                client.identity,
                chain_id=cid,
                nonce=nonce + 1000,
                fee=fee,
                body=Transfer(stranger.public_key, 1),
            ),
            TxRejectReason.INSUFFICIENT_FUNDS: Tx.sign(
                client.identity,
                chain_id=cid,
                nonce=nonce,
                fee=fee,
                body=Transfer(stranger.public_key, balances[me]),
            ),
            TxRejectReason.UNKNOWN_ACCOUNT: Tx.sign(
                nobody, chain_id=cid, nonce=0, fee=fee, body=Transfer(me, 1)
            ),
            TxRejectReason.BELOW_MIN_STAKE: Tx.sign(
                client.identity, chain_id=cid, nonce=nonce, fee=fee, body=Stake(999)
            ),
            TxRejectReason.WRONG_CHAIN: Tx.sign(
                client.identity,
                chain_id="other-chain",
                nonce=nonce,
                fee=fee,
                body=Transfer(stranger.public_key, 1),
            ),
            TxRejectReason.FEE_TOO_LOW: Tx.sign(
                client.identity,
                chain_id=cid,
                nonce=nonce,
                fee=fee - 1,
                body=Transfer(stranger.public_key, 1),
            ),
        }
        # the submitting node says why at once, and sends nothing
        for reason, tx in cases.items():
            result = await chain.submit_tx(tx)
            assert not result.ok, reason
            assert result.reason == reason, (reason, result)
        # a replayed transaction: finalized once, refused the second time
        ok = await client.wallet.transfer(stranger.public_key, 10)
        assert ok.ok
        first = chain.block(ok.height).transactions  # type: ignore[arg-type]
        replay = next(tx for tx in first if tx.id == ok.tx_id)
        result = await chain.submit_tx(replay)
        assert not result.ok
        assert result.reason in (
            TxRejectReason.BAD_NONCE,
            TxRejectReason.DUPLICATE,
        )
        # the same bad transactions sent straight to the gossip topic: gatekeepers refuse
        # them (counted by reason) and no block ever carries one
        keeper = net.gatekeepers[0]
        refused_before = _refusals(net.gatekeepers)
        for tx in [*cases.values(), replay]:
            await client.publish(TOPIC_TXS, encode(tx))
        await wait_until(lambda: _refusals(net.gatekeepers) - refused_before >= 4 * 5, 30)
        height = keeper.chain.head.height
        await reach(net.all_nodes, height + 3)
        bad_ids = {tx.id for tx in cases.values()}
        for h in range(1, keeper.chain.head.height + 1):
            included = bad_ids & {tx.id for tx in keeper.chain.block(h).transactions}
            assert not included, [r for r, tx in cases.items() if tx.id in included]
        # balances moved only by the one good transfer
        after = {n.account: state.balance(n.account) for n in net.all_nodes}
        balances[me] -= 10 + fee
        assert after == balances
        assert state.balance(stranger.public_key) == 10
        # the wallet refuses nonsense before signing anything
        with pytest.raises(UsageError):
            await client.wallet.transfer(b"short", 1)
        with pytest.raises(UsageError):
            await client.wallet.transfer(stranger.public_key, 0)
        r = await client.wallet.transfer(stranger.public_key, balances[me] * 2)
        assert not r.ok
        assert r.error == TxRejectReason.INSUFFICIENT_FUNDS


def _refusals(nodes: Sequence[Node]) -> int:
    """Transactions gatekeepers refused from gossip, whatever the reason."""
    total = 0
    for n in nodes:
        total += sum(n.metrics.by_label("txs_refused", "reason").values())
        total += n.metrics.get("rejected", reason="tx_wrong_chain")
        total += n.metrics.get("rejected", reason="tx_bad_signature")
    return total


async def test_forged_block_gossip_is_rejected_and_never_applied() -> None:
    async with open_devnet(gatekeepers=4, clients=1, seed=18, chain_params=FAST) as net:
        client = net.clients[0]
        liar = net.gatekeepers[3]
        await reach(net.all_nodes, 2)
        # the client and one gatekeeper are cut off from the three that go on
        three = net.gatekeepers[:3]
        await net.partition([*three, net.bootstrap], [liar, client])
        # a block the liar finalized just before the cut may still reach the client (the
        # liar's gossip hands it over): the client's side stops where the liar stopped
        await wait_until(
            lambda: client.chain.head.height == liar.chain.head.height, 10, message="same side"
        )
        target = client.chain.head.height + 1
        await reach(three, target + 1)
        real = three[0].chain.committed_block(target)
        assert real is not None
        assert client.chain.head.height == target - 1
        # the real block with its commit's signatures zeroed: refused
        zeroed = tuple(CommitSig(s.validator, bytes(64)) for s in real.commit.sigs)
        forged = CommittedBlock(real.block, replace(real.commit, sigs=zeroed))
        # a block the gatekeepers never signed, with the real commit attached: refused
        header = replace(real.block.header, time_ms=real.block.header.time_ms + 1)
        swapped = CommittedBlock(replace(real.block, header=header), real.commit)
        before = client.metrics.get("rejected", reason="block_bad_commit")
        await liar.publish(TOPIC_BLOCKS, encode(forged))
        await liar.publish(TOPIC_BLOCKS, encode(swapped))
        await wait_until(
            lambda: client.metrics.get("rejected", reason="block_bad_commit") >= before + 2, 20
        )
        assert client.chain.head.height == target - 1
        # after the heal it fetches the real block
        await net.heal()
        await reach([client], target + 1)
        assert client.chain.block(target).hash == real.block.hash
        assert_same_chain([client, three[0]], target + 1)


async def test_new_node_catches_up_through_sync(tmp_path: Path) -> None:
    async with open_devnet(gatekeepers=4, seed=19, chain_params=FAST, data_root=tmp_path) as net:
        await reach(net.all_nodes, 15)
        cfg = NodeConfig(
            role=Role.CLIENT,
            data_dir=tmp_path / "late",
            genesis=tmp_path / "genesis.toml",
            bootstrap=(net.bootstrap.listen_addrs[0],),  # type: ignore[union-attr]
        )
        node = await net.start_node(cfg)
        await reach([node], 15, timeout=30)
        assert node.metrics.get("blocks_synced") >= 10
        assert_same_chain([node, net.gatekeepers[0]], 15)


async def test_a_chain_slower_than_sync_interval_is_not_polled_between_blocks() -> None:
    """Blocks every 4 s, longer than the 3 s ``sync_interval``: followers used to take each
    gap for a halted chain and ask the gatekeeper for blocks between every two blocks. Now
    they wait two block times; the blocks come by gossip and nobody asks."""
    async with open_devnet(
        gatekeepers=1, clients=2, seed=21, chain_params={"block_time_ms": 4000}
    ) as net:
        keeper = net.gatekeepers[0]
        assert keeper.chain.quiet_after() == 8.0
        await reach(net.all_nodes, 2, timeout=30)
        start = keeper.chain.view.height
        asked = {n.peer_id: n.metrics.get("sync_attempts") for n in net.all_nodes}
        served = keeper.metrics.get("sync_served")
        await reach(net.all_nodes, start + 3, timeout=40)  # three gaps of 4 s
        assert {n.peer_id: n.metrics.get("sync_attempts") for n in net.all_nodes} == asked
        assert keeper.metrics.get("sync_served") == served
        assert_same_chain(net.all_nodes, start + 3)


def test_chain_params_reject_unknown_names() -> None:
    with pytest.raises(UsageError):
        ChainParams().with_changes({"block_tiem_ms": 5})


async def test_governance_adds_a_gatekeeper_that_then_signs_blocks() -> None:
    params = {**FAST, "voting_period_blocks": 4, "min_stake": 1_000}

    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        # node 5 runs as a gatekeeper but is not in the genesis set
        return cfg.with_(role=Role.GATEKEEPER) if i == 5 else cfg

    async with open_devnet(
        gatekeepers=4, clients=1, seed=20, chain_params=params, configure=configure
    ) as net:
        newcomer = next(n for n in net.gatekeepers if n.config.name.endswith("-5"))
        founders = [n for n in net.gatekeepers if n is not newcomer]
        state = founders[0].chain.state
        stake = state.stake(founders[0].account)
        assert newcomer.account not in state.gatekeepers()
        assert (await newcomer.wallet.stake(stake)).ok
        proposal = await founders[0].wallet.propose("gatekeeper_add", account=newcomer.account)
        assert proposal.ok
        assert proposal.proposal_id is not None
        await reach(founders, proposal.height or 0)
        votes = await _gather(*(g.wallet.vote(proposal.proposal_id, True) for g in founders))
        assert all(v.ok for v in votes)
        await wait_until(lambda: newcomer.account in state.gatekeepers(), 60)
        assert state.gatekeepers()[newcomer.account] == stake
        # with one founder stopped, the other three hold 3/5 < 2/3: the chain now goes on
        # only with the newcomer's precommits
        await net.stop(founders[3])
        live = [*founders[:3], newcomer]
        top = max(heights(live))
        await reach(live, top + 3)
        for h in range(top + 2, top + 4):
            cb = founders[0].chain.committed_block(h)
            assert cb is not None
            assert newcomer.account in {s.validator for s in cb.commit.sigs}
        assert_same_chain(live)
