"""A bounded mempool ordered by account nonce.

Admission checks what can be checked against the current state (chain, size, signature,
account, nonce window, fee); ``reap`` hands a proposer each account's consecutive nonces,
round-robin across accounts in arrival order; ``update`` after every block drops what was
included and what can no longer apply.
"""

from __future__ import annotations

from dataclasses import dataclass

from phala_p2p.chain.tx import Tx, TxRejectReason, TxResult
from phala_p2p.chain.view import ChainView
from phala_p2p.errors import UsageError


@dataclass(frozen=True)
class MempoolConfig:
    max_txs: int = 10_000
    max_bytes: int = 16 * 1024 * 1024
    max_per_account: int = 64  # nonces accepted ahead of the account's current nonce

    def __post_init__(self) -> None:
        if min(self.max_txs, self.max_bytes, self.max_per_account) <= 0:
            raise UsageError("mempool bounds must be > 0")


class Mempool:
    def __init__(self, config: MempoolConfig | None = None) -> None:
        self.config = config or MempoolConfig()
        self._by_sender: dict[bytes, dict[int, Tx]] = {}  # insertion order = arrival order
        self._ids: set[bytes] = set()
        self._bytes = 0
        self.rejected = 0

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, tx_id: object) -> bool:
        return tx_id in self._ids

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def next_nonce(self, acct: bytes, view: ChainView) -> int:
        """The nonce for this account's next transaction, counting pending ones."""
        nonce = view.state.nonce(acct)
        pending = self._by_sender.get(acct, {})
        while nonce in pending:
            nonce += 1
        return nonce

    def add(self, tx: Tx, view: ChainView) -> TxResult:
        """Admit ``tx`` or say why not (the reason is for the gossip verdict). A transaction
        that is its account's next one is also tried against the head state."""
        result = self._admit(tx, view)
        if not result.ok:
            self.rejected += 1
        return result

    def _admit(self, tx: Tx, view: ChainView) -> TxResult:
        state = view.state
        if tx.id in self._ids:
            return TxResult(tx.id, False, TxRejectReason.DUPLICATE)
        early = state.check_tx(tx)
        if early is not None:
            return early
        account = state.account(tx.sender)
        if account is None:
            return TxResult(tx.id, False, TxRejectReason.UNKNOWN_ACCOUNT)
        if not account.nonce <= tx.nonce < account.nonce + self.config.max_per_account:
            return TxResult(tx.id, False, TxRejectReason.BAD_NONCE, f"account at {account.nonce}")
        if tx.fee < state.params.tx_fee:
            return TxResult(tx.id, False, TxRejectReason.FEE_TOO_LOW)
        if account.balance < tx.fee:
            return TxResult(tx.id, False, TxRejectReason.INSUFFICIENT_FUNDS, "cannot pay fee")
        pending = self._by_sender.get(tx.sender, {})
        if tx.nonce in pending:
            return TxResult(tx.id, False, TxRejectReason.DUPLICATE, "nonce already pending")
        if tx.nonce == account.nonce:
            trial = _trial(view, tx)
            if not trial.ok:
                return trial
        if len(self._ids) >= self.config.max_txs or self._bytes + tx.size > self.config.max_bytes:
            return TxResult(tx.id, False, TxRejectReason.MEMPOOL_FULL)
        self._by_sender.setdefault(tx.sender, {})[tx.nonce] = tx
        self._ids.add(tx.id)
        self._bytes += tx.size
        return TxResult(tx.id, True)

    def reap(self, view: ChainView, max_txs: int) -> list[Tx]:
        """Up to ``max_txs`` candidates: per account consecutive nonces, round-robin."""
        runs: list[list[Tx]] = []
        for sender, pending in self._by_sender.items():
            nonce = view.state.nonce(sender)
            run = []
            while nonce in pending:
                run.append(pending[nonce])
                nonce += 1
            if run:
                runs.append(run)
        out: list[Tx] = []
        depth = 0
        while len(out) < max_txs and runs:
            runs = [run for run in runs if depth < len(run)]
            for run in runs:
                if len(out) >= max_txs:
                    break
                out.append(run[depth])
            depth += 1
        return out

    def update(self, view: ChainView) -> None:
        """After a block: drop included/stale nonces, and each account's next transaction
        (with its successors) if it can no longer apply."""
        for sender in list(self._by_sender):
            pending = self._by_sender[sender]
            nonce = view.state.nonce(sender)
            for n in [n for n in pending if n < nonce]:
                self._remove(pending.pop(n))
            head = pending.get(nonce)
            if head is not None:
                if not _trial(view, head).ok:
                    for n in [n for n in pending if n >= nonce]:
                        self._remove(pending.pop(n))
            if not pending:
                del self._by_sender[sender]

    def _remove(self, tx: Tx) -> None:
        self._ids.discard(tx.id)
        self._bytes -= tx.size


def _trial(view: ChainView, tx: Tx) -> TxResult:
    """Apply ``tx`` to the head state as if in the next block, then undo it."""
    token = view.state.checkpoint()
    try:
        return view.state.apply_tx(tx, view.next_height)
    finally:
        view.state.rollback(token)
