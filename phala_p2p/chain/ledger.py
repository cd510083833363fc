"""The ledger: a deterministic state machine over journaled tables.

``apply_tx`` either applies a transaction completely or rejects it with a reason and changes
nothing; ``end_block`` runs the registered end-of-block hooks (unbonding maturity, governance
tallies); ``state_root`` hashes every table. Rules are in protocols/ledger.md.
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

# the core transaction kinds register themselves on import
from phala_p2p.chain import governance as governance
from phala_p2p.chain import liveness as liveness
from phala_p2p.chain import miners as miners
from phala_p2p.chain import payments as payments
from phala_p2p.chain import settlement as settlement
from phala_p2p.chain import staking as staking
from phala_p2p.chain.params import ChainParams, Genesis
from phala_p2p.chain.registry import TxContext, end_block_hooks, lookup
from phala_p2p.chain.tables import Journal, Table, pack
from phala_p2p.chain.tx import Tx, TxRejectReason, TxResult
from phala_p2p.chain.validators import ValidatorSet
from phala_p2p.errors import ProtocolViolation, TxRejected, UsageError
from phala_p2p.wire.codec import decode

STATE_DOMAIN = b"phala/state/1\x00"
MAX_TABLE_NAME = 64


class Account(NamedTuple):
    balance: int
    nonce: int


class LedgerState:
    """Accounts, stakes, gatekeepers, escrows, governance and parameters of one chain."""

    def __init__(self, chain_id: str, params: ChainParams) -> None:
        self._journal = Journal()
        self._tables: dict[str, Table[Any, Any]] = {}
        self.accounts: Table[bytes, Account] = self.table("accounts")
        self.stakes: Table[bytes, int] = self.table("stakes")
        self.registered: Table[bytes, bool] = self.table("gatekeepers")
        self.params_table: Table[str, int] = self.table("params")
        self.meta: Table[str, Any] = self.table("meta")
        self.measurements: Table[bytes, bool] = self.table("measurements")
        self.attestation_root_table: Table[bytes, bool] = self.table("attestation_roots")
        self.meta.set("chain_id", chain_id)
        self.meta.set("treasury", 0)
        for name, value in params.as_dict().items():
            self.params_table.set(name, value)
        self._params_cache: tuple[int, ChainParams] = (self.params_table.version, params)
        self._valset_cache: tuple[tuple[int, int, int], ValidatorSet] | None = None
        # the time of the block being executed (not part of the state): rules that depend
        # on time (quote freshness) read it, so every node decides alike
        self.block_time_ms = 0

    @classmethod
    def from_genesis(cls, genesis: Genesis) -> LedgerState:
        state = cls(genesis.chain_id, genesis.params)
        for pubkey, balance in genesis.accounts:
            state.accounts.set(pubkey, Account(balance, 0))
        for pubkey, stake in genesis.gatekeepers:
            if pubkey not in state.accounts:
                state.accounts.set(pubkey, Account(0, 0))
            state.stakes.set(pubkey, stake)
            state.registered.set(pubkey, True)
        for m in genesis.allowed_measurements:
            state.measurements.set(m, True)
        for r in genesis.attestation_roots:
            state.attestation_root_table.set(r, True)
        state.meta.set("treasury", genesis.treasury)
        state.block_time_ms = genesis.genesis_time_ms
        return state

    # -- tables and journal ---------------------------------------------------------------

    def table(self, name: str) -> Table[Any, Any]:
        """The named table, created on first use (extensions keep their data here).

        Every table is part of the state root.
        """
        if not name or len(name) > MAX_TABLE_NAME:
            raise UsageError("table names are 1..64 characters")
        if name not in self._tables:
            self._tables[name] = Table(name, self._journal)
        return self._tables[name]

    def checkpoint(self) -> int:
        """Open a checkpoint; every later write can be undone with ``rollback(token)``."""
        return self._journal.checkpoint()

    def rollback(self, token: int) -> None:
        self._journal.rollback(token)

    def release(self, token: int) -> None:
        self._journal.release(token)

    # -- reads ----------------------------------------------------------------------------

    @property
    def chain_id(self) -> str:
        value: str = self.meta.get("chain_id", "")
        return value

    @property
    def params(self) -> ChainParams:
        version, params = self._params_cache
        if version != self.params_table.version:
            params = ChainParams.from_dict(dict(self.params_table.items()))
            self._params_cache = (self.params_table.version, params)
        return params

    def account(self, acct: bytes) -> Account | None:
        return self.accounts.find(acct)

    def balance(self, acct: bytes) -> int:
        a = self.accounts.find(acct)
        return 0 if a is None else a.balance

    def nonce(self, acct: bytes) -> int:
        a = self.accounts.find(acct)
        return 0 if a is None else a.nonce

    def stake(self, acct: bytes) -> int:
        return self.stakes.get(acct, 0)

    def treasury(self) -> int:
        value: int = self.meta.get("treasury", 0)
        return value

    def is_registered_gatekeeper(self, acct: bytes) -> bool:
        return acct in self.registered

    def gatekeepers(self) -> ValidatorSet:
        """The active set: registered gatekeepers with at least ``min_stake`` bonded."""
        key = (self.stakes.version, self.registered.version, self.params_table.version)
        if self._valset_cache is not None and self._valset_cache[0] == key:
            return self._valset_cache[1]
        min_stake = self.params.min_stake
        powers = {}
        for acct in self.registered.keys():
            s = self.stake(acct)
            if s >= min_stake:
                powers[acct] = s
        valset = ValidatorSet.from_powers(powers)
        self._valset_cache = (key, valset)
        return valset

    def validator_set_hash(self) -> bytes:
        return self.gatekeepers().hash

    def allowed_measurements(self) -> list[bytes]:
        return self.measurements.keys()

    def attestation_roots(self) -> list[bytes]:
        return self.attestation_root_table.keys()

    def proposals(self) -> list[governance.ProposalRecord]:
        return governance.all_proposals(self)

    def proposal(self, pid: int) -> governance.ProposalRecord | None:
        return governance.get_proposal(self, pid)

    def escrow(self, escrow_id: bytes) -> payments.Escrow | None:
        return payments.get_escrow(self, escrow_id)

    def unbonding(self, acct: bytes) -> list[tuple[int, int]]:
        """(mature_height, amount) of the account's unbonding entries."""
        return staking.unbonding_of(self, acct)

    # -- writes used by handlers ------------------------------------------------------------

    def credit(self, acct: bytes, amount: int) -> None:
        a = self.accounts.get(acct, Account(0, 0))
        self.accounts.set(acct, Account(a.balance + amount, a.nonce))

    def debit(self, acct: bytes, amount: int) -> None:
        """Take ``amount`` from the account or raise TxRejected(insufficient_funds)."""
        a = self.accounts.find(acct)
        if a is None:
            raise TxRejected("unknown account", reason=TxRejectReason.UNKNOWN_ACCOUNT)
        if a.balance < amount:
            raise TxRejected(
                f"balance {a.balance} < {amount}", reason=TxRejectReason.INSUFFICIENT_FUNDS
            )
        self.accounts.set(acct, Account(a.balance - amount, a.nonce))

    def set_stake(self, acct: bytes, amount: int) -> None:
        if amount:
            self.stakes.set(acct, amount)
        else:
            self.stakes.delete(acct)

    def add_treasury(self, amount: int) -> None:
        self.meta.set("treasury", self.treasury() + amount)

    # -- transactions and blocks ----------------------------------------------------------

    def check_tx(self, tx: Tx) -> TxResult | None:
        """Stateless-ish admission checks (chain, size, signature); None when they pass."""
        if tx.chain_id != self.chain_id:
            return TxResult(tx.id, False, TxRejectReason.WRONG_CHAIN, tx.chain_id)
        kind = lookup(tx.kind)
        if kind is None:
            return TxResult(tx.id, False, TxRejectReason.UNKNOWN_KIND, str(tx.kind))
        if tx.size > getattr(self.params, kind.size_param):
            return TxResult(tx.id, False, TxRejectReason.TX_TOO_LARGE, str(tx.size))
        if not tx.verify():
            return TxResult(tx.id, False, TxRejectReason.BAD_SIGNATURE)
        return None

    def apply_tx(self, tx: Tx, height: int) -> TxResult:
        """Apply ``tx`` in the block at ``height``: all of it, or nothing and a reason."""
        early = self.check_tx(tx)
        if early is not None:
            return early
        kind = lookup(tx.kind)
        assert kind is not None  # checked by check_tx
        a = self.accounts.find(tx.sender)
        if a is None:
            return TxResult(tx.id, False, TxRejectReason.UNKNOWN_ACCOUNT)
        if tx.nonce != a.nonce:
            return TxResult(tx.id, False, TxRejectReason.BAD_NONCE, f"expected {a.nonce}")
        if tx.fee < self.params.tx_fee:
            return TxResult(tx.id, False, TxRejectReason.FEE_TOO_LOW, f"min {self.params.tx_fee}")
        if a.balance < tx.fee:
            return TxResult(tx.id, False, TxRejectReason.INSUFFICIENT_FUNDS, "cannot pay fee")
        try:
            limit = getattr(self.params, kind.size_param)
            body = decode(tx.body, max_size=limit, expect=kind.body_cls)
        except ProtocolViolation as err:
            return TxResult(tx.id, False, TxRejectReason.MALFORMED, str(err))
        token = self.checkpoint()
        try:
            self.accounts.set(tx.sender, Account(a.balance - tx.fee, a.nonce + 1))
            self.add_treasury(tx.fee)
            kind.handler(TxContext(self, tx, height), body)
        except TxRejected as err:
            self.rollback(token)
            return TxResult(tx.id, False, err.reason, str(err))
        self.release(token)
        return TxResult(tx.id, True)

    def end_block(self, height: int) -> None:
        """End-of-block work: unbonding maturity, governance tallies, extension hooks."""
        for hook in end_block_hooks():
            hook(self, height)

    def state_root(self) -> bytes:
        h = hashlib.sha256(STATE_DOMAIN)
        for name in sorted(self._tables):
            if not len(self._tables[name]):
                continue  # a table nobody wrote to yet is the same as no table
            h.update(pack(name))
            h.update(self._tables[name].digest())
        return h.digest()
