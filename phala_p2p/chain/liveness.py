"""Miner liveness: heartbeat challenges chosen by the chain, answered by the enclaves.

At the end of every block ``h`` the chain draws a seed from the block (its height and the
state root after its transactions) and challenges a deterministic random subset of the
*active* registered miners: each with probability ``heartbeat_challenge_ppm``, at most
``heartbeat_max_challenges`` of them. A challenged miner's enclave answers with a
``MinerHeartbeat`` signed by its identity key over the chain id, ``h``, the seed and its key,
included in one of the blocks ``h+1 .. h+heartbeat_window_blocks`` (the seed is unknown
before block ``h``, so no answer can be made in advance). At the end of the window's last
block, every challenged miner that did not answer, and is still the same active
registration, has its operator's stake slashed by ``heartbeat_slash_ppm`` and a miss counted;
``heartbeat_max_misses`` misses in a row revoke it (through ``miners.note_slashed``). An
answer resets the count.

Everything is a pure function of the state and the block, so every gatekeeper agrees; the
work of a block is bounded by the challenges it makes and the challenges that fall due in it.
Rules: protocols/settlement.md.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, NamedTuple

from phala_p2p.chain import miners
from phala_p2p.chain.params import PPM
from phala_p2p.chain.registry import TxContext, register_end_block, register_tx_kind
from phala_p2p.chain.staking import slash_stake
from phala_p2p.chain.tables import pack
from phala_p2p.chain.tx import MAX_U63, Signer, TxRejectReason
from phala_p2p.crypto.identity import verify_signature
from phala_p2p.errors import ProtocolViolation, TxRejected, UsageError
from phala_p2p.wire.codec import message

if TYPE_CHECKING:
    from phala_p2p.chain.ledger import LedgerState

HEARTBEAT_DOMAIN: Final = b"phala/chain/heartbeat/v1\x00"
_SEED_PERSON: Final = b"phala/hb-seed1"
_DRAW_PERSON: Final = b"phala/hb-draw1"

CHALLENGES = "heartbeat_challenges"  # challenge height -> (due height, seed, (enclave, ...))
DUE = "heartbeat_due"  # due height -> (challenge height, ...)
PENDING = "heartbeat_pending"  # (challenge height, enclave) -> operator, until answered
MISSES = "heartbeat_misses"  # enclave -> (misses in a row, misses in all)


class Challenge(NamedTuple):
    height: int  # the block whose end made it
    due_height: int  # the last block that may carry an answer
    seed: bytes
    enclaves: tuple[bytes, ...]  # the challenged miners' identity keys, ascending


def challenge_seed(chain_id: str, height: int, state_root: bytes) -> bytes:
    """The seed of block ``height``: BLAKE2b-256 of the chain, height and the state root
    after the block's transactions (and the end-of-block work before the challenge)."""
    h = hashlib.blake2b(digest_size=32, person=_SEED_PERSON)
    h.update(pack([chain_id, height, state_root]))
    return h.digest()


def _draw(seed: bytes, index: int) -> int:
    h = hashlib.blake2b(digest_size=16, person=_DRAW_PERSON)
    h.update(seed)
    h.update(index.to_bytes(8, "big"))
    return int.from_bytes(h.digest(), "big")


def select_challenged(
    seed: bytes, active: Sequence[bytes], chance_ppm: int, most: int
) -> tuple[bytes, ...]:
    """The miners of ``active`` (in canonical order) challenged under ``seed``.

    ``k`` miners are drawn without replacement, where ``k`` is ``len(active) * chance_ppm /
    10^6`` rounded down or up at random (so each miner's chance is ``chance_ppm``), capped at
    ``most``. Work is O(k): a partial Fisher-Yates shuffle. Returns them in ascending order.
    """
    n = len(active)
    if n == 0 or chance_ppm <= 0 or most <= 0:
        return ()
    expected = n * chance_ppm
    k = expected // PPM
    if _draw(seed, 0) % PPM < expected % PPM:
        k += 1
    k = min(k, most, n)
    moved: dict[int, int] = {}  # position -> index of the miner now there
    chosen = []
    for i in range(k):
        j = i + _draw(seed, i + 1) % (n - i)
        at_j = moved.get(j, j)
        moved[j] = moved.get(i, i)
        chosen.append(active[at_j])
    return tuple(sorted(chosen))


def heartbeat_sign_bytes(chain_id: str, height: int, seed: bytes, enclave: bytes) -> bytes:
    """What the enclave signs to answer the challenge of block ``height``."""
    return HEARTBEAT_DOMAIN + pack([chain_id, height, seed, enclave])


@message(127)
@dataclass(frozen=True)
class MinerHeartbeat:
    """An enclave's answer to the challenge made at the end of block ``challenge_height``.
    Any account may submit it (the operator's, usually); the enclave's signature is what
    counts."""

    enclave: bytes = field(metadata={"max_len": 32})
    challenge_height: int = field(metadata={"min": 1, "max": MAX_U63})
    signature: bytes = field(metadata={"max_len": 64})

    def validate(self) -> None:
        if len(self.enclave) != 32 or len(self.signature) != 64:
            raise ProtocolViolation("heartbeat: enclave is 32 bytes, signature 64")

    @classmethod
    def answer(cls, enclave: Signer, *, chain_id: str, challenge: Challenge) -> MinerHeartbeat:
        """The heartbeat ``enclave`` signs for ``challenge`` (UsageError if not challenged)."""
        key = enclave.public_key
        if key not in challenge.enclaves:
            raise UsageError("this enclave was not challenged")
        sig = enclave.sign(heartbeat_sign_bytes(chain_id, challenge.height, challenge.seed, key))
        return cls(key, challenge.height, sig)


