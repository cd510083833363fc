"""Channels on hot paths: taking what a channel already holds in one go (one write or one send
for several items), and sending without a trip through the scheduler when there is room."""

from __future__ import annotations

from typing import TypeVar

import trio

T = TypeVar("T")


def with_ready(first: T, channel: trio.MemoryReceiveChannel[T], most: int) -> list[T]:
    """``first`` (just received from ``channel``) and whatever else it already holds, at
    most ``most`` items in all; never waits."""
    batch = [first]
    while len(batch) < most:
        try:
            batch.append(channel.receive_nowait())
        except trio.WouldBlock:
            break
    return batch


async def put_soon(channel: trio.MemorySendChannel[T], item: T) -> None:
    """``channel.send(item)``, but without a checkpoint when the channel has room (the usual
    case): a task on the data path then checkpoints only where it really waits (a stream,
    an answer), since a yield per queued item only costs scheduler steps."""
    try:
        channel.send_nowait(item)
    except trio.WouldBlock:
        await channel.send(item)
