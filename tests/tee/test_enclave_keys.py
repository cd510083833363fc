"""Key management across real enclave processes: master handover, epoch keys, sealed secrets.

Each enclave is its own OS process (about 0.2 s to start); the tests reuse a few.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable

import nacl.bindings
import pytest
import trio

from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import AttestationError, ProtocolViolation, Trap, UsageError
from phala_p2p.tee.enclave import (
    EnclaveConfig,
    EnclaveEvidence,
    EnclaveInfo,
    SimulatedEnclave,
    enclave_evidence,
    open_simulated_enclave,
)
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.keys import (
    MAX_SECRETS,
    ClusterKey,
    MasterKey,
    Purpose,
    open_box,
    seal_box,
    seal_secret,
)
from phala_p2p.tee.quote import make_report_data, sign_sim_quote
from phala_p2p.tee.sealing import ClientSession

Job = Callable[[str], bytes]

LIMITS = ExecutorLimits(
    max_fuel=10**10,
    memory_cap_bytes=4 * 1024 * 1024,
    wall_clock_s=0.5,
    max_input=1024 * 1024,
    max_output=1024 * 1024,
    max_module_bytes=256 * 1024,
)
ROOT_SEED = b"\x05" * 32
GATEKEEPER = EnclaveConfig(dev_root_seed=ROOT_SEED, limits=LIMITS)
# a miner runs the same code with other limits (so another measurement): still accepted
MINER = EnclaveConfig(dev_root_seed=ROOT_SEED, limits=dataclasses.replace(LIMITS, wall_clock_s=1.0))
SECRET = b"sk-live-SECRET-MARKER-5c2e91"
REQUEST = b"GET /v1/account"
FUEL = 10**7


def _tag(data: bytes) -> bytes:
    """What examples/jobs/secret_tag.wat computes: FNV-1a-32 as 8 hex digits."""
    h = 0x811C9DC5
    for byte in data:
        h = ((h ^ byte) * 16777619) & 0xFFFFFFFF
    return b"%08x" % h


class _Client:
    def __init__(self, enclave: SimulatedEnclave, session_id: bytes, keys: ClientSession):
        self.enclave = enclave
        self.session_id = session_id
        self.keys = keys

    async def run(self, module: bytes, data: bytes, secrets: list[bytes]) -> bytes:
        job_id = os.urandom(16)
        result = await self.enclave.run_sealed(
            self.session_id,
            job_id,
            self.keys.seal_module(job_id, module),
            self.keys.seal_input(job_id, data),
            FUEL,
            secrets,
        )
        return self.keys.open_output(job_id, result.sealed_output)


async def _client(enclave: SimulatedEnclave) -> _Client:
    keys = ClientSession()
    offer = await enclave.open_session(keys.public_key)
    keys.accept_offer(offer.enclave_pub, offer.session_id)
    return _Client(enclave, offer.session_id, keys)


def _forged(
    info: EnclaveInfo,
    x25519_pub: bytes,
    *,
    measurement: bytes | None = None,
    root_seed: bytes = ROOT_SEED,
    timestamp: int | None = None,
    nonce: bytes = b"forged",
) -> EnclaveEvidence:
    """Evidence for a key of our choosing, quoted with the dev root seed.

    On the simulated platform whoever holds the seed can do this (protocols/attest.md); the
    tests use it to see what an attacker without the seed is refused, and, with the seed, to
    learn the master key so as to check that it never crosses the boundary in the clear.
    """
    identity_pub = Identity.generate().public_key
    quote = sign_sim_quote(
        Identity.from_seed(root_seed),
        measurement if measurement is not None else info.measurement,
        make_report_data(identity_pub, x25519_pub, nonce=nonce),
        timestamp if timestamp is not None else int(time.time()),
    )
    return EnclaveEvidence("SIM", quote, identity_pub, x25519_pub, nonce, info.limits)


def _keypair() -> tuple[bytes, bytes]:
    secret = os.urandom(32)
    return secret, bytes(nacl.bindings.crypto_scalarmult_base(secret))


async def test_master_and_epoch_keys_never_cross_the_boundary_in_the_clear(job: Job) -> None:
    transcripts: dict[str, list[tuple[str, bytes]]] = {"g1": [], "g2": [], "m": []}

    def recorder(name: str) -> Callable[[str, bytes], None]:
        return lambda direction, chunk: transcripts[name].append((direction, chunk))

    async with (
        open_simulated_enclave(GATEKEEPER, transcript=recorder("g1")) as g1,
        open_simulated_enclave(GATEKEEPER, transcript=recorder("g2")) as g2,
        open_simulated_enclave(MINER, transcript=recorder("m")) as miner,
    ):
        # genesis: the master key is created inside g1
        genesis = await g1.km_generate(100)
        assert genesis.epoch == 100
        assert genesis == await g1.cluster_public(100)

        # (simulation only) the test, holding the dev root seed, poses as an enclave to learn
        # the master key: it checks below that the key never crosses a boundary in the clear
        spy_secret, spy_pub = _keypair()
        spied = await g1.km_export(_forged(await g1.info(), spy_pub), 100)
        _, state_100 = open_box(spy_secret, spied, purpose=Purpose.MASTER)
        spy_master = MasterKey(100, state_100)
        assert spy_master.cluster_key(100) == genesis

        # a gatekeeper admitted at epoch 101 gets the master from there on
        sealed_master = await g1.km_export(await enclave_evidence(g2, b"admit-g2"), 101)
        imported = await g2.km_import(sealed_master)
        assert imported == ClusterKey(101, spy_master.cluster_key(101).public_key)
        assert await g2.km_import(sealed_master) == imported  # a retry is harmless
        for epoch in (101, 102, 150):
            assert await g1.cluster_public(epoch) == await g2.cluster_public(epoch)
        with pytest.raises(UsageError, match="floor"):
            await g2.cluster_public(100)
        status = await g2.key_status()
        assert (status.role, status.master_floor, status.epochs) == ("key-manager", 101, ())

        # epoch keys for an attested miner (other limits, same code), from either gatekeeper
        miner_evidence = await enclave_evidence(miner, b"miner-nonce")
        share_102 = await g1.km_share_epoch(102, miner_evidence)
        share_102_again = await g2.km_share_epoch(102, miner_evidence)
        assert share_102 != share_102_again  # fresh ephemeral keys, same epoch secret
        cluster_102 = await miner.accept_epoch(share_102)
        assert cluster_102 == await g2.cluster_public(102)
        assert await miner.accept_epoch(share_102_again) == cluster_102
        cluster_103 = await miner.accept_epoch(await g2.km_share_epoch(103, miner_evidence))
        assert cluster_103 != cluster_102
        assert await miner.cluster_public(103) == cluster_103

        # a client seals a secret to the epoch's cluster key; the job reads it
        module = job("secret_tag")
        box = seal_secret(cluster_102, hashlib.sha256(module).digest(), 0, SECRET)
        client = await _client(miner)
        assert await client.run(module, REQUEST, [box]) == _tag(SECRET + REQUEST)
        with pytest.raises(Trap):  # the same job without its secret
            await client.run(module, REQUEST, [])

        # rotation: once epoch 102 is erased, its secrets no longer open anywhere
        status = await miner.erase_before(103)
        assert (status.role, status.epochs, status.epoch_floor) == ("worker", (103,), 103)
        with pytest.raises(ProtocolViolation) as info:
            await client.run(module, REQUEST, [box])
        assert info.value.reason == "erased"
        with pytest.raises(ProtocolViolation) as info:
            await miner.accept_epoch(share_102)  # replaying the old share does not revive it
        assert info.value.reason == "erased"
        await g1.erase_before(103)
        await g2.erase_before(103)
        for gatekeeper in (g1, g2):
            with pytest.raises(UsageError, match="erased"):
                await gatekeeper.cluster_public(102)
            with pytest.raises(UsageError, match="erased"):
                await gatekeeper.km_share_epoch(102, miner_evidence)
        with pytest.raises(UsageError, match="erased"):
            await g1.km_export(await enclave_evidence(g2), 102)
        assert (await g1.key_status()).master_floor == 103
        box_103 = seal_secret(cluster_103, hashlib.sha256(module).digest(), 0, SECRET)
        assert await client.run(module, b"after rotation", [box_103]) == _tag(
            SECRET + b"after rotation"
        )

    hidden = {"the client secret": SECRET}
    for epoch in range(100, 110):
        hidden[f"master state {epoch}"] = spy_master.state_at(epoch)
        hidden[f"epoch secret {epoch}"] = spy_master.epoch_secret(epoch)
    seen = {
        (name, direction): b"".join(c for d, c in chunks if d == direction)
        for name, chunks in transcripts.items()
        for direction in ("to_enclave", "from_enclave", "enclave_stderr")
    }
    for (name, direction), data in seen.items():
        for label, value in hidden.items():
            assert value not in data, f"{label} crossed the {name} boundary ({direction})"
    # the check can fail: the transcripts do carry the key material, sealed, and public keys
    assert sealed_master in seen["g1", "from_enclave"]
    assert sealed_master in seen["g2", "to_enclave"]
    assert share_102 in seen["m", "to_enclave"]
    assert box in seen["m", "to_enclave"]
    assert cluster_102.public_key in seen["m", "from_enclave"]


async def test_bad_key_requests_are_refused_and_the_enclaves_keep_serving(job: Job) -> None:
    async with (
        open_simulated_enclave(GATEKEEPER) as gk,
        open_simulated_enclave(MINER) as miner,
    ):
        gk_info, miner_info = await gk.info(), await miner.info()
        miner_evidence = await enclave_evidence(miner, b"nonce")
        with pytest.raises(UsageError, match="no master"):
            await gk.km_share_epoch(1, miner_evidence)
        with pytest.raises(UsageError, match="no key for epoch"):
            await miner.cluster_public(1)
        await gk.km_generate(0)
        with pytest.raises(UsageError, match="already holds"):
            await gk.km_generate(0)

        # key material goes only to an enclave of this code whose quote checks out inside
        _, spy_pub = _keypair()
        refused = [
            (_forged(miner_info, spy_pub, root_seed=b"\x06" * 32), "unknown root"),
            (_forged(miner_info, spy_pub, measurement=b"\x00" * 32), "other code"),
            (_forged(miner_info, spy_pub, timestamp=int(time.time()) - 3600), "stale"),
            (dataclasses.replace(miner_evidence, x25519_pub=spy_pub), "report data"),
            (dataclasses.replace(miner_evidence, nonce=b"other"), "report data"),
            (dataclasses.replace(miner_evidence, limits=LIMITS), "other code"),
            (dataclasses.replace(miner_evidence, platform="SGX"), "cannot verify"),
        ]
        for evidence, match in refused:
            with pytest.raises(AttestationError, match=match):
                await gk.km_share_epoch(1, evidence)
            with pytest.raises(AttestationError, match=match):
                await gk.km_export(evidence, 1)

        # blobs for another purpose or recipient, altered or forged
        master_for_miner = await gk.km_export(miner_evidence, 0)  # an attested enclave
        share = await gk.km_share_epoch(1, miner_evidence)
        attempts = [
            (miner.accept_epoch, master_for_miner, "wrong-purpose"),
            (gk.km_import, master_for_miner, "wrong-recipient"),
            (gk.km_import, share, "wrong-purpose"),
            (miner.accept_epoch, share[:-1] + bytes([share[-1] ^ 1]), "bad-seal"),
            (miner.accept_epoch, share[:1] + b"\x01" + share[2:], "wrong-purpose"),
            (miner.accept_epoch, b"\x07" + share[1:], "version"),
        ]
        for method, blob, reason in attempts:
            with pytest.raises(ProtocolViolation) as info:
                await method(blob)
            assert info.value.reason == reason
        cluster = await miner.accept_epoch(share)
        assert cluster == await gk.cluster_public(1)
        # anyone may seal to the miner's key, but not replace an epoch key it holds
        forged_share = seal_box(miner_info.x25519_pub, Purpose.EPOCH, 1, os.urandom(32))
        with pytest.raises(ProtocolViolation) as info:
            await miner.accept_epoch(forged_share)
        assert info.value.reason == "conflict"

        # roles: the master never sits next to a job
        with pytest.raises(UsageError, match="key-manager; it cannot act as a worker"):
            await (await _client(gk)).run(job("echo"), b"x", [])
        with pytest.raises(UsageError, match="worker; it cannot act as a key-manager"):
            await miner.km_import(master_for_miner)

        # sealed secrets bound to module, slot and epoch
        module = job("secret_tag")
        module_hash = hashlib.sha256(module).digest()
        client = await _client(miner)
        bad_secrets = [
            ([seal_secret(cluster, hashlib.sha256(b"other").digest(), 0, SECRET)], "bad-seal"),
            (
                [
                    seal_secret(cluster, module_hash, 0, b"one"),
                    seal_secret(cluster, module_hash, 0, SECRET),
                ],
                "bad-seal",
            ),
            ([seal_secret(await gk.cluster_public(2), module_hash, 0, SECRET)], "unknown-epoch"),
            ([seal_secret(ClusterKey(1, spy_pub), module_hash, 0, SECRET)], "wrong-recipient"),
            ([master_for_miner], "wrong-purpose"),
            ([b"\x01\x09" + bytes(112)], "malformed"),
        ]
        for secrets, reason in bad_secrets:
            with pytest.raises(ProtocolViolation) as info:
                await client.run(module, REQUEST, secrets)
            assert info.value.reason == reason, secrets
        with pytest.raises(UsageError):
            await client.run(module, REQUEST, [b"x" * 114] * (MAX_SECRETS + 1))
        with pytest.raises(UsageError):
            await miner.accept_epoch(b"short")
        with pytest.raises(UsageError):
            await gk.cluster_public(-1)

        # both still serve
        box = seal_secret(cluster, module_hash, 0, SECRET)
        assert await client.run(module, REQUEST, [box]) == _tag(SECRET + REQUEST)
        assert await gk.cluster_public(5) == (await gk.cluster_public(5))
        assert len(await gk.quote(b"still here")) == 204
        assert gk_info.measurement != miner_info.measurement
        with trio.fail_after(5):
            assert (await miner.key_status()).epochs == (1,)
