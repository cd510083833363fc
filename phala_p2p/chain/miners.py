"""Miner registration on chain: attested enclaves, their operators, and revocation.

A miner registers its enclave with a ``MinerRegister`` transaction signed by its operator
account. The transaction carries a quote whose report data binds the enclave's public keys to
a nonce derived from the chain id and the operator (``registration_nonce``), so a quote made
for one operator cannot be registered by another, nor replayed on another chain. Every node
verifies the quote while executing the block, at the block's time, against the chain's own
policy: the attestation roots and allowed measurements in the state, the accepted DCAP TCB
statuses (``accept_tcb_mask``) and the maximum quote age (``attest_max_age_ms``).

A registered miner is revoked at the end of the block in which its measurement is revoked by
governance, its operator's stake falls below ``min_miner_stake``, or its operator is slashed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple

from phala_p2p.chain.registry import TxContext, register_end_block, register_tx_kind
from phala_p2p.chain.tx import TxRejectReason
from phala_p2p.errors import AttestationError, ProtocolViolation, TxRejected, UsageError
from phala_p2p.tee.dcap import MAX_COLLATERAL_CHARS, MAX_QUOTE_BYTES
from phala_p2p.tee.messages import AttestResponse
from phala_p2p.tee.policy import AttestationPolicy, verify_attestation
from phala_p2p.wire.codec import message

if TYPE_CHECKING:
    from phala_p2p.chain.ledger import LedgerState

MINERS = "miners"  # operator -> MinerRecord
ENCLAVES = "miner_enclaves"  # enclave identity_pub -> operator (active registrations)
SLASHED = "slashed"  # account -> height of its latest slash

# bit i of accept_tcb_mask accepts TCB_STATUSES[i]
TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)


class MinerStatus(StrEnum):
    ACTIVE = "active"
    REVOKED = "revoked"
    DEREGISTERED = "deregistered"


class MinerRecord(NamedTuple):
    operator: bytes
    identity_pub: bytes
    x25519_pub: bytes
    platform: str
    measurement: bytes
    registered_height: int
    status: str
    reason: str  # why it is revoked or deregistered ("" while active)


def registration_nonce(chain_id: str, operator: bytes) -> bytes:
    """The nonce a registration quote must bind: this chain and this operator."""
    if len(operator) != 32:
        raise UsageError("operator must be a 32-byte account")
    h = hashlib.blake2b(digest_size=32, person=b"phala/reg1")
    h.update(chain_id.encode())
    h.update(b"\x00")
    h.update(operator)
    return h.digest()


@message(122)
@dataclass(frozen=True)
class MinerRegister:
    """Register (or re-register) the sender's enclave. ``quote``'s report data must be
    ``make_report_data(identity_pub, x25519_pub, nonce=registration_nonce(chain, sender))``."""

    platform: str = field(metadata={"max_len": 8})
    quote: bytes = field(metadata={"max_len": MAX_QUOTE_BYTES})
    collateral: str = field(metadata={"max_len": MAX_COLLATERAL_CHARS})
    identity_pub: bytes = field(metadata={"max_len": 32})
    x25519_pub: bytes = field(metadata={"max_len": 32})

    def validate(self) -> None:
        if self.platform not in ("SIM", "SGX", "TDX"):
            raise ProtocolViolation(f"unknown TEE platform {self.platform!r}")
        if len(self.identity_pub) != 32 or len(self.x25519_pub) != 32:
            raise ProtocolViolation("enclave keys must be 32 bytes")
        if not self.quote:
            raise ProtocolViolation("a registration needs a quote")


@message(123)
@dataclass(frozen=True)
class MinerDeregister:
    """The sender stops offering its enclave."""

    reason: str = field(default="", metadata={"max_len": 128})


def policy_of(state: LedgerState) -> AttestationPolicy:
    """The attestation policy the chain applies now."""
    params = state.params
    statuses = frozenset(s for i, s in enumerate(TCB_STATUSES) if params.accept_tcb_mask & (1 << i))
    return AttestationPolicy(
        allowed_measurements=frozenset(state.allowed_measurements()),
        accepted_tcb_statuses=statuses,
        max_quote_age_s=params.attest_max_age_ms // 1000,
    )


def get_miner(state: LedgerState, operator: bytes) -> MinerRecord | None:
    value = state.table(MINERS).find(operator)
    return None if value is None else MinerRecord(*value)


def miner_by_enclave(state: LedgerState, identity_pub: bytes) -> MinerRecord | None:
    operator = state.table(ENCLAVES).find(identity_pub)
    return None if operator is None else get_miner(state, operator)


def all_miners(state: LedgerState) -> list[MinerRecord]:
    return [MinerRecord(*v) for _, v in state.table(MINERS).items()]


def note_slashed(state: LedgerState, account: bytes, height: int) -> None:
    """Called by every slashing rule: a slashed operator's miner is revoked."""
    state.table(SLASHED).set(account, height)


