"""Journaled key-value tables: the storage of the ledger state.

Every write records the previous value while a checkpoint is open, so a rejected transaction
(or a trial execution of a proposed block) is undone exactly with ``rollback``. Keys and values
are plain msgpack-able data (ints, bytes, str, bools, None and tuples of these, including
NamedTuples), which makes the table digest canonical: the digest is SHA-256 over the msgpack
encodings of ``key, value`` for every entry, sorted by the encoded key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterator
from typing import Any, Generic, TypeVar

import msgpack

from phala_p2p.errors import UsageError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

_MISSING: Any = object()


def pack(value: Any) -> bytes:
    """Canonical msgpack encoding used for digests and signed bytes."""
    out: bytes = msgpack.packb(value, use_bin_type=True)
    return out


class Journal:
    """Undo log shared by all tables of one state."""

    def __init__(self) -> None:
        self._undo: list[tuple[Table[Any, Any], Any, Any]] = []
        self._marks: list[int] = []

    @property
    def active(self) -> bool:
        return bool(self._marks)

    def checkpoint(self) -> int:
        self._marks.append(len(self._undo))
        return len(self._marks)

    def _pop_mark(self, token: int) -> int:
        if token != len(self._marks):
            raise UsageError("checkpoints must be closed innermost first")
        return self._marks.pop()

    def rollback(self, token: int) -> None:
        """Undo every write made since checkpoint ``token`` and close it."""
        mark = self._pop_mark(token)
        while len(self._undo) > mark:
            table, key, old = self._undo.pop()
            table._restore(key, old)

    def release(self, token: int) -> None:
        """Keep the writes made since checkpoint ``token`` and close it."""
        self._pop_mark(token)
        if not self._marks:
            self._undo.clear()

    def record(self, table: Table[Any, Any], key: Any, old: Any) -> None:
        if self._marks:
            self._undo.append((table, key, old))


class Table(Generic[K, V]):
    """One named mapping of the state, with a cached digest."""

    def __init__(self, name: str, journal: Journal) -> None:
        self.name = name
        self._journal = journal
        self._data: dict[K, V] = {}
        self._digest: bytes | None = None
        self.version = 0

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K, default: V) -> V:
        return self._data.get(key, default)

    def find(self, key: K) -> V | None:
        return self._data.get(key)

    def items(self) -> Iterator[tuple[K, V]]:
        """Entries in canonical (encoded-key) order."""
        for _, key in sorted((pack(k), k) for k in self._data):
            yield key, self._data[key]

    def keys(self) -> list[K]:
        return [k for k, _ in self.items()]

    def set(self, key: K, value: V) -> None:
        self._journal.record(self, key, self._data.get(key, _MISSING))
        self._data[key] = value
        self._touch()

    def delete(self, key: K) -> None:
        if key in self._data:
            self._journal.record(self, key, self._data[key])
            del self._data[key]
            self._touch()

    def _restore(self, key: K, old: Any) -> None:
        if old is _MISSING:
            self._data.pop(key, None)
        else:
            self._data[key] = old
        self._touch()

    def _touch(self) -> None:
        self._digest = None
        self.version += 1

    def digest(self) -> bytes:
        if self._digest is None:
            h = hashlib.sha256()
            for kb, key in sorted((pack(k), k) for k in self._data):
                h.update(kb)
                h.update(pack(self._data[key]))
            self._digest = h.digest()
        return self._digest
