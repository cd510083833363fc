"""Frozen, validated settings of one side of a job session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from phala_p2p.errors import UsageError
from phala_p2p.jobs.messages import MAX_CHUNK, MAX_WINDOW

DEFAULT_CHUNK: Final = 256 * 1024
MAX_GRACE_MS: Final = 24 * 3600 * 1000


@dataclass(frozen=True)
class JobConfig:
    """``chunk_size``: plaintext bytes per chunk this side sends (1..MAX_CHUNK).
    ``window``: most unacknowledged chunks this side holds (1..1024); its memory for them is
    at most ``window x (chunk_size + 17)`` bytes.
    ``grace_ms``: how long a session whose connection dropped can still be resumed.
    ``max_inbound``: most plaintext bytes accepted from the peer (None: no limit).
    """

    chunk_size: int = DEFAULT_CHUNK
    window: int = 8
    grace_ms: int = 30_000
    max_inbound: int | None = None

    def __post_init__(self) -> None:
        _check_int("chunk_size", self.chunk_size, 1, MAX_CHUNK)
        _check_int("window", self.window, 1, MAX_WINDOW)
        _check_int("grace_ms", self.grace_ms, 0, MAX_GRACE_MS)
        if self.max_inbound is not None:
            _check_int("max_inbound", self.max_inbound, 0, 1 << 62)


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if type(value) is not int or not lo <= value <= hi:
        raise UsageError(f"{name} must be an int in {lo}..{hi}, not {value!r}")


__all__ = ["DEFAULT_CHUNK", "MAX_GRACE_MS", "MAX_WINDOW", "JobConfig"]
