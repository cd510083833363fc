"""SQLite block store: finalized blocks with their commits, and what the node last signed.

One file in ``data_dir`` (WAL journal, ``synchronous=FULL``): ``put_block`` and ``save_signed``
return only after their transaction is durable, so a node killed at any point restarts from disk
without losing a finalized block it acknowledged and without forgetting what it signed.
On open, the ledger is rebuilt by replaying the stored blocks from genesis.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from phala_p2p.chain.block import Block, Commit, CommittedBlock, Proposal, Vote
from phala_p2p.chain.consensus import (
    Action,
    CommitBlock,
    Consensus,
    ConsensusConfig,
    PersistSigned,
    SignedState,
    TxSource,
)
from phala_p2p.chain.params import Genesis
from phala_p2p.chain.tx import Signer
from phala_p2p.chain.view import ChainView
from phala_p2p.errors import ChainError, ProtocolViolation, UsageError
from phala_p2p.wire.codec import decode, encode

MAX_STORED_BLOCK = 64 * 1024 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS signed_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    height INTEGER NOT NULL,
    round INTEGER NOT NULL,
    step INTEGER NOT NULL,
    sign_hash BLOB NOT NULL,
    locked_round INTEGER NOT NULL,
    locked_hash BLOB
);
CREATE TABLE IF NOT EXISTS own_messages (
    height INTEGER NOT NULL,
    round INTEGER NOT NULL,
    step INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (height, round, step)
);
"""


