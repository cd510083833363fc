"""Tendermint consensus ("The latest gossip on BFT consensus", Buchman, Kwon, Milosevic 2018)
as a sans-IO machine.

The machine takes proposals, votes, committed blocks and the current time, and returns actions
for its driver to carry out in order. Quorums are stake-weighted: "2f+1" means more than 2/3
of the height's gatekeeper power, "f+1" more than 1/3. Rule numbers in comments refer to the
paper's Algorithm 1 (lines 22-67); protocols/consensus.md lists them all.

Crash safety: before any signature leaves the machine it returns ``PersistSigned`` with the
(height, round, step) it signed, its lock, and the signed message; the driver stores it durably
before carrying out the following ``Broadcast``. Built from that record after a restart, the
machine never signs a different message for a slot it signed before, never forgets a lock, and
can publish again what it had signed (others may need those messages to move on).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Protocol

from phala_p2p.chain.block import (
    Block,
    Commit,
    CommitSig,
    Proposal,
    Vote,
    VoteType,
    proposal_sign_bytes,
    vote_sign_bytes,
)
from phala_p2p.chain.evidence import DoubleSignEvidence
from phala_p2p.chain.params import ChainParams
from phala_p2p.chain.tx import Signer, Tx
from phala_p2p.chain.validators import ValidatorSet
from phala_p2p.chain.view import ChainView
from phala_p2p.chain.votes import NO_MAJORITY, VoteSet, majority
from phala_p2p.crypto.identity import verify_signature
from phala_p2p.errors import ProtocolViolation, UsageError


def consensus_message_limit(params: ChainParams) -> int:
    """Decode bound for a message on ``phala/consensus/1`` (a proposal carries a block)."""
    return params.max_block_bytes + 64 * 1024


class Step(IntEnum):
    PROPOSE = 0
    PREVOTE = 1
    PRECOMMIT = 2


@dataclass(frozen=True)
class SignedState:
    """What a gatekeeper last signed, and its lock at that moment (persist before sending)."""

    height: int
    round: int
    step: int
    sign_hash: bytes
    locked_round: int = -1
    locked_hash: bytes | None = None

    @property
    def hrs(self) -> tuple[int, int, int]:
        return (self.height, self.round, self.step)


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broadcast:
    """Publish ``msg`` on ``phala/consensus/1``."""

    msg: Proposal | Vote


@dataclass(frozen=True)
class ScheduleTimeout:
    """A timer was set for ``at``; ``next_deadline()`` is always the authoritative answer."""

    at: float


@dataclass(frozen=True)
class PersistSigned:
    """Store ``state`` and ``message`` durably (``BlockStore.save_signed``) BEFORE carrying out
    the Broadcast that follows. ``message`` is the signed message about to be broadcast; after
    a restart the machine needs it back (``own_messages``) to publish it again."""

    state: SignedState
    message: Proposal | Vote


@dataclass(frozen=True)
class CommitBlock:
    """``block`` is finalized by ``commit`` and applied to the view: store it, then announce."""

    block: Block
    commit: Commit


@dataclass(frozen=True)
class ReportEvidence:
    """A gatekeeper signed two conflicting votes: submit it in a ``SubmitEvidence`` tx."""

    evidence: DoubleSignEvidence


@dataclass(frozen=True)
class NeedSync:
    """Blocks up to at least ``height`` are finalized elsewhere: fetch them through sync from
    ``view.next_height`` and feed each to ``on_block_committed``."""

    height: int


Action = Broadcast | ScheduleTimeout | PersistSigned | CommitBlock | ReportEvidence | NeedSync


class TxSource(Protocol):
    """Where a proposer gets transactions (``Mempool`` fits)."""

    def reap(self, view: ChainView, max_txs: int) -> Sequence[Tx]: ...

    def update(self, view: ChainView) -> None: ...


@dataclass(frozen=True)
class ConsensusConfig:
    """Node-local knobs (the chain's timeouts are in ChainParams)."""

    rebroadcast_interval: float = 2.0  # re-send own current-round messages (gossip is lossy)
    # with transactions waiting, the round-0 proposer starts this long after the last block
    # instead of waiting out block_time (which then only paces empty blocks)
    min_block_interval: float = 0.05
    sync_after: float = 3.0  # behind for this long (seen height+1 traffic) -> NeedSync
    sync_retry: float = 2.0  # least seconds between two NeedSync for the same target
    round_window: int = 64  # votes further than this many rounds ahead only count for skips
    future_buffer: int = 256  # messages kept for the next height
    byzantine_double_sign: bool = False  # TESTS ONLY: sign a conflicting twin of every vote

    def __post_init__(self) -> None:
        for name in ("rebroadcast_interval", "sync_after", "sync_retry"):
            if not getattr(self, name) > 0:
                raise UsageError(f"ConsensusConfig.{name} must be > 0")
        if self.min_block_interval < 0:
            raise UsageError("ConsensusConfig.min_block_interval must be >= 0")
        if self.round_window < 1 or self.future_buffer < 0:
            raise UsageError("ConsensusConfig.round_window >= 1 and future_buffer >= 0")


@dataclass
class _Height:
    """Everything the machine knows about the height it is deciding."""

    height: int
    valset: ValidatorSet
    proposals: dict[int, Proposal] = field(default_factory=dict)
    blocks: dict[bytes, Block] = field(default_factory=dict)
    valid: dict[bytes, bool] = field(default_factory=dict)
    prevotes: dict[int, VoteSet] = field(default_factory=dict)
    precommits: dict[int, VoteSet] = field(default_factory=dict)
    max_round: dict[bytes, int] = field(default_factory=dict)
    prevote_timeout_rounds: set[int] = field(default_factory=set)
    precommit_timeout_rounds: set[int] = field(default_factory=set)
    rule5_rounds: set[int] = field(default_factory=set)

    def votes(self, vote_type: VoteType, round_: int) -> VoteSet:
        table = self.prevotes if vote_type == VoteType.PREVOTE else self.precommits
        vs = table.get(round_)
        if vs is None:
            vs = table[round_] = VoteSet()
        return vs


class Consensus:
    """One gatekeeper's consensus machine (or an observer's, if its key is not in the set)."""

    def __init__(
        self,
        view: ChainView,
        signer: Signer,
        *,
        mempool: TxSource | None = None,
        signed_state: SignedState | None = None,
        own_messages: Sequence[Proposal | Vote] = (),
        config: ConsensusConfig | None = None,
    ) -> None:
        self.view = view
        self.me = signer.public_key
        self._signer = signer
        self._mempool = mempool
        self.config = config or ConsensusConfig()
        self.last_signed = signed_state
        self._restored = tuple(own_messages)
        self.started = False
        self.round = 0
        self.step = Step.PROPOSE
        self.locked_round = -1
        self.locked_hash: bytes | None = None
        self.locked_block: Block | None = None
        self.valid_round = -1
        self.valid_block: Block | None = None
        self._h = _Height(view.next_height, view.validators)
        self._round_started = False
        self._start_at = 0.0
        self._entered_at = 0.0
        self._start_round = 0
        self._timeouts: dict[Step, tuple[float, int]] = {}
        self._rebroadcast_at: float | None = None
        self._future: list[tuple[Proposal | Vote, bool]] = []
        self._behind_since: float | None = None
        self._last_sync: tuple[int, float] | None = None
        self._evidence_sent: set[tuple[bytes, int, int, int]] = set()
        self._own: dict[tuple[int, int], Proposal | Vote] = {}  # (round, step) -> own message
        self.dropped_future = 0

    # -- public surface --------------------------------------------------------------------

    @property
    def height(self) -> int:
        return self._h.height

    @property
    def is_validator(self) -> bool:
        return self.me in self._h.valset

    def start(self, now: float) -> list[Action]:
        """Begin deciding ``view.next_height`` (at once, or at the restored round)."""
        if self.started:
            raise UsageError("consensus already started")
        self.started = True
        actions: list[Action] = []
        self._enter_height(now, 0.0, actions)
        ls = self.last_signed
        if ls is not None and ls.height == self.height:
            # restore the lock and resume in the round we last signed in
            self._start_round = self.round = ls.round
            self.locked_round = ls.locked_round
            self.locked_hash = ls.locked_hash
            for msg in self._restored:
                if msg.height == self.height:
                    self._keep_own(msg)
        self._rebroadcast_at = now + self.config.rebroadcast_interval
        self._on_timers(now, actions)
        self._evaluate(now, actions)
        return actions

    def next_deadline(self) -> float | None:
        """When ``on_timeout`` must next be called (None before ``start``)."""
        if not self.started:
            return None
        times = [at for at, _ in self._timeouts.values()]
        if not self._round_started:
            times.append(self._start_at)
        if self._rebroadcast_at is not None:
            times.append(self._rebroadcast_at)
        if self._behind_since is not None:
            times.append(self._behind_since + self.config.sync_after)
        return min(times) if times else None

    def on_timeout(self, now: float) -> list[Action]:
        """Fire every timer due at ``now``."""
        self._require_started()
        actions: list[Action] = []
        self._on_timers(now, actions)
        self._evaluate(now, actions)
        return actions

    def on_txs_available(self, now: float) -> list[Action]:
        """Transactions wait in the mempool. If this node proposes round 0 of the height and
        is still waiting out ``block_time``, it starts ``min_block_interval`` after the last
        block instead (the others start when its proposal arrives)."""
        self._require_started()
        actions: list[Action] = []
        if self._round_started or self._start_round != 0 or not self.is_validator:
            return actions
        if self.view.proposer(0) != self.me:
            return actions
        early = max(now, self._entered_at + self.config.min_block_interval)
        if early < self._start_at:
            self._start_at = early
            actions.append(ScheduleTimeout(early))
            self._on_timers(now, actions)
            self._evaluate(now, actions)
        return actions

    def on_message(self, msg: Proposal | Vote, now: float) -> list[Action]:
        if isinstance(msg, Proposal):
            return self.on_proposal(msg, now)
        return self.on_vote(msg, now)

    def on_proposal(self, p: Proposal, now: float) -> list[Action]:
        """A proposal from gossip. Raises ProtocolViolation if it is badly signed or not
        from the round's proposer; stale or duplicate proposals are ignored."""
        self._require_started()
        actions: list[Action] = []
        h = self._h
        if p.height < h.height:
            return actions
        if p.height > h.height:
            self._note_future(p, p.proposer, p.sign_bytes(self.view.chain_id), now, actions)
            return actions
        self._add_proposal(p, verified=False)
        if p.round == 0 and not self._round_started and self._start_round == 0:
            # the proposer started early (transactions were waiting): so do we
            self._start_at = min(self._start_at, now)
            self._on_timers(now, actions)
        self._evaluate(now, actions)
        return actions

    def on_vote(self, vote: Vote, now: float) -> list[Action]:
        """A prevote or precommit from gossip. Raises ProtocolViolation if it is badly signed
        or not from a gatekeeper of its height; stale or duplicate votes are ignored."""
        self._require_started()
        actions: list[Action] = []
        h = self._h
        if vote.height < h.height:
            return actions
        if vote.height > h.height:
            self._note_future(
                vote, vote.validator, vote.sign_bytes(self.view.chain_id), now, actions
            )
            return actions
        self._add_vote(vote, now, actions, verified=False)
        self._evaluate(now, actions)
        return actions

    def on_block_committed(self, block: Block, commit: Commit, now: float) -> list[Action]:
        """A finalized block from sync or block gossip. Verifies and applies it if it is the
        next height (ProtocolViolation if it is bad); other heights are ignored (a higher one
        asks for sync)."""
        self._require_started()
        actions: list[Action] = []
        if block.height <= self.view.height:
            return actions
        if block.height > self.view.next_height:
            self._need_sync(block.height, now, actions)
            return actions
        self.view.apply(block, commit)
        self._finalized(block, commit, now, actions)
        self._evaluate(now, actions)
        return actions

    def rebroadcast(self) -> list[Action]:
        """What to publish again, since gossip does not backfill: this node's own messages of
        the current and the previous round (a gatekeeper still in the previous round needs our
        precommit of it to move on), preceded by the prevotes that justify our valid value
        (without them others cannot accept its re-proposal)."""
        own = [
            Broadcast(msg)
            for (r, _), msg in sorted(self._own.items(), key=lambda kv: kv[0])
            if r >= self.round - 1
        ]
        return self._pol_broadcasts() + own

    def _pol_broadcasts(self) -> list[Action]:
        block = self.valid_block
        vs = self._h.prevotes.get(self.valid_round)
        if block is None or vs is None:
            return []
        return [Broadcast(v) for v in vs.votes_for(block.hash) if v.validator != self.me]

    # -- heights, rounds and timers --------------------------------------------------------

    def _require_started(self) -> None:
        if not self.started:
            raise UsageError("call start(now) first")

    def _enter_height(self, now: float, delay: float, actions: list[Action]) -> None:
        self._h = _Height(self.view.next_height, self.view.validators)
        self.round = 0
        self.step = Step.PROPOSE
        self.locked_round, self.locked_hash, self.locked_block = -1, None, None
        self.valid_round, self.valid_block = -1, None
        self._round_started = False
        self._start_round = 0
        self._start_at = now + delay
        self._entered_at = now
        if self._rebroadcast_at is not None:
            # re-send only when a height takes longer than the interval
            self._rebroadcast_at = self._start_at + self.config.rebroadcast_interval
        self._timeouts.clear()
        self._own.clear()
        self._behind_since = None
        self._evidence_sent = {k for k in self._evidence_sent if k[1] >= self._h.height - 1}
        if delay > 0:
            actions.append(ScheduleTimeout(self._start_at))
        future, self._future = self._future, []
        for msg, verified in future:
            self._replay(msg, verified, now, actions)

    def _replay(
        self, msg: Proposal | Vote, verified: bool, now: float, actions: list[Action]
    ) -> None:
        h = self._h
        if msg.height != h.height:
            if msg.height > h.height:
                self._future.append((msg, verified))
            return
        try:
            if isinstance(msg, Vote):
                self._add_vote(msg, now, actions, verified=verified)
            else:
                self._add_proposal(msg, verified=verified)
        except ProtocolViolation:
            pass  # buffered before its signer's set was known; simply dropped

    def _schedule(self, kind: Step, at: float, actions: list[Action]) -> None:
        self._timeouts[kind] = (at, self.round)
        actions.append(ScheduleTimeout(at))

    def _on_timers(self, now: float, actions: list[Action]) -> None:
        if not self._round_started and now >= self._start_at:
            self._start_round_at(self._start_round, now, actions)
        for kind in (Step.PROPOSE, Step.PREVOTE, Step.PRECOMMIT):
            entry = self._timeouts.get(kind)
            if entry is None or entry[0] > now:
                continue
            del self._timeouts[kind]
            _, round_ = entry
            if round_ != self.round:
                continue
            if kind == Step.PROPOSE and self.step == Step.PROPOSE:  # OnTimeoutPropose
                self._vote(VoteType.PREVOTE, None, now, actions)
                self.step = Step.PREVOTE
            elif kind == Step.PREVOTE and self.step == Step.PREVOTE:  # OnTimeoutPrevote
                self._vote(VoteType.PRECOMMIT, None, now, actions)
                self.step = Step.PRECOMMIT
            elif kind == Step.PRECOMMIT:  # OnTimeoutPrecommit
                self._start_round_at(self.round + 1, now, actions)
            self._evaluate(now, actions)
        if self._rebroadcast_at is not None and now >= self._rebroadcast_at:
            actions += self.rebroadcast()
            self._rebroadcast_at = now + self.config.rebroadcast_interval
            actions.append(ScheduleTimeout(self._rebroadcast_at))
        if self._behind_since is not None and now >= self._behind_since + self.config.sync_after:
            self._behind_since = now
            self._need_sync(self.height, now, actions)

    def _start_round_at(self, round_: int, now: float, actions: list[Action]) -> None:
        """StartRound (lines 11-21)."""
        self._round_started = True
        self.round = round_
        self.step = Step.PROPOSE
        self._schedule(Step.PROPOSE, now + self.view.params.timeout_propose(round_), actions)
        if self.is_validator and self.view.proposer(round_) == self.me:
            self._propose(now, actions)

    def _propose(self, now: float, actions: list[Action]) -> None:
        h = self._h
        if self.valid_block is not None:
            block, pol_round = self.valid_block, self.valid_round
        else:
            txs: Sequence[Tx] = ()
            if self._mempool is not None:
                txs = self._mempool.reap(self.view, self.view.params.max_block_txs)
            block = self.view.build_block(
                txs, proposer=self.me, round_=self.round, time_ms=int(now * 1000)
            )
            pol_round = -1
        if pol_round >= 0:  # relay the polka first, so that others can accept the re-proposal
            actions += self._pol_broadcasts()
        sb = proposal_sign_bytes(self.view.chain_id, h.height, self.round, pol_round, block.hash)
        state = self._may_sign(self.round, Step.PROPOSE, sb)
        if state is None:
            return
        p = Proposal(h.height, self.round, pol_round, block, self.me, self._signer.sign(sb))
        self._keep_own(p)
        h.valid.setdefault(block.hash, True)
        actions += [PersistSigned(state, p), Broadcast(p)]

    # -- signing ---------------------------------------------------------------------------

    def _may_sign(self, round_: int, step: Step, sign_bytes: bytes) -> SignedState | None:
        """The new signing record, or None if signing could conflict with an earlier one."""
        digest = hashlib.sha256(sign_bytes).digest()
        hrs = (self.height, round_, int(step))
        ls = self.last_signed
        if ls is not None and (hrs < ls.hrs or (hrs == ls.hrs and digest != ls.sign_hash)):
            return None
        state = SignedState(*hrs, digest, self.locked_round, self.locked_hash)
        self.last_signed = state
        return state

    def _keep_own(self, msg: Proposal | Vote) -> None:
        """Count an own message as received, and remember it for rebroadcast."""
        h = self._h
        if isinstance(msg, Proposal):
            h.proposals.setdefault(msg.round, msg)
            h.blocks.setdefault(msg.block.hash, msg.block)
            self._own[(msg.round, Step.PROPOSE)] = msg
        else:
            vs = h.votes(msg.vote_type, msg.round)
            if msg.validator not in vs.votes:
                vs.add(msg, h.valset.power(self.me))
            step = Step.PREVOTE if msg.vote_type == VoteType.PREVOTE else Step.PRECOMMIT
            self._own[(msg.round, step)] = msg

    def _vote(
        self, vote_type: VoteType, block_hash: bytes | None, now: float, actions: list[Action]
    ) -> None:
        if not self.is_validator:
            return
        chain_id = self.view.chain_id
        sb = vote_sign_bytes(chain_id, vote_type, self.height, self.round, block_hash)
        step = Step.PREVOTE if vote_type == VoteType.PREVOTE else Step.PRECOMMIT
        state = self._may_sign(self.round, step, sb)
        if state is None:
            return
        vote = Vote(vote_type, self.height, self.round, block_hash, self.me, self._signer.sign(sb))
        self._keep_own(vote)
        actions += [PersistSigned(state, vote), Broadcast(vote)]
        if self.config.byzantine_double_sign:
            twin = hashlib.sha256(b"conflict" + (block_hash or b"")).digest()
            other = None if block_hash is not None else twin
            sb2 = vote_sign_bytes(chain_id, vote_type, self.height, self.round, other)
            sig2 = self._signer.sign(sb2)
            actions.append(
                Broadcast(Vote(vote_type, self.height, self.round, other, self.me, sig2))
            )

    # -- incoming votes --------------------------------------------------------------------

    def _note_round(self, validator: bytes, round_: int) -> None:
        mr = self._h.max_round
        if round_ > mr.get(validator, -1):
            mr[validator] = round_

    def _add_proposal(self, p: Proposal, *, verified: bool) -> None:
        h = self._h
        if p.proposer not in h.valset:
            raise ProtocolViolation("proposal from a non-gatekeeper", reason="wrong_proposer")
        near = p.round <= self.round + self.config.round_window
        if near and p.proposer != self.view.proposer(p.round):
            raise ProtocolViolation(
                "proposal not from the round's proposer", reason="wrong_proposer"
            )
        known = h.proposals.get(p.round)
        if known is not None and known.signature == p.signature:
            return
        if not verified and not p.verify(self.view.chain_id):
            raise ProtocolViolation("bad proposal signature", reason="bad_signature")
        self._note_round(p.proposer, p.round)
        if near and known is None:  # a second, different proposal of the round is ignored
            h.proposals[p.round] = p
            h.blocks.setdefault(p.block.hash, p.block)

    def _add_vote(self, vote: Vote, now: float, actions: list[Action], *, verified: bool) -> None:
        h = self._h
        power = h.valset.power(vote.validator)
        if power == 0:
            raise ProtocolViolation("vote from a non-gatekeeper", reason="unknown_validator")
        table = h.prevotes if vote.vote_type == VoteType.PREVOTE else h.precommits
        vs = table.get(vote.round)
        if vs is not None and vs.has(vote.validator, vote.block_hash):
            return  # a duplicate (signatures are deterministic)
        if not verified and not vote.verify(self.view.chain_id):
            raise ProtocolViolation("bad vote signature", reason="bad_signature")
        self._note_round(vote.validator, vote.round)
        if vote.round > self.round + self.config.round_window:
            return  # counts for round skips only
        vs = h.votes(vote.vote_type, vote.round)
        existing = vs.votes.get(vote.validator)
        if existing is None:
            vs.add(vote, power)
            return
        ev = DoubleSignEvidence.of(existing, vote)
        if ev.key not in self._evidence_sent:
            self._evidence_sent.add(ev.key)
            actions.append(ReportEvidence(ev))
        vs.add_conflicting(vote, power, proposed=vote.block_hash in h.blocks)

    def _note_future(
        self,
        msg: Proposal | Vote,
        signer: bytes,
        sign_bytes: bytes,
        now: float,
        actions: list[Action],
    ) -> None:
        """A message for a later height: keep next-height ones, notice that we are behind."""
        verified = signer in self._h.valset and verify_signature(signer, sign_bytes, msg.signature)
        if msg.height == self.height + 1:
            if len(self._future) < self.config.future_buffer:
                self._future.append((msg, verified))
            else:
                self.dropped_future += 1
            if verified and self._behind_since is None:
                self._behind_since = now
                actions.append(ScheduleTimeout(now + self.config.sync_after))
        elif verified:
            self._need_sync(msg.height - 1, now, actions)

    def _need_sync(self, target: int, now: float, actions: list[Action]) -> None:
        last = self._last_sync
        if last is not None and target <= last[0] and now - last[1] < self.config.sync_retry:
            return
        self._last_sync = (target, now)
        actions.append(NeedSync(target))

    # -- the rules -------------------------------------------------------------------------

    def _valid(self, block: Block) -> bool:
        """The paper's valid(v): deterministic (header, execution, state root)."""
        cache = self._h.valid
        known = cache.get(block.hash)
        if known is None:
            known = cache[block.hash] = self.view.check_block(block) is None
        return known

    def _timely(self, block: Block, now: float) -> bool:
        """Prevote-only check that the proposer's clock is not too far ahead of ours."""
        return block.header.time_ms <= int(now * 1000) + self.view.params.max_clock_drift_ms

    def _skip_target(self) -> int:
        """Highest round R such that gatekeepers seen at rounds >= R hold > 1/3 power."""
        valset = self._h.valset
        acc = 0
        for round_, power in sorted(
            ((r, valset.power(v)) for v, r in self._h.max_round.items()), reverse=True
        ):
            acc += power
            if valset.has_one_third(acc):
                return round_
        return -1

    def _evaluate(self, now: float, actions: list[Action]) -> None:
        while self._rule_fired(now, actions):
            pass

    def _rule_fired(self, now: float, actions: list[Action]) -> bool:
        h = self._h
        valset = h.valset
        # line 49: 2f+1 precommits for v in any round, with v known and valid -> decide
        for round_, vs in sorted(h.precommits.items()):
            target = majority(vs, valset)
            if target is NO_MAJORITY or target is None:
                continue
            block = h.blocks.get(target)
            if block is None:
                if self._behind_since is None:
                    self._behind_since = now
                    actions.append(ScheduleTimeout(now + self.config.sync_after))
                continue
            if self._valid(block):
                self._decide(block, round_, vs, now, actions)
                return True
        # line 55: f+1 messages from a higher round -> skip to it
        skip = self._skip_target()
        if skip > self.round:
            self._start_round_at(skip, now, actions)
            return True
        if not self._round_started:
            return False
        r = self.round
        if self.step == Step.PROPOSE:
            p = h.proposals.get(r)
            if p is not None:
                v = p.block
                vid = v.hash
                if p.pol_round == -1:  # line 22
                    ok = self._valid(v) and self._timely(v, now)
                    ok = ok and (self.locked_round == -1 or self.locked_hash == vid)
                    self._vote(VoteType.PREVOTE, vid if ok else None, now, actions)
                    self.step = Step.PREVOTE
                    return True
                if majority(h.prevotes.get(p.pol_round), valset) == vid:  # line 28
                    ok = self._valid(v) and self._timely(v, now)
                    ok = ok and (self.locked_round <= p.pol_round or self.locked_hash == vid)
                    self._vote(VoteType.PREVOTE, vid if ok else None, now, actions)
                    self.step = Step.PREVOTE
                    return True
        prevotes = h.prevotes.get(r)
        # line 34: 2f+1 prevotes of any kind -> timeoutPrevote, once per round
        if (
            self.step == Step.PREVOTE
            and r not in h.prevote_timeout_rounds
            and prevotes is not None
            and valset.has_two_thirds(prevotes.power)
        ):
            h.prevote_timeout_rounds.add(r)
            self._schedule(Step.PREVOTE, now + self.view.params.timeout_prevote(r), actions)
        polka = majority(prevotes, valset)
        # line 36: 2f+1 prevotes for a known valid v while step >= prevote, first time
        if (
            self.step >= Step.PREVOTE
            and r not in h.rule5_rounds
            and polka not in (NO_MAJORITY, None)
        ):
            assert polka is not None
            block = h.blocks.get(polka)
            if block is not None and self._valid(block):
                h.rule5_rounds.add(r)
                if self.step == Step.PREVOTE:
                    self.locked_round, self.locked_hash, self.locked_block = r, polka, block
                    self._vote(VoteType.PRECOMMIT, polka, now, actions)
                    self.step = Step.PRECOMMIT
                self.valid_round, self.valid_block = r, block
                return True
        # line 44: 2f+1 prevotes for nil -> precommit nil
        if self.step == Step.PREVOTE and polka is None:
            self._vote(VoteType.PRECOMMIT, None, now, actions)
            self.step = Step.PRECOMMIT
            return True
        # line 47: 2f+1 precommits of any kind -> timeoutPrecommit, once per round
        precommits = h.precommits.get(r)
        if (
            r not in h.precommit_timeout_rounds
            and precommits is not None
            and valset.has_two_thirds(precommits.power)
        ):
            h.precommit_timeout_rounds.add(r)
            self._schedule(Step.PRECOMMIT, now + self.view.params.timeout_precommit(r), actions)
        return False

    def _decide(
        self, block: Block, round_: int, vs: VoteSet, now: float, actions: list[Action]
    ) -> None:
        sigs = tuple(CommitSig(v.validator, v.signature) for v in vs.votes_for(block.hash))
        commit = Commit(block.height, round_, block.hash, sigs)
        self.view.apply(block, commit, verified=True)
        self._finalized(block, commit, now, actions)

    def _finalized(self, block: Block, commit: Commit, now: float, actions: list[Action]) -> None:
        actions.append(CommitBlock(block, commit))
        if self._mempool is not None:
            self._mempool.update(self.view)
        self._enter_height(now, self.view.params.block_time_ms / 1000, actions)
