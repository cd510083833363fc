"""The enclave on the network: a miner's enclave process, ``/phala/attest/1.0.0``, on-chain
registration, and verification of miners by anyone.

A miner node starts its enclave (the simulated one runs in its own OS process and keeps its
keys inside), answers attestation requests with a fresh quote over the asker's nonce, and
registers the enclave on chain (``MinerRegister``: a quote bound to the chain and to the
operator account). A client verifies a miner itself, never trusting the chain alone: it asks
for a fresh quote over its own random nonce, verifies it against the chain's policy (roots,
allowed measurements, TCB statuses, age), and checks that the enclave is registered and
active on chain.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from phala_p2p.chain.bodies import Stake
from phala_p2p.chain.liveness import Challenge, MinerHeartbeat, awaiting, challenge_at
from phala_p2p.chain.miners import (
    MinerDeregister,
    MinerRegister,
    MinerStatus,
    miner_by_enclave,
    policy_of,
    registration_nonce,
)
from phala_p2p.config import TeeConfig
from phala_p2p.crypto.keyfile import read_identity
from phala_p2p.errors import AttestationError, P2PError, ProtocolViolation, UsageError
from phala_p2p.tee.enclave import Enclave, EnclaveConfig, EnclaveInfo, open_simulated_enclave
from phala_p2p.tee.messages import AttestRequest, AttestResponse
from phala_p2p.tee.policy import verify_attestation
from phala_p2p.wire.codec import decode, encode

if TYPE_CHECKING:
    from phala_p2p.node import Node
    from phala_p2p.services.chain import Receipt

logger = logging.getLogger(__name__)

ATTEST_PROTOCOL = "/phala/attest/1.0.0"
MAX_ATTEST_REQUEST = 256
MAX_ATTEST_RESPONSE = 2 * 1024 * 1024  # a DCAP quote and its collateral


@dataclass(frozen=True)
class VerifiedMiner:
    """A miner whose enclave answered our nonce with a quote that meets the chain's policy,
    and whose enclave is registered and active on chain."""

    peer_id: str
    operator: bytes
    platform: str
    measurement: bytes
    identity_pub: bytes
    x25519_pub: bytes


class TeeService:
    """A node's enclave and its part of the attestation protocol. Made by the node."""

    def __init__(self, node: Node, config: TeeConfig) -> None:
        if config.dev_root_key is None:
            raise UsageError(
                "[tee] needs dev_root_key (the simulated platform's attestation root key file)"
            )
        self._node = node
        self.config = config
        self._root_seed = read_identity(config.dev_root_key).seed
        self.enclave: Enclave | None = None
        self.info: EnclaveInfo | None = None
        self.ready = trio.Event()
        self.registered: Receipt | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with open_simulated_enclave(EnclaveConfig(dev_root_seed=self._root_seed)) as enclave:
            self.enclave = enclave
            self.info = await enclave.info()
            self._node.serve(
                ATTEST_PROTOCOL,
                self._answer,
                max_request=MAX_ATTEST_REQUEST,
                max_response=MAX_ATTEST_RESPONSE,
                max_streams_per_peer=4,
            )
            self.ready.set()
            logger.info(
                "enclave up: measurement %s, identity %s",
                self.info.measurement.hex()[:16],
                self.info.identity_pub.hex()[:16],
            )
            task_status.started()
            try:
                if self.config.register and self._node.has_chain:
                    await self._register_until_done()
                    if self.registered is not None and self.registered.ok:
                        await self._answer_heartbeats()
                await trio.sleep_forever()
            finally:
                self.enclave = None

    async def _answer(self, peer: str, payload: bytes) -> bytes:
        request = decode(payload, max_size=MAX_ATTEST_REQUEST, expect=AttestRequest)
        enclave = self._require()
        self._node.metrics.count("attest_served")
        response = AttestResponse(
            platform=self._require_info().platform,
            quote=await enclave.quote(request.nonce),
            collateral="",
            identity_pub=self._require_info().identity_pub,
            x25519_pub=self._require_info().x25519_pub,
        )
        return encode(response)

    def _require(self) -> Enclave:
        if self.enclave is None:
            raise UsageError("the enclave is not running")
        return self.enclave

    def _require_info(self) -> EnclaveInfo:
        if self.info is None:
            raise UsageError("the enclave is not running")
        return self.info

    # -- registration ----------------------------------------------------------------------

    async def register(self, *, ensure_stake: bool = True) -> Receipt:
        """Register this node's enclave on chain under its account; with ``ensure_stake``
        first bond what is missing up to ``min_miner_stake``."""
        chain = self._node.chain
        enclave, info = self._require(), self._require_info()
        if ensure_stake:
            missing = chain.params.min_miner_stake - chain.state.stake(chain.account)
            if missing > 0:
                receipt = await chain.submit(Stake(missing))
                if not receipt.ok:
                    return receipt
        nonce = registration_nonce(chain.view.chain_id, chain.account)
        quote = await enclave.quote(nonce)
        body = MinerRegister(info.platform, quote, "", info.identity_pub, info.x25519_pub)
        receipt = await chain.submit(body)
        if receipt.ok:
            logger.info("miner registered on chain at height %s", receipt.height)
        return receipt

    async def deregister(self, reason: str = "") -> Receipt:
        return await self._node.chain.submit(MinerDeregister(reason))

    async def _register_until_done(self) -> None:
        delay = 1.0
        while True:
            await self._node.chain.wait_for_height(1, timeout=float("inf"))
            try:
                receipt = await self.register()
            except P2PError as err:
                logger.info("miner registration failed: %s; retrying", err)
            else:
                self.registered = receipt
                if receipt.ok:
                    return
                logger.warning("miner registration refused: %s %s", receipt.error, receipt.detail)
                if receipt.error == "attestation_failed":
                    return  # a quote the chain refuses will not get better by retrying
            await trio.sleep(delay)
            delay = min(delay * 2, 30.0)

    # -- liveness: the chain's heartbeat challenges (protocols/settlement.md) --------------

    async def _answer_heartbeats(self) -> None:
        """Answer every liveness challenge of our enclave, at each new block, while its
        window is open. A missed one costs the operator stake."""
        chain, key = self._node.chain, self._require_info().identity_pub
        asked: set[int] = set()  # challenge heights answered or being answered
        async with trio.open_nursery() as nursery:
            height = chain.head.height
            while True:
                await chain.wait_for_height(height + 1, timeout=float("inf"))
                height = chain.head.height
                state = chain.view.state
                oldest = max(1, height - chain.params.heartbeat_window_blocks)
                for h in range(oldest, height + 1):
                    challenge = challenge_at(state, h)
                    if h in asked or challenge is None or not awaiting(state, h, key):
                        continue
                    asked.add(h)
                    nursery.start_soon(self._heartbeat, challenge, asked)
                asked = {h for h in asked if h >= oldest}

    async def _heartbeat(self, challenge: Challenge, asked: set[int]) -> None:
        chain = self._node.chain
        try:
            signature = await self._require().heartbeat(
                chain.view.chain_id, challenge.height, challenge.seed
            )
            body = MinerHeartbeat(self._require_info().identity_pub, challenge.height, signature)
            receipt = await chain.submit(body)
        except P2PError as err:
            logger.warning("heartbeat for block %d not sent: %s", challenge.height, err)
            asked.discard(challenge.height)  # try again at the next block, while the window lasts
            return
        if receipt.ok:
            self._node.metrics.count("heartbeats_answered")
        else:
            self._node.metrics.count("heartbeats_refused", reason=str(receipt.error))
            logger.warning("heartbeat for block %d refused: %s", challenge.height, receipt.error)


