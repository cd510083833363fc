"""Key custody on real hosts: the master key stays in gatekeeper enclaves, a new key manager
gets it sealed to its attested enclave, miners get epoch keys, revoked miners get none, and
a client's sealed secret opens only inside a keyed enclave."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import wasmtime

from phala_p2p.chain.miners import MinerStatus, get_miner
from phala_p2p.errors import P2PError, RemoteError
from phala_p2p.tee.sealing import ClientSession
from phala_p2p.testing import open_devnet, wait_until

from .test_chain import FAST, _gather, reach

JOBS = Path(__file__).resolve().parents[2] / "examples" / "jobs"


def compile_wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


PARAMS = {**FAST, "key_epoch_blocks": 10, "key_retention_epochs": 1, "voting_period_blocks": 8}


async def test_master_handover_epoch_keys_rotation_and_revocation() -> None:
    async with open_devnet(
        gatekeepers=4, miners=2, clients=1, seed=41, chain_params=PARAMS, key_custody=True
    ) as net:
        keepers, client = net.gatekeepers, net.clients[0]

        def all_hold_master() -> bool:
            return all(k.keys is not None and k.keys.has_master.is_set() for k in keepers)

        await wait_until(all_hold_master, 90, message="every gatekeeper holds the master")
        # one master: every key manager derives the same cluster key, and clients learn it
        epoch = keepers[0].keys.epoch  # type: ignore[union-attr]
        publics = set()
        for k in keepers:
            assert k.tee is not None
            assert k.tee.enclave is not None
            publics.add((await k.tee.enclave.cluster_public(epoch)).public_key)
        assert len(publics) == 1
        assert client.keys is not None
        await wait_until(lambda: epoch in client.keys.clusters, 30)  # type: ignore[union-attr]
        assert client.keys.clusters[epoch].public_key in publics
        # registered miners get the epoch's key inside their enclave, and a certificate
        for m in net.miners:
            await wait_until(
                lambda m=m: (
                    m.keys is not None and m.keys.status is not None and m.keys.status.epochs != ()
                ),
                90,
                message="miner holds an epoch key",
            )
            assert m.tee is not None
            assert m.tee.info is not None
            await wait_until(lambda m=m: m.tee.info.identity_pub in client.keys.workers, 30)  # type: ignore[union-attr]
        # rotation: a later epoch gets a new key and old ones are erased
        miner = net.miners[0]
        assert miner.keys is not None
        first = min(miner.keys.status.epochs)  # type: ignore[union-attr]
        await reach([client], (first + 3) * PARAMS["key_epoch_blocks"], timeout=120)

        def rotated() -> bool:
            status = miner.keys.status  # type: ignore[union-attr]
            return status is not None and status.epoch_floor > first and max(status.epochs) > first

        await wait_until(rotated, 60, message="miner rotated and erased its old epoch key")
        newest = max(client.keys.clusters)
        assert client.keys.clusters[newest].public_key != client.keys.clusters[first].public_key
        # revoking a miner's measurement: key managers gossip its revocation, it gets no keys
        victim = net.miners[1]
        assert victim.tee is not None
        assert victim.tee.info is not None
        p = await keepers[0].wallet.propose(
            "measurement_revoke", measurement=victim.tee.info.measurement
        )
        assert p.ok
        assert p.proposal_id is not None
        await reach(keepers, p.height or 0)
        votes = await _gather(*(k.wallet.vote(p.proposal_id, True) for k in keepers))
        assert all(v.ok for v in votes)

        def revoked() -> bool:
            record = get_miner(client.chain.view.state, victim.account)
            return record is not None and record.status == MinerStatus.REVOKED

        await wait_until(revoked, 60)
        await wait_until(lambda: victim.tee.info.identity_pub in client.keys.revoked, 30)  # type: ignore[union-attr]
        # it asks no more, and a key manager refuses it if it does
        current = client.keys.epoch
        with pytest.raises(RemoteError):
            await victim.keys.request_key(victim.keys.key_managers()[0], "epoch", current)  # type: ignore[union-attr]
        assert (
            sum(
                k.metrics.get("key_requests_refused", reason="not_an_active_miner") for k in keepers
            )
            >= 1
        )
        next_epoch_start = (current + 1) * PARAMS["key_epoch_blocks"]
        await reach([client], next_epoch_start + 2, timeout=120)
        assert client.keys.epoch not in victim.keys.status.epochs  # type: ignore[union-attr]


async def test_sealed_secret_opens_only_in_a_keyed_enclave() -> None:
    async with open_devnet(
        gatekeepers=4, miners=1, clients=1, seed=42, chain_params=PARAMS, key_custody=True
    ) as net:
        client, miner = net.clients[0], net.miners[0]
        assert client.keys is not None
        assert miner.keys is not None
        await wait_until(lambda: bool(client.keys.clusters), 90)  # type: ignore[union-attr]
        await wait_until(
            lambda: miner.keys.status is not None and bool(miner.keys.status.epochs),
            90,  # type: ignore[union-attr]
        )
        module_hash = hashlib.sha256(b"some module").digest()
        epoch = max(miner.keys.status.epochs)  # type: ignore[union-attr]
        await wait_until(lambda: epoch in client.keys.clusters, 30)  # type: ignore[union-attr]
        sealed = client.keys.seal_secret(b"API-KEY-MARKER", module_hash=module_hash, epoch=epoch)
        assert b"API-KEY-MARKER" not in sealed
        # the miner's enclave opens it for that module only, and the job reads it
        assert miner.tee is not None
        assert miner.tee.enclave is not None
        enclave = miner.tee.enclave
        module = compile_wat((JOBS / "secret_tag.wat").read_text())
        module_hash = hashlib.sha256(module).digest()
        sealed = client.keys.seal_secret(b"API-KEY-MARKER", module_hash=module_hash, epoch=epoch)
        keys = ClientSession()
        offer = await enclave.open_session(keys.public_key)
        keys.accept_offer(offer.enclave_pub, offer.session_id)
        job_id = os.urandom(16)
        result = await enclave.run_sealed(
            offer.session_id,
            job_id,
            keys.seal_module(job_id, module),
            keys.seal_input(job_id, b"GET /v1/me"),
            10_000_000,
            [sealed],
        )
        assert keys.open_output(job_id, result.sealed_output) == _fnv(
            b"API-KEY-MARKER" + b"GET /v1/me"
        )
        # a gatekeeper's enclave (a key manager, which runs no jobs) cannot be made to use it,
        # and a secret sealed for another module is refused by the miner's enclave
        other = client.keys.seal_secret(b"x", module_hash=bytes(32), epoch=epoch)
        job_id = os.urandom(16)
        with pytest.raises(P2PError):
            await enclave.run_sealed(
                offer.session_id,
                job_id,
                keys.seal_module(job_id, module),
                keys.seal_input(job_id, b"GET"),
                10_000_000,
                [other],
            )


def _fnv(data: bytes) -> bytes:
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return b"%08x" % h


async def test_a_gatekeeper_admitted_by_governance_receives_the_master() -> None:
    from phala_p2p.config import NodeConfig, Role

    def configure(i: int, cfg: NodeConfig) -> NodeConfig:
        # node 5 is a key-manager gatekeeper that genesis does not know
        return cfg.with_(role=Role.GATEKEEPER) if i == 5 else cfg

    async with open_devnet(
        gatekeepers=4,
        clients=1,
        seed=43,
        chain_params=PARAMS,
        key_custody=True,
        configure=configure,
    ) as net:
        newcomer = next(n for n in net.gatekeepers if n.config.name.endswith("-5"))
        founders = [n for n in net.gatekeepers if n is not newcomer]
        assert newcomer.keys is not None
        assert newcomer.keys.key_manager
        await wait_until(lambda: all(f.keys.has_master.is_set() for f in founders), 90)  # type: ignore[union-attr]

        # not a gatekeeper yet: the key managers refuse it the master
        def refused() -> int:
            return sum(
                f.metrics.get("key_requests_refused", reason="not_a_gatekeeper") for f in founders
            )

        await wait_until(lambda: refused() > 0, 60, message="a refused master request")
        assert not newcomer.keys.has_master.is_set()
        stake = founders[0].chain.state.stake(founders[0].account)
        assert (await newcomer.wallet.stake(stake)).ok
        p = await founders[0].wallet.propose("gatekeeper_add", account=newcomer.account)
        assert p.ok
        assert p.proposal_id is not None
        await reach(founders, p.height or 0)
        votes = await _gather(*(f.wallet.vote(p.proposal_id, True) for f in founders))
        assert all(v.ok for v in votes)
        await wait_until(
            lambda: newcomer.keys.has_master.is_set(), 90, message="master handed over"
        )  # type: ignore[union-attr]
        # it derives the same cluster key as the founders
        assert newcomer.tee is not None
        assert newcomer.tee.enclave is not None
        assert founders[0].tee is not None
        assert founders[0].tee.enclave is not None
        epoch = newcomer.keys.epoch
        mine = await newcomer.tee.enclave.cluster_public(epoch)
        theirs = await founders[0].tee.enclave.cluster_public(epoch)
        assert mine == theirs
