"""Key custody on the network: the gatekeepers' master key, per-epoch cluster keys handed to
attested miners, worker certificates and revocations on ``phala/keys/1``.

Gatekeepers whose config sets ``[tee] key_manager`` run a key-manager enclave. The first
genesis gatekeeper creates the master key inside its enclave; every other key manager asks a
holder for it over ``/phala/keys/1.0.0`` with evidence of its own enclave (a quote over a
fresh nonce): the holder's enclave checks that evidence itself and seals the master to it,
after the holder node has checked on chain that the asker is an active gatekeeper. Nothing
but sealed boxes and public keys ever leaves an enclave.

Epoch ``e`` covers heights ``[e * key_epoch_blocks, (e+1) * key_epoch_blocks)``. Each epoch,
key managers announce its cluster public key on ``phala/keys/1`` (and again every few
seconds: gossip does not backfill) and erase keys older than ``key_retention_epochs``.
Miners registered and active on chain ask for the epoch's secret the same way and get it
sealed to their enclave; a revoked miner is refused. After handing a key, a key manager
gossips a worker certificate; when the chain revokes a miner, key managers gossip its
revocation so that others learn it before they apply the block themselves.

Clients seal secrets (API keys for a job, say) to an announced cluster key
(``node.keys.seal_secret``): only an attested enclave holding that epoch's key opens them.

Limitation of the simulated platform: enclaves keep no sealed storage, so a key manager that
restarts asks a peer for the master again; if every key manager restarts at once, the master
is lost and must be created anew (real platforms seal it to disk).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from phala_p2p.chain.block import Block
from phala_p2p.chain.miners import MinerStatus, all_miners, miner_by_enclave
from phala_p2p.errors import (
    AttestationError,
    P2PError,
    ProtocolNotSupported,
    ProtocolViolation,
    UsageError,
)
from phala_p2p.net.gossip import ACCEPT, GossipMessage, Validation
from phala_p2p.net.host import public_key_of
from phala_p2p.tee.executor import ExecutorLimits
from phala_p2p.tee.keys import ClusterKey, seal_secret, secret_context
from phala_p2p.tee.keyshare import EnclaveEvidence, KeyStatus
from phala_p2p.wire.codec import decode, encode, message

if TYPE_CHECKING:
    from phala_p2p.node import Node
    from phala_p2p.tee.enclave import Enclave, EnclaveInfo

logger = logging.getLogger(__name__)

KEYS_TOPIC = "phala/keys/1"
KEYS_PROTOCOL = "/phala/keys/1.0.0"
MAX_KEY_REQUEST = 16 * 1024
MAX_KEY_RESPONSE = 4 * 1024
MAX_KEY_GOSSIP = 1024
ANNOUNCE_INTERVAL = 5.0
RETRY = 1.0
NOT_SERVING_S = 60.0  # a gatekeeper that does not serve keys (no enclave) is asked again after


@message(310)
@dataclass(frozen=True)
class KeyRequest:
    """Ask a key manager for the master (``what="master"``) or an epoch secret
    (``what="epoch"``), sealed to the enclave described by the evidence."""

    what: str = field(metadata={"max_len": 8})
    epoch: int
    platform: str = field(metadata={"max_len": 8})
    quote: bytes = field(metadata={"max_len": 8192})
    identity_pub: bytes = field(metadata={"max_len": 32})
    x25519_pub: bytes = field(metadata={"max_len": 32})
    nonce: bytes = field(metadata={"max_len": 64})
    limits: bytes = field(metadata={"max_len": 1024})  # msgpack of ExecutorLimits.canonical()

    def validate(self) -> None:
        if self.what not in ("master", "epoch"):
            raise ProtocolViolation("a key request asks for 'master' or 'epoch'")
        if not 0 <= self.epoch < 2**48:
            raise ProtocolViolation("epoch out of range")

    def evidence(self) -> EnclaveEvidence:
        try:
            limits = ExecutorLimits(**_limits(msgpack.unpackb(self.limits, raw=False)))
            return EnclaveEvidence(
                self.platform, self.quote, self.identity_pub, self.x25519_pub, self.nonce, limits
            )
        except (ValueError, TypeError, UsageError, msgpack.UnpackException) as err:
            raise ProtocolViolation(f"bad enclave evidence: {err}") from err


@message(311)
@dataclass(frozen=True)
class KeyResponse:
    sealed: bytes = field(metadata={"max_len": 2048})


@message(312)
@dataclass(frozen=True)
class EpochAnnounce:
    """An epoch's cluster public key, announced by a key-manager gatekeeper."""

    epoch: int
    public_key: bytes = field(metadata={"max_len": 32})