# -- reads -------------------------------------------------------------------------------------


def challenge_at(state: LedgerState, height: int) -> Challenge | None:
    """The challenge made at the end of block ``height``, while its window is open."""
    value = state.table(CHALLENGES).find(height)
    if value is None:
        return None
    due, seed, enclaves = value
    return Challenge(height, due, seed, tuple(enclaves))


def awaiting(state: LedgerState, height: int, enclave: bytes) -> bool:
    """Whether ``enclave`` was challenged at ``height`` and has not answered yet."""
    return (height, enclave) in state.table(PENDING)


def misses_of(state: LedgerState, enclave: bytes) -> tuple[int, int]:
    """(misses in a row, misses in all) of ``enclave``."""
    value = state.table(MISSES).find(enclave)
    return (0, 0) if value is None else (value[0], value[1])


# the active enclaves in canonical order, recomputed only when the registry changes
_ACTIVE: weakref.WeakKeyDictionary[LedgerState, tuple[int, tuple[bytes, ...]]] = (
    weakref.WeakKeyDictionary()
)


def active_enclaves(state: LedgerState) -> tuple[bytes, ...]:
    """Identity keys of the active miners, ascending (``miners.ENCLAVES`` holds only those)."""
    table = state.table(miners.ENCLAVES)
    cached = _ACTIVE.get(state)
    if cached is not None and cached[0] == table.version:
        return cached[1]
    keys = tuple(table.keys())
    _ACTIVE[state] = (table.version, keys)
    return keys


# -- rules -------------------------------------------------------------------------------------


def _heartbeat(ctx: TxContext, body: MinerHeartbeat) -> None:
    state = ctx.state
    h = body.challenge_height
    challenge = challenge_at(state, h)
    if challenge is None:
        if h < ctx.height:
            raise TxRejected(
                f"no open challenge at height {h}", reason=TxRejectReason.CHALLENGE_CLOSED
            )
        raise TxRejected(f"no challenge at height {h} yet", reason=TxRejectReason.NOT_CHALLENGED)
    if ctx.height > challenge.due_height:
        raise TxRejected(
            f"the window closed at {challenge.due_height}", reason=TxRejectReason.CHALLENGE_CLOSED
        )
    if body.enclave not in challenge.enclaves:
        raise TxRejected(
            f"enclave not challenged at height {h}", reason=TxRejectReason.NOT_CHALLENGED
        )
    pending = state.table(PENDING)
    if (h, body.enclave) not in pending:
        raise TxRejected("already answered", reason=TxRejectReason.ALREADY_ANSWERED)
    signed = heartbeat_sign_bytes(state.chain_id, h, challenge.seed, body.enclave)
    if not verify_signature(body.enclave, signed, body.signature):
        raise TxRejected("not signed by the enclave", reason=TxRejectReason.BAD_SIGNATURE)
    pending.delete((h, body.enclave))
    in_row, total = misses_of(state, body.enclave)
    if in_row:
        state.table(MISSES).set(body.enclave, (0, total))


def _missed(state: LedgerState, record: miners.MinerRecord, challenge: int, height: int) -> None:
    params = state.params
    token = state.checkpoint()
    slashed = slash_stake(
        state, record.operator, params.heartbeat_slash_ppm, since_height=challenge
    )
    if slashed and len(state.gatekeepers()) == 0:
        state.rollback(token)  # never slash the last active gatekeeper out of the set
    else:
        state.release(token)
    in_row, total = misses_of(state, record.identity_pub)
    in_row, total = in_row + 1, total + 1
    if in_row >= params.heartbeat_max_misses:
        miners.note_slashed(state, record.operator, height)  # revoked by the miners' hook
        in_row = 0
    state.table(MISSES).set(record.identity_pub, (in_row, total))


def _close_due(state: LedgerState, height: int) -> None:
    """End of block (order 25): judge the challenges whose window ends with this block."""
    due = state.table(DUE)
    heights = due.find(height)
    if heights is None:
        return
    challenges = state.table(CHALLENGES)
    pending = state.table(PENDING)
    for h in heights:
        challenge = challenge_at(state, h)
        if challenge is None:
            continue
        for enclave in challenge.enclaves:
            operator = pending.find((h, enclave))
            if operator is None:
                continue  # answered
            pending.delete((h, enclave))
            record = miners.get_miner(state, operator)
            if (
                record is None
                or record.identity_pub != enclave
                or record.status != miners.MinerStatus.ACTIVE
                or record.registered_height > h
            ):
                continue  # not the registration that was challenged any more
            _missed(state, record, h, height)
        challenges.delete(h)
    due.delete(height)


def _challenge(state: LedgerState, height: int) -> None:
    """End of block (order 40, after revocations): challenge some active miners."""
    params = state.params
    if params.heartbeat_challenge_ppm == 0 or params.heartbeat_max_challenges == 0:
        return
    active = active_enclaves(state)
    if not active:
        return
    seed = challenge_seed(state.chain_id, height, state.state_root())
    chosen = select_challenged(
        seed, active, params.heartbeat_challenge_ppm, params.heartbeat_max_challenges
    )
    if not chosen:
        return
    due_height = height + params.heartbeat_window_blocks
    state.table(CHALLENGES).set(height, (due_height, seed, chosen))
    due = state.table(DUE)
    due.set(due_height, (*due.get(due_height, ()), height))
    pending = state.table(PENDING)
    operators = state.table(miners.ENCLAVES)
    for enclave in chosen:
        pending.set((height, enclave), operators.find(enclave))


register_tx_kind(127, MinerHeartbeat, _heartbeat)
register_end_block(25, "heartbeat_misses", _close_due)
register_end_block(40, "heartbeat_challenges", _challenge)
