"""KeyedLocks: one task at a time per key, and no lock kept for a key nobody holds."""

from __future__ import annotations

import trio
import trio.testing

from phala_p2p.net.locks import KeyedLocks


async def test_same_key_runs_one_at_a_time_and_the_table_empties() -> None:
    locks = KeyedLocks[str]()
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    release = trio.Event()

    async def hold(key: str) -> None:
        async with locks.hold(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            await release.wait()
            inside[key] -= 1

    async with trio.open_nursery() as nursery:
        for key in ("a", "a", "a", "b"):
            nursery.start_soon(hold, key)
        await trio.testing.wait_all_tasks_blocked()
        assert "a" in locks
        assert "b" in locks
        assert len(locks) == 2
        assert inside == {"a": 1, "b": 1}  # the other two "a" tasks wait
        release.set()
    assert most == {"a": 1, "b": 1}
    assert len(locks) == 0
    assert "a" not in locks