class BlockStore:
    """Blocks by height (1..head, no gaps) and the consensus signing record.

    Not safe for concurrent use from several threads; one driver owns it.
    """

    def __init__(self, path: str | Path, *, genesis_hash: bytes, durable: bool = True) -> None:
        self.path = str(path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='genesis'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('genesis', ?)", (genesis_hash,))
            elif bytes(row[0]) != genesis_hash:
                raise UsageError(f"{self.path} belongs to another chain (genesis differs)")
            (head,) = self._db.execute("SELECT COALESCE(MAX(height), 0) FROM blocks").fetchone()
        except sqlite3.Error as err:
            raise ChainError(f"cannot open block store {self.path}: {err}") from err
        self._head: int = head

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def head(self) -> int:
        """Height of the last stored block (0: none)."""
        return self._head

    def put_block(self, block: Block, commit: Commit) -> None:
        """Store the next block; durable when this returns."""
        if block.height != self._head + 1:
            raise UsageError(f"store expects height {self._head + 1}, got {block.height}")
        if commit.height != block.height or commit.block_hash != block.hash:
            raise UsageError("commit does not certify this block")
        data = encode(CommittedBlock(block, commit))
        try:
            self._db.execute(
                "INSERT INTO blocks (height, hash, data) VALUES (?, ?, ?)",
                (block.height, block.hash, data),
            )
        except sqlite3.Error as err:
            raise ChainError(f"cannot store block {block.height}: {err}") from err
        self._head = block.height

    def put_blocks(self, blocks: list[tuple[Block, Commit]]) -> None:
        """Store consecutive next blocks in one transaction; durable when this returns."""
        if not blocks:
            return
        rows = []
        expect = self._head + 1
        for block, commit in blocks:
            if block.height != expect:
                raise UsageError(f"store expects height {expect}, got {block.height}")
            if commit.height != block.height or commit.block_hash != block.hash:
                raise UsageError("commit does not certify this block")
            rows.append((block.height, block.hash, encode(CommittedBlock(block, commit))))
            expect += 1
        try:
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO blocks (height, hash, data) VALUES (?, ?, ?)", rows
                )
        except sqlite3.Error as err:
            raise ChainError(f"cannot store blocks {rows[0][0]}..{rows[-1][0]}: {err}") from err
        self._head = expect - 1

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction: committed if the block completes, else rolled back."""
        self._db.execute("BEGIN IMMEDIATE")
        committed = False
        try:
            yield
            self._db.execute("COMMIT")
            committed = True
        finally:
            if not committed:
                self._db.execute("ROLLBACK")

    def get_raw(self, height: int) -> bytes | None:
        """The stored wire encoding of the ``CommittedBlock`` at ``height``."""
        row = self._db.execute("SELECT data FROM blocks WHERE height=?", (height,)).fetchone()
        return None if row is None else bytes(row[0])

    def get_block(self, height: int) -> CommittedBlock | None:
        raw = self.get_raw(height)
        return None if raw is None else self._decode(raw, height)

    def range(self, lo: int, hi: int) -> Iterator[CommittedBlock]:
        """Blocks ``lo..hi`` inclusive, in order (stops at the head)."""
        page = 256
        while lo <= hi:
            rows = self._db.execute(
                "SELECT height, data FROM blocks WHERE height BETWEEN ? AND ? ORDER BY height",
                (lo, min(hi, lo + page - 1)),
            ).fetchall()
            if not rows:
                return
            for height, data in rows:
                yield self._decode(bytes(data), height)
            lo = rows[-1][0] + 1

    def _decode(self, raw: bytes, height: int) -> CommittedBlock:
        try:
            cb = decode(raw, max_size=MAX_STORED_BLOCK, expect=CommittedBlock)
        except ProtocolViolation as err:
            raise ChainError(f"stored block {height} is corrupt: {err}") from err
        if cb.block.height != height:
            raise ChainError(f"stored block {height} has height {cb.block.height}")
        return cb

    # -- what the consensus machine last signed ---------------------------------------------

    def save_signed(self, state: SignedState, message: Proposal | Vote) -> None:
        """Durably record a ``PersistSigned`` action (the signing record and the signed
        message); call it before carrying out the broadcast that follows the action."""
        data = encode(message)
        try:
            with self._transaction():
                self._db.execute(
                    "INSERT OR REPLACE INTO signed_state VALUES (1, ?, ?, ?, ?, ?, ?)",
                    (
                        state.height,
                        state.round,
                        state.step,
                        state.sign_hash,
                        state.locked_round,
                        state.locked_hash,
                    ),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO own_messages VALUES (?, ?, ?, ?)",
                    (state.height, state.round, state.step, data),
                )
                self._db.execute("DELETE FROM own_messages WHERE height < ?", (state.height,))
        except sqlite3.Error as err:
            raise ChainError(f"cannot store signing state: {err}") from err

    def load_own_messages(self, height: int) -> list[Proposal | Vote]:
        """The messages this node signed at ``height`` (for ``Consensus(own_messages=...)``)."""
        rows = self._db.execute(
            "SELECT data FROM own_messages WHERE height=? ORDER BY round, step", (height,)
        ).fetchall()
        out: list[Proposal | Vote] = []
        for (data,) in rows:
            try:
                msg = decode(bytes(data), max_size=MAX_STORED_BLOCK)
            except ProtocolViolation as err:
                raise ChainError(f"stored own message is corrupt: {err}") from err
            if not isinstance(msg, Proposal | Vote):
                raise ChainError("stored own message has the wrong kind")
            out.append(msg)
        return out

    def load_signed(self) -> SignedState | None:
        row = self._db.execute(
            "SELECT height, round, step, sign_hash, locked_round, locked_hash FROM signed_state"
        ).fetchone()
        if row is None:
            return None
        h, r, s, sign_hash, lr, lh = row
        return SignedState(h, r, s, bytes(sign_hash), lr, None if lh is None else bytes(lh))

    # -- for drivers --------------------------------------------------------------------------

    def persist(self, action: Action) -> None:
        """Carry out the storage part of a consensus action (``PersistSigned``: the signing
        record; ``CommitBlock``: the block); other actions are not the store's business."""
        if isinstance(action, PersistSigned):
            self.save_signed(action.state, action.message)
        elif isinstance(action, CommitBlock):
            self.put_block(action.block, action.commit)

    def consensus(
        self,
        view: ChainView,
        signer: Signer,
        *,
        mempool: TxSource | None = None,
        config: ConsensusConfig | None = None,
    ) -> Consensus:
        """A consensus machine for ``view`` that remembers what this node signed before."""
        signed = self.load_signed()
        own = self.load_own_messages(signed.height) if signed is not None else []
        return Consensus(
            view, signer, mempool=mempool, signed_state=signed, own_messages=own, config=config
        )

    # -- restart ----------------------------------------------------------------------------

    def open_view(self, genesis: Genesis) -> ChainView:
        """The chain view after every stored block, replayed from genesis."""
        if genesis.genesis_hash != self._genesis_hash():
            raise UsageError("genesis differs from the store's")
        return ChainView.replay(
            genesis, ((cb.block, cb.commit) for cb in self.range(1, self._head))
        )

    def _genesis_hash(self) -> bytes:
        row = self._db.execute("SELECT value FROM meta WHERE key='genesis'").fetchone()
        return bytes(row[0])