async def verify_miner(node: Node, peer_id: str, *, timeout: float = 10.0) -> VerifiedMiner:
    """Ask ``peer_id``'s enclave for a fresh quote over our own nonce and check it against
    the chain's policy and registry. Raises AttestationError naming what failed (and the
    network's typed errors if the peer cannot be asked)."""
    chain = node.chain
    nonce = os.urandom(32)
    raw = await node.request(
        peer_id,
        ATTEST_PROTOCOL,
        encode(AttestRequest(nonce)),
        timeout=timeout,
        max_response=MAX_ATTEST_RESPONSE,
    )
    try:
        response = decode(raw, max_size=MAX_ATTEST_RESPONSE, expect=AttestResponse)
    except (ProtocolViolation, UsageError) as err:
        raise AttestationError(f"malformed attestation from {peer_id}: {err}") from err
    state = chain.view.state
    report = verify_attestation(
        response,
        nonce=nonce,
        policy=policy_of(state),
        sim_roots=state.attestation_roots(),
        now=int(time.time()),
    )
    record = miner_by_enclave(state, response.identity_pub)
    if record is None:
        raise AttestationError(f"the enclave of {peer_id} is not registered on chain")
    if record.status != MinerStatus.ACTIVE:
        raise AttestationError(f"the enclave of {peer_id} is {record.status}: {record.reason}")
    if record.x25519_pub != response.x25519_pub:
        raise AttestationError(f"{peer_id} answers with keys other than those registered")
    node.metrics.count("miners_verified")
    return VerifiedMiner(
        peer_id,
        record.operator,
        response.platform,
        report.measurement,
        response.identity_pub,
        response.x25519_pub,
    )
