"""One trio lock per key, kept only while a task holds or waits for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class KeyedLocks(Generic[K]):
    """Tasks that hold the same key run one at a time. A key's lock is dropped once no task
    holds or waits for it, so the table is bounded by the tasks in flight, not by the keys
    ever seen."""

    def __init__(self) -> None:
        self._locks: dict[K, trio.Lock] = {}

    def __contains__(self, key: object) -> bool:
        """Whether a task holds (or waits for) ``key`` now."""
        return key in self._locks

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(key, None)
