"""A node's view of the finalized chain: head, ledger state, gatekeeper set, proposer order.

Every role follows the chain through a ``ChainView``: the consensus machine decides blocks
into it, a follower feeds it blocks from gossip or sync. A block is applied only if its header
extends the head, its commit certificate has > 2/3 of the known gatekeeper set's power, every
transaction applies, and the resulting state root is the header's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from phala_p2p.chain.block import Block, BlockHeader, Commit, txs_root, verify_commit
from phala_p2p.chain.ledger import LedgerState
from phala_p2p.chain.params import ChainParams, Genesis
from phala_p2p.chain.tx import Tx, TxResult
from phala_p2p.chain.validators import ProposerSchedule, ValidatorSet
from phala_p2p.errors import ProtocolViolation, UsageError


def _bad(msg: str) -> ProtocolViolation:
    return ProtocolViolation(msg, reason="bad_block")


class ChainView:
    """The finalized head and the state after it; knows the set that signs the next block."""

    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.state = LedgerState.from_genesis(genesis)
        self.height = 0
        self.head_hash = genesis.genesis_hash
        self.head_time_ms = genesis.genesis_time_ms
        self.head: BlockHeader | None = None
        self.validators: ValidatorSet = self.state.gatekeepers()
        self.schedule = ProposerSchedule.initial(self.validators)

    @classmethod
    def replay(cls, genesis: Genesis, blocks: Iterable[tuple[Block, Commit]]) -> ChainView:
        """Rebuild the view from stored blocks (trusted: commits are not re-verified)."""
        view = cls(genesis)
        for block, commit in blocks:
            view.apply(block, commit, verified=True)
        return view

    @property
    def params(self) -> ChainParams:
        return self.state.params

    @property
    def next_height(self) -> int:
        return self.height + 1

    def proposer(self, round_: int) -> bytes:
        """The proposer of (next_height, round_)."""
        return self.schedule.proposer(round_)

    # -- checks ---------------------------------------------------------------------------

    def check_header(self, block: Block) -> None:
        """Everything about ``block`` that needs no execution; raises ProtocolViolation."""
        h = block.header
        params = self.params
        if h.chain_id != self.chain_id:
            raise _bad("block of another chain")
        if h.height != self.height + 1:
            raise _bad(f"block height {h.height}, expected {self.height + 1}")
        if h.parent_hash != self.head_hash:
            raise _bad("block does not extend the head")
        if h.time_ms <= self.head_time_ms:
            raise _bad("block time does not increase")
        if h.proposer not in self.validators:
            raise _bad("block proposer is not a gatekeeper")
        if h.validators_hash != self.validators.hash:
            raise _bad("block names another gatekeeper set")
        if len(block.txs) > params.max_block_txs:
            raise _bad("too many transactions")
        if sum(tx.size for tx in block.txs) > params.max_block_bytes:
            raise _bad("block too large")
        if not block.txs_match_root():
            raise _bad("transactions do not match the header's root")

    def _execute(self, block: Block) -> list[TxResult]:
        """Apply the block's transactions and end-block work; state is left changed."""
        height = block.height
        self.state.block_time_ms = block.header.time_ms
        results = []
        for tx in block.txs:
            result = self.state.apply_tx(tx, height)
            if not result.ok:
                raise _bad(f"transaction {tx.id.hex()[:16]} rejected: {result.reason}")
            results.append(result)
        self.state.end_block(height)
        if self.state.state_root() != block.header.state_root:
            raise _bad("state root mismatch")
        return results

    def check_block(self, block: Block) -> ProtocolViolation | None:
        """Validity of a proposed next block (executes it and undoes it); None when valid."""
        try:
            self.check_header(block)
        except ProtocolViolation as err:
            return err
        token = self.state.checkpoint()
        try:
            self._execute(block)
        except ProtocolViolation as err:
            return err
        finally:
            self.state.rollback(token)
        return None

    # -- moving the head ------------------------------------------------------------------

    def apply(self, block: Block, commit: Commit, *, verified: bool = False) -> list[TxResult]:
        """Make ``block`` the new head. ``verified`` skips the commit's signature checks
        (for commits the caller assembled from votes it verified, or read from its own store).
        """
        self.check_header(block)
        if verified:
            if commit.height != block.height or commit.block_hash != block.hash:
                raise ProtocolViolation("commit is for another block", reason="bad_commit")
        else:
            verify_commit(self.chain_id, block, commit, self.validators, light=True)
        token = self.state.checkpoint()
        applied = False
        try:
            results = self._execute(block)
            applied = True
        finally:
            if applied:
                self.state.release(token)
            else:
                self.state.rollback(token)
        self.height = block.height
        self.head_hash = block.hash
        self.head_time_ms = block.header.time_ms
        self.head = block.header
        new_set = self.state.gatekeepers()
        self.schedule = self.schedule.next_height(new_set)
        self.validators = new_set
        return results

    def build_block(
        self, candidates: Sequence[Tx], *, proposer: bytes, round_: int, time_ms: int
    ) -> Block:
        """A valid next block from the candidates that apply, in order (others skipped)."""
        if proposer not in self.validators:
            raise UsageError("only a gatekeeper proposes")
        height = self.height + 1
        params = self.params
        included: list[Tx] = []
        size = 0
        time_ms = max(time_ms, self.head_time_ms + 1)
        self.state.block_time_ms = time_ms
        token = self.state.checkpoint()
        try:
            for tx in candidates:
                if len(included) >= params.max_block_txs:
                    break
                if size + tx.size > params.max_block_bytes:
                    continue
                if self.state.apply_tx(tx, height).ok:
                    included.append(tx)
                    size += tx.size
            self.state.end_block(height)
            root = self.state.state_root()
        finally:
            self.state.rollback(token)
        header = BlockHeader(
            chain_id=self.chain_id,
            height=height,
            round=round_,
            parent_hash=self.head_hash,
            time_ms=time_ms,
            proposer=proposer,
            txs_root=txs_root(included),
            state_root=root,
            validators_hash=self.validators.hash,
        )
        return Block(header, tuple(included))