def _register(ctx: TxContext, body: MinerRegister) -> None:
    state = ctx.state
    params = state.params
    operator = ctx.sender
    if state.stake(operator) < params.min_miner_stake:
        raise TxRejected(
            f"a miner's operator needs {params.min_miner_stake} staked",
            reason=TxRejectReason.BELOW_MIN_STAKE,
        )
    holder = state.table(ENCLAVES).find(body.identity_pub)
    if holder is not None and holder != operator:
        raise TxRejected(
            "this enclave is registered by another operator", reason=TxRejectReason.NOT_AUTHORIZED
        )
    response = AttestResponse(
        body.platform, body.quote, body.collateral, body.identity_pub, body.x25519_pub
    )
    try:
        report = verify_attestation(
            response,
            nonce=registration_nonce(state.chain_id, operator),
            policy=policy_of(state),
            sim_roots=state.attestation_roots(),
            now=state.block_time_ms // 1000,
        )
    except (AttestationError, UsageError) as err:
        raise TxRejected(str(err), reason=TxRejectReason.ATTESTATION_FAILED) from err
    previous = get_miner(state, operator)
    if previous is not None and previous.identity_pub != body.identity_pub:
        state.table(ENCLAVES).delete(previous.identity_pub)
    record = MinerRecord(
        operator,
        body.identity_pub,
        body.x25519_pub,
        body.platform,
        report.measurement,
        ctx.height,
        str(MinerStatus.ACTIVE),
        "",
    )
    state.table(MINERS).set(operator, tuple(record))
    state.table(ENCLAVES).set(body.identity_pub, operator)


def _deregister(ctx: TxContext, body: MinerDeregister) -> None:
    state = ctx.state
    record = get_miner(state, ctx.sender)
    if record is None or record.status != MinerStatus.ACTIVE:
        raise TxRejected("no active miner for this account", reason=TxRejectReason.NOT_REGISTERED)
    _end(state, record, MinerStatus.DEREGISTERED, body.reason or "deregistered by its operator")


def _end(state: LedgerState, record: MinerRecord, status: MinerStatus, reason: str) -> None:
    state.table(MINERS).set(
        record.operator, tuple(record._replace(status=str(status), reason=reason))
    )
    state.table(ENCLAVES).delete(record.identity_pub)


def _revoke_invalid(state: LedgerState, height: int) -> None:
    """End-of-block: revoke miners that no longer meet the chain's rules."""
    miners = state.table(MINERS)
    if not len(miners):
        return
    allowed = set(state.allowed_measurements())
    minimum = state.params.min_miner_stake
    slashed = state.table(SLASHED)
    for _, value in list(miners.items()):
        record = MinerRecord(*value)
        if record.status != MinerStatus.ACTIVE:
            continue
        if record.measurement not in allowed:
            why = f"measurement {record.measurement.hex()[:16]} revoked"
        elif state.stake(record.operator) < minimum:
            why = "operator stake below min_miner_stake"
        elif slashed.get(record.operator, -1) >= record.registered_height:
            why = "operator slashed"
        else:
            continue
        _end(state, record, MinerStatus.REVOKED, why)


register_tx_kind(122, MinerRegister, _register, size_param="max_attest_tx_size")
register_tx_kind(123, MinerDeregister, _deregister)
register_end_block(30, "miners", _revoke_invalid)
