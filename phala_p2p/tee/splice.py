"""Handing large blobs to a pipe without copying them: Linux's ``vmsplice(2)``.

A node writes every byte of a job's input into its enclave's pipe. ``write`` copies each byte
into the pipe's buffer, about 200 us of the writer's CPU per 256 KiB here; ``vmsplice`` puts
references to the writer's own pages in the pipe instead (about 26 us), and the reader copies
from them. The catch: the pipe holds those pages, not a copy, until the reader has read them.
The bytes must stay unchanged and alive until then: ``bytes`` objects are never changed, and
the caller keeps them until the reader has answered (see ``SimulatedEnclave``).

Anything other than Linux with a C library that has ``vmsplice`` (or a kernel or sandbox that
refuses it) gets ``None`` from :func:`vmsplice_writer`, and callers write as before.
"""

from __future__ import annotations

import array
import collections
import ctypes
import fcntl
import os
import sys
import termios
from collections.abc import Callable
from typing import Final

SPLICE_F_NONBLOCK: Final = 0x02
MIN_SPLICE: Final = 64 * 1024
"""Blobs shorter than this are written (a system call either way; nothing to gain)."""


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load(flags: int) -> Callable[[int, bytes, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.vmsplice
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_uint]
    call.restype = ctypes.c_ssize_t
    address_of = ctypes.cast  # (bound once: this is on the data path)

    def vmsplice(fd: int, blob: bytes, offset: int) -> int:
        """Put ``blob[offset:]`` (as much as fits) in the pipe ``fd``; bytes taken.
        BlockingIOError when the pipe is full; OSError otherwise."""
        base = address_of(ctypes.c_char_p(blob), ctypes.c_void_p).value
        assert base is not None
        iov = _IoVec(base + offset, len(blob) - offset)
        taken = int(call(fd, ctypes.byref(iov), 1, flags))  # (ctypes lets go of the GIL)
        if taken < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))  # BlockingIOError, BrokenPipeError, ...
        return taken

    return vmsplice


_VMSPLICE = _load(SPLICE_F_NONBLOCK)
_VMSPLICE_BLOCKING = _load(0)


def vmsplice_writer(fd: int, *, blocking: bool = False) -> Callable[[int, bytes, int], int] | None:
    """``vmsplice`` if it works on the pipe ``fd`` here, else None (write as before). Not
    ``blocking``: BlockingIOError when the pipe is full (for a non-blocking ``fd``)."""
    splice = _VMSPLICE_BLOCKING if blocking else _VMSPLICE
    if splice is None:
        return None
    try:
        splice(fd, b"", 0)  # an empty splice: refused by a sandbox or a kernel without it
    except BlockingIOError:
        pass
    except OSError:
        return None
    return splice


def spliceable(part: object) -> bool:
    """Whether a frame's part goes by reference: a ``bytes`` blob (never changed) of
    MIN_SPLICE bytes or more."""
    return type(part) is bytes and len(part) >= MIN_SPLICE


def unread_bytes(fd: int) -> int:
    """Bytes in the pipe ``fd`` (either end) that its reader has not read yet."""
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


class LentBlobs:
    """A writer's blobs spliced into a pipe, kept until its reader has read past them.

    The pipe refers to their pages until then, so they must not be freed (and their memory
    reused) before: ``lend`` after splicing one, ``wrote`` after copying bytes in,
    ``release_read`` after each write. The reader has read ``written - unread_bytes(fd)``
    bytes of what was written.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.written = 0  # bytes written to the pipe so far, spliced or copied
        self._lent: collections.deque[tuple[int, bytes]] = collections.deque()

    def __len__(self) -> int:
        return len(self._lent)

    def lend(self, blob: bytes) -> None:
        self.written += len(blob)
        self._lent.append((self.written, blob))  # released once read up to its end

    def wrote(self, count: int) -> None:
        self.written += count

    def release_read(self) -> None:
        if not self._lent:
            return
        read = self.written - unread_bytes(self._fd)
        while self._lent and self._lent[0][0] <= read:
            self._lent.popleft()


__all__ = ["MIN_SPLICE", "LentBlobs", "spliceable", "unread_bytes", "vmsplice_writer"]
