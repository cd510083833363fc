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

import ctypes
import os
import sys
from collections.abc import Callable
from typing import Final

SPLICE_F_NONBLOCK: Final = 0x02
MIN_SPLICE: Final = 64 * 1024
"""Blobs shorter than this are written (a system call either way; nothing to gain)."""


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _load() -> Callable[[int, bytes, int], int] | None:
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
        taken = int(call(fd, ctypes.byref(iov), 1, SPLICE_F_NONBLOCK))
        if taken < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))  # BlockingIOError, BrokenPipeError, ...
        return taken

    return vmsplice


_VMSPLICE = _load()


def vmsplice_writer(fd: int) -> Callable[[int, bytes, int], int] | None:
    """``vmsplice`` if it works on the pipe ``fd`` here, else None (write as before)."""
    if _VMSPLICE is None:
        return None
    try:
        _VMSPLICE(fd, b"", 0)  # an empty splice: refused by a sandbox or a kernel without it
    except BlockingIOError:
        pass
    except OSError:
        return None
    return _VMSPLICE


__all__ = ["MIN_SPLICE", "vmsplice_writer"]