@message(313)
@dataclass(frozen=True)
class WorkerCert:
    """A key manager handed ``epoch``'s key to this registered miner enclave."""

    epoch: int
    identity_pub: bytes = field(metadata={"max_len": 32})
    x25519_pub: bytes = field(metadata={"max_len": 32})
    operator: bytes = field(metadata={"max_len": 32})


@message(314)
@dataclass(frozen=True)
class WorkerRevoked:
    identity_pub: bytes = field(metadata={"max_len": 32})
    reason: str = field(metadata={"max_len": 128})


def _limits(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) != set(ExecutorLimits().canonical()):
        raise ValueError("limits have unexpected or missing fields")
    return {k: (float(v) if k == "wall_clock_s" else int(v)) for k, v in raw.items()}


class KeyService:
    """A node's part in key custody. Key managers and miners need an enclave; every node
    that keeps the chain learns cluster keys, certificates and revocations."""

    def __init__(self, node: Node, *, key_manager: bool) -> None:
        self._node = node
        self._not_serving: dict[str, float] = {}  # gatekeeper peer -> when to ask it again
        self.key_manager = key_manager
        self.clusters: dict[int, ClusterKey] = {}  # announced by key managers
        self.workers: dict[bytes, WorkerCert] = {}  # enclave identity -> latest certificate
        self.revoked: dict[bytes, str] = {}  # enclave identity -> reason
        self.status: KeyStatus | None = None
        self.has_master = trio.Event()
        self._epoch_changed = trio.Event()
        self._active_miners: set[bytes] = set()
        self._announced: dict[int, float] = {}

    # -- public ----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The current key epoch, from the chain's head."""
        chain = self._node.chain
        return chain.head.height // chain.params.key_epoch_blocks

    def cluster_key(self, epoch: int | None = None) -> ClusterKey:
        """The announced cluster key of ``epoch`` (default: the newest announced)."""
        if not self.clusters:
            raise UsageError("no cluster key announced yet")
        if epoch is None:
            epoch = max(self.clusters)
        key = self.clusters.get(epoch)
        if key is None:
            raise UsageError(f"no cluster key announced for epoch {epoch}")
        return key

    def seal_secret(
        self, secret: bytes, *, module_hash: bytes, slot: int = 0, epoch: int | None = None
    ) -> bytes:
        """Seal ``secret`` for the job whose module has SHA-256 ``module_hash``."""
        secret_context(module_hash, slot)  # checks the arguments
        return seal_secret(self.cluster_key(epoch), module_hash, slot, secret)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        node = self._node
        node.gossip.set_validator(KEYS_TOPIC, self._validate)
        sub = await node.subscribe(KEYS_TOPIC)
        node.chain.on_block.append(self._on_block)
        if self.key_manager:
            node.serve(
                KEYS_PROTOCOL,
                self._serve,
                max_request=MAX_KEY_REQUEST,
                max_response=MAX_KEY_RESPONSE,
                max_streams_per_peer=4,
            )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain, sub)
                task_status.started()
                tee = node.tee
                if tee is None:
                    return
                await tee.ready.wait()
                await node.chain.wait_for_height(1, timeout=float("inf"))
                if self.key_manager:
                    nursery.start_soon(self._keep_master)
                elif node.role.value == "miner":
                    nursery.start_soon(self._keep_epoch_keys)
        finally:
            sub.close()

    async def _drain(self, sub: Any) -> None:
        async for _ in sub:
            pass  # the validator records what it accepts

    def _on_block(self, block: Block) -> None:
        if block.height % self._node.chain.params.key_epoch_blocks == 0:
            self._epoch_changed.set()
            self._epoch_changed = trio.Event()
        if self.key_manager and self.has_master.is_set():
            self._gossip_revocations()

    def _enclave(self) -> tuple[Enclave, EnclaveInfo]:
        tee = self._node.tee
        if tee is None or tee.enclave is None or tee.info is None:
            raise UsageError("this node has no running enclave")
        return tee.enclave, tee.info

    async def _evidence(self) -> EnclaveEvidence:
        enclave, info = self._enclave()
        nonce = os.urandom(32)
        quote = await enclave.quote(nonce)
        return EnclaveEvidence(
            info.platform, quote, info.identity_pub, info.x25519_pub, nonce, info.limits
        )

    def _publish(self, obj: Any) -> None:
        self._node.start_soon(self._publish_now, obj)

    async def _publish_now(self, obj: Any) -> None:
        try:
            await self._node.publish(KEYS_TOPIC, encode(obj))
        except P2PError as err:
            logger.info("key gossip not sent: %s", err)

    # -- key managers ----------------------------------------------------------------------

    def _is_first_keeper(self) -> bool:
        genesis = self._node.chain.genesis
        first = min(key for key, _ in genesis.gatekeepers)
        return first == self._node.identity.public_key

    async def _keep_master(self) -> None:
        enclave, _ = self._enclave()
        self.status = await enclave.key_status()
        if self.status.master_floor is None:
            if self._is_first_keeper() and not self.clusters:
                cluster = await enclave.km_generate(self.epoch)
                logger.info("created the master key at epoch %d", cluster.epoch)
            else:
                await self._fetch("master")
        self.has_master.set()
        self._snapshot_miners()
        while True:
            await self._rotate()
            with trio.move_on_after(ANNOUNCE_INTERVAL):
                await self._epoch_changed.wait()

    async def _rotate(self) -> None:
        enclave, _ = self._enclave()
        epoch = self.epoch
        retention = self._node.chain.params.key_retention_epochs
        status = await enclave.key_status()
        if status.master_floor is not None and epoch - retention > status.master_floor:
            status = await enclave.erase_before(epoch - retention)
        self.status = status
        cluster = await enclave.cluster_public(epoch)
        self._record_cluster(cluster.epoch, cluster.public_key, "self")
        await self._publish_now(EpochAnnounce(cluster.epoch, cluster.public_key))

    async def _serve(self, peer: str, payload: bytes) -> bytes:
        request = decode(payload, max_size=MAX_KEY_REQUEST, expect=KeyRequest)
        if not self.has_master.is_set():
            raise UsageError("this key manager holds no master key yet")
        enclave, _ = self._enclave()
        state = self._node.chain.view.state
        evidence = request.evidence()
        if request.what == "master":
            if public_key_of(peer) not in state.gatekeepers():
                self._node.metrics.count("key_requests_refused", reason="not_a_gatekeeper")
                raise AttestationError("master keys go to active gatekeepers only")
            sealed = await enclave.km_export(evidence, self.epoch)
        else:
            record = miner_by_enclave(state, request.identity_pub)
            if record is None or record.status != MinerStatus.ACTIVE:
                self._node.metrics.count("key_requests_refused", reason="not_an_active_miner")
                raise AttestationError("epoch keys go to active registered miners only")
            if record.x25519_pub != request.x25519_pub:
                raise AttestationError("the evidence's keys are not the registered ones")
            if abs(request.epoch - self.epoch) > 1:
                raise UsageError(f"epoch {request.epoch} is not current ({self.epoch})")
            sealed = await enclave.km_share_epoch(request.epoch, evidence)
            cert = WorkerCert(
                request.epoch, record.identity_pub, record.x25519_pub, record.operator
            )
            self._record_cert(cert)
            self._publish(cert)
        self._node.metrics.count("keys_handed", what=request.what)
        return encode(KeyResponse(sealed))

    def _snapshot_miners(self) -> None:
        state = self._node.chain.view.state
        self._active_miners = {
            m.identity_pub for m in all_miners(state) if m.status == MinerStatus.ACTIVE
        }

    def _gossip_revocations(self) -> None:
        state = self._node.chain.view.state
        before = self._active_miners
        self._snapshot_miners()
        for identity in before - self._active_miners:
            record = next((m for m in all_miners(state) if m.identity_pub == identity), None)
            reason = record.reason if record is not None else "revoked"
            self.revoked[identity] = reason
            self._publish(WorkerRevoked(identity, reason[:128]))

    # -- fetching keys (key managers: the master; miners: epoch secrets) -------------------

    def key_managers(self) -> list[str]:
        """Connected peers that are active gatekeepers on chain."""
        return self._key_managers()

    def _key_managers(self) -> list[str]:
        state = self._node.chain.view.state
        keepers = state.gatekeepers()
        out = []
        for peer in self._node.peers():
            try:
                if public_key_of(peer) in keepers:
                    out.append(peer)
            except UsageError:
                continue
        return out

    async def request_key(self, peer: str, what: str, epoch: int = 0) -> None:
        """Ask key manager ``peer`` for the master or ``epoch``'s secret, sealed to our
        enclave, and hand it to the enclave. Raises the network's typed errors (a refusal
        comes back as RemoteError)."""
        enclave, _ = self._enclave()
        evidence = await self._evidence()
        limits = msgpack.packb(evidence.limits.canonical(), use_bin_type=True)
        request = KeyRequest(
            what,
            epoch,
            evidence.platform,
            evidence.quote,
            evidence.identity_pub,
            evidence.x25519_pub,
            evidence.nonce,
            limits,
        )
        raw = await self._node.request(
            peer, KEYS_PROTOCOL, encode(request), timeout=10, max_response=MAX_KEY_RESPONSE
        )
        sealed = decode(raw, max_size=MAX_KEY_RESPONSE, expect=KeyResponse).sealed
        if what == "master":
            await enclave.km_import(sealed)
        else:
            await enclave.accept_epoch(sealed)
        self._node.metrics.count("keys_received", what=what)

    async def _fetch(self, what: str, epoch: int = 0) -> None:
        delay = RETRY
        while True:
            now = trio.current_time()
            for peer in self._key_managers():
                if self._not_serving.get(peer, 0.0) > now:
                    continue
                try:
                    await self.request_key(peer, what, epoch)
                    return
                except ProtocolNotSupported as err:
                    # a gatekeeper without an enclave keeps no keys: not every retry asks it
                    self._not_serving[peer] = now + NOT_SERVING_S
                    if len(self._not_serving) > 1024:
                        self._not_serving = {p: t for p, t in self._not_serving.items() if t > now}
                    logger.debug("key request (%s) to %s failed: %s", what, peer, err)
                except (P2PError, ProtocolViolation) as err:
                    logger.debug("key request (%s) to %s failed: %s", what, peer, err)
            await trio.sleep(delay)  # nobody could answer yet: retry with backoff
            delay = min(delay * 2, 10.0)

    async def _keep_epoch_keys(self) -> None:
        enclave, info = self._enclave()
        while True:
            state = self._node.chain.view.state
            record = miner_by_enclave(state, info.identity_pub)
            epoch = self.epoch
            status = await enclave.key_status()
            if record is not None and record.status == MinerStatus.ACTIVE:
                if epoch not in status.epochs:
                    with trio.move_on_after(ANNOUNCE_INTERVAL * 2):
                        await self._fetch("epoch", epoch)
                retention = self._node.chain.params.key_retention_epochs
                if epoch - retention > status.epoch_floor:
                    status = await enclave.erase_before(epoch - retention)
            self.status = await enclave.key_status()
            # look again at the next block (registration and epochs move with the chain)
            with trio.move_on_after(ANNOUNCE_INTERVAL):
                await self._node.chain.wait_for_height(self._node.chain.head.height + 1)

    # -- gossip ----------------------------------------------------------------------------

    def _record_cluster(self, epoch: int, public_key: bytes, source: str) -> None:
        known = self.clusters.get(epoch)
        if known is not None and known.public_key != public_key:
            self._node.metrics.count("cluster_key_conflicts")
            logger.error("conflicting cluster keys for epoch %d (from %s)", epoch, source)
            return
        self.clusters[epoch] = ClusterKey(epoch, public_key)
        for old in [e for e in self.clusters if e < epoch - 8]:
            del self.clusters[old]

    def _record_cert(self, cert: WorkerCert) -> None:
        self.workers[cert.identity_pub] = cert
        while len(self.workers) > 4096:
            del self.workers[next(iter(self.workers))]

    def _validate(self, msg: GossipMessage) -> Validation:
        if msg.forwarder == self._node.peer_id and msg.sender == self._node.peer_id:
            return ACCEPT
        try:
            obj = decode(msg.data, max_size=MAX_KEY_GOSSIP)
        except ProtocolViolation as err:
            return Validation.reject(f"keys_{err.reason}")
        try:
            author = public_key_of(msg.sender)
        except UsageError:
            return Validation.reject("keys_bad_author")
        if author not in self._node.chain.view.state.gatekeepers():
            return Validation.ignore("keys_not_a_gatekeeper")  # maybe we lag the chain
        if isinstance(obj, EpochAnnounce):
            if len(obj.public_key) != 32 or obj.epoch < 0:
                return Validation.reject("keys_bad_announce")
            self._record_cluster(obj.epoch, obj.public_key, msg.sender)
        elif isinstance(obj, WorkerCert):
            self._record_cert(obj)
        elif isinstance(obj, WorkerRevoked):
            self.revoked[obj.identity_pub] = obj.reason
            self.workers.pop(obj.identity_pub, None)
        else:
            return Validation.reject("keys_wrong_kind")
        return ACCEPT
