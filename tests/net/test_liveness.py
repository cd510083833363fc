"""Miner liveness on real hosts: the chain challenges miners each block, their enclaves answer
through their nodes, and a miner that stops answering is slashed, then revoked."""

from __future__ import annotations

from phala_p2p.chain.liveness import misses_of
from phala_p2p.chain.miners import MinerStatus, get_miner
from phala_p2p.node import Node
from phala_p2p.testing import open_devnet, wait_until

from .test_chain import FAST

SLASH_PPM = 100_000  # 10 % a miss: large enough to see, small enough to leave a stake
LIVENESS = {
    **FAST,
    "block_time_ms": 300,
    # A challenge is one more transaction, and a pending one starts a block early: challenging
    # every miner every block would feed itself. About one block in three, a 20-block window.
    "heartbeat_challenge_ppm": 300_000,
    "heartbeat_window_blocks": 20,
    "heartbeat_slash_ppm": SLASH_PPM,
    "heartbeat_max_misses": 2,
}


def _enclave(miner: Node) -> bytes:
    assert miner.tee is not None
    assert miner.tee.info is not None
    return miner.tee.info.identity_pub


async def test_miners_answer_heartbeats_and_a_silent_one_is_slashed_then_revoked() -> None:
    async with open_devnet(gatekeepers=1, miners=2, seed=81, chain_params=LIVENESS) as net:
        live, silent = net.miners
        observer = net.gatekeepers[0]
        await wait_until(
            lambda: all(m.metrics.get("heartbeats_answered") >= 3 for m in net.miners),
            60,
            message="both miners answered three challenges",
        )
        state = observer.chain.view.state
        assert misses_of(state, _enclave(live)) == (0, 0)
        assert misses_of(state, _enclave(silent)) == (0, 0)
        assert live.metrics.get("heartbeats_refused") == 0
        stake = state.stake(silent.account)
        assert stake > 0

        # a miner that stops answering: one miss costs SLASH_PPM of its stake ...
        enclave = _enclave(silent)
        await net.stop(silent)
        await wait_until(
            lambda: misses_of(observer.chain.view.state, enclave)[1] >= 1,
            30,
            message="the stopped miner missed a challenge",
        )
        state = observer.chain.view.state
        _, total = misses_of(state, enclave)
        expected = stake
        for _ in range(total):
            expected -= expected * SLASH_PPM // 1_000_000
        assert state.stake(silent.account) == expected < stake

        # ... and it is revoked (by the stake it lost, or by misses in a row: the sans-IO
        # tests in tests/chain/test_liveness.py tell the two apart), while the live miner has
        # missed nothing and stays active
        await wait_until(
            lambda: _status(observer, silent) == MinerStatus.REVOKED,
            30,
            message="the silent miner revoked",
        )
        assert misses_of(observer.chain.view.state, _enclave(live)) == (0, 0)
        assert _status(observer, live) == MinerStatus.ACTIVE


def _status(observer: Node, miner: Node) -> MinerStatus | None:
    record = get_miner(observer.chain.view.state, miner.account)
    return None if record is None else MinerStatus(record.status)
