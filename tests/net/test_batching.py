"""with_ready: an item and what the channel already holds, bounded, never waiting; put_soon:
a send that checkpoints only when it must wait."""

from __future__ import annotations

import trio

from phala_p2p.net.batching import put_soon, with_ready


async def test_takes_what_is_ready_up_to_the_bound_and_never_waits() -> None:
    send, receive = trio.open_memory_channel[int](16)
    for i in range(1, 6):
        send.send_nowait(i)
    assert with_ready(0, receive, 3) == [0, 1, 2]
    assert with_ready(10, receive, 99) == [10, 3, 4, 5]  # the rest, then stops: empty
    assert with_ready(20, receive, 99) == [20]
    assert with_ready(30, receive, 1) == [30]


async def test_put_soon_yields_only_when_the_channel_is_full() -> None:
    send, receive = trio.open_memory_channel[int](1)
    steps = []

    async def other() -> None:
        steps.append("other ran")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await put_soon(send, 1)  # room: no checkpoint, so the other task has not run yet
        assert steps == []
        nursery.start_soon(receive.receive)
        await put_soon(send, 2)  # full: waits, and the other tasks run meanwhile
        assert steps == ["other ran"]
    assert receive.receive_nowait() == 2
