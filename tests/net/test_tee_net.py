"""Enclaves on the network: miners register attested enclaves on chain; clients verify miners
themselves over /phala/attest/1.0.0; bad quotes, unknown measurements, missing stake and
revoked measurements are refused by the chain and by clients."""

from __future__ import annotations

import pytest

from phala_p2p.chain.miners import MinerStatus, all_miners, get_miner
from phala_p2p.config import NodeConfig, TeeConfig
from phala_p2p.crypto.identity import Identity
from phala_p2p.crypto.keyfile import save_identity
from phala_p2p.errors import AttestationError, P2PError, ProtocolNotSupported
from phala_p2p.services.chain import Receipt
from phala_p2p.services.tee import ATTEST_PROTOCOL
from phala_p2p.testing import open_devnet, wait_until

from .test_chain import FAST, _gather, reach


async def test_miners_register_and_clients_verify_them_themselves() -> None:
    async with open_devnet(gatekeepers=4, miners=2, clients=1, seed=31, chain_params=FAST) as net:
        client = net.clients[0]
        state = client.chain.state

        def registered() -> bool:
            return (
                len([m for m in all_miners(client.chain.view.state) if m.status == "active"]) == 2
            )

        await wait_until(registered, 60, message="both miners registered")
        for miner in net.miners:
            assert miner.tee is not None
            assert miner.tee.info is not None
            verified = await client.verify_miner(miner.peer_id)
            assert verified.operator == miner.account
            assert verified.identity_pub == miner.tee.info.identity_pub
            assert verified.x25519_pub == miner.tee.info.x25519_pub
            assert verified.measurement in state.allowed_measurements()
            assert state.stake(miner.account) >= state.params.min_miner_stake
        # a node that is not a miner has no enclave to ask
        with pytest.raises(ProtocolNotSupported):
            await client.verify_miner(net.gatekeepers[0].peer_id)
        # garbage instead of an AttestRequest gets a typed error; the miner keeps serving
        miner = net.miners[0]
        with pytest.raises(P2PError):
            await client.request(miner.peer_id, ATTEST_PROTOCOL, b"\x93\x01\xcd", timeout=5)
        assert (await client.verify_miner(miner.peer_id)).operator == miner.account


async def test_bad_quotes_unknown_measurements_and_no_stake_are_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    forged_root = tmp_path / "forged-root.key"
    save_identity(forged_root, Identity.generate())

    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        if i == 5:  # a miner whose quotes are signed by a root the chain does not trust
            return cfg.with_(tee=TeeConfig(dev_root_key=forged_root, register=False))
        if i == 6:  # an honest enclave, registered without stake
            return cfg.with_(tee=TeeConfig(dev_root_key=cfg.tee.dev_root_key, register=False))
        return cfg

    async with open_devnet(
        gatekeepers=4, miners=2, clients=1, seed=32, chain_params=FAST, configure=configure
    ) as net:
        forger, unstaked = net.miners
        client = net.clients[0]
        await reach(net.all_nodes, 1)
        assert forger.tee is not None
        assert unstaked.tee is not None
        receipt = await forger.tee.register()
        assert not receipt.ok
        assert receipt.error == "attestation_failed"
        assert "root" in receipt.detail
        with pytest.raises(AttestationError, match="root"):
            await client.verify_miner(forger.peer_id)
        receipt = await unstaked.tee.register(ensure_stake=False)
        assert not receipt.ok
        assert receipt.error == "below_min_stake"
        # an honest enclave the chain never registered is refused by clients too
        with pytest.raises(AttestationError, match="not registered"):
            await client.verify_miner(unstaked.peer_id)
        assert get_miner(client.chain.view.state, forger.account) is None
        assert get_miner(client.chain.view.state, unstaked.account) is None
        # once staked and registered it is accepted
        assert (await unstaked.tee.register()).ok
        await reach([client], unstaked.chain.head.height)
        assert (await client.verify_miner(unstaked.peer_id)).operator == unstaked.account


async def test_revoking_the_measurement_revokes_the_miner_for_chain_and_clients() -> None:
    params = {**FAST, "voting_period_blocks": 8}
    async with open_devnet(gatekeepers=4, miners=1, clients=1, seed=33, chain_params=params) as net:
        miner, client = net.miners[0], net.clients[0]
        await wait_until(lambda: get_miner(client.chain.view.state, miner.account) is not None, 60)
        assert (await client.verify_miner(miner.peer_id)).operator == miner.account
        assert miner.tee is not None
        assert miner.tee.info is not None
        measurement = miner.tee.info.measurement
        keepers = net.gatekeepers
        p = await keepers[0].wallet.propose("measurement_revoke", measurement=measurement)
        assert p.ok
        assert p.proposal_id is not None
        await reach(keepers, p.height or 0)
        votes: list[Receipt] = await _gather(*(k.wallet.vote(p.proposal_id, True) for k in keepers))
        assert all(v.ok for v in votes)

        def revoked() -> bool:
            record = get_miner(client.chain.view.state, miner.account)
            return record is not None and record.status == MinerStatus.REVOKED

        await wait_until(revoked, 60)
        with pytest.raises(AttestationError, match="unknown measurement"):
            await client.verify_miner(miner.peer_id)
        # and it cannot come back with the same enclave
        again = await miner.tee.register()
        assert not again.ok
        assert again.error == "attestation_failed"
