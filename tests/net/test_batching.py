"""with_ready: an item and what the channel already holds, bounded, never waiting."""

from __future__ import annotations

import trio

from phala_p2p.net.batching import with_ready


async def test_takes_what_is_ready_up_to_the_bound_and_never_waits() -> None:
    send, receive = trio.open_memory_channel[int](16)
    for i in range(1, 6):
        send.send_nowait(i)
    assert with_ready(0, receive, 3) == [0, 1, 2]
    assert with_ready(10, receive, 99) == [10, 3, 4, 5]  # the rest, then stops: empty
    assert with_ready(20, receive, 99) == [20]
    assert with_ready(30, receive, 1) == [30]
