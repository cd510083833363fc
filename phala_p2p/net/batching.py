"""Batching what a channel already holds: one write or one send for several items."""

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
