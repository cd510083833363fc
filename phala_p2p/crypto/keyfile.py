"""The node's identity key file in its data directory.

Format: one ASCII line ``phala-p2p-ed25519-v1 <64 lowercase hex digits of the seed>``
followed by a newline. The file is created with mode 0600 (and its directory with 0700)
and appears under its final name only once complete: it is written to a private temporary
file, fsynced, then hard-linked into place, so a crash or a concurrent start never leaves a
half-written key behind and an existing key is never overwritten. A key file that group or
others may read or write is refused, as ssh refuses such a private key.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from phala_p2p.crypto.identity import SEED_SIZE, Identity
from phala_p2p.errors import UsageError

KEY_FILE_NAME = "identity.key"
KEY_FILE_TAG = "phala-p2p-ed25519-v1"
_MAX_KEY_FILE = 4096


def format_key_file(identity: Identity) -> bytes:
    """The key file's bytes for ``identity``."""
    return f"{KEY_FILE_TAG} {identity.seed.hex()}\n".encode("ascii")


def parse_key_file(data: bytes, path: Path | str = KEY_FILE_NAME) -> Identity:
    """The identity stored in key-file bytes; UsageError naming ``path`` if malformed."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as err:
        raise UsageError(f"key file {path} is malformed: not ASCII text") from err
    parts = text.strip().split()
    if len(parts) != 2 or parts[0] != KEY_FILE_TAG:
        raise UsageError(
            f"key file {path} is malformed: expected one line '{KEY_FILE_TAG} <hex seed>'"
        )
    hex_seed = parts[1]
    if len(hex_seed) != 2 * SEED_SIZE or any(c not in "0123456789abcdefABCDEF" for c in hex_seed):
        raise UsageError(f"key file {path} is malformed: the seed is not {SEED_SIZE} bytes of hex")
    return Identity.from_seed(bytes.fromhex(hex_seed))


def _ensure_dir(directory: Path) -> None:
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create data directory {directory}: {err}") from err
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories; the file itself is synced
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` with mode 0600; False if it already exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def read_identity(path: Path) -> Identity:
    """Load the identity in ``path``, refusing a file that group or others can access."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as err:
        raise UsageError(f"key file {path} does not exist") from err
    except OSError as err:
        raise UsageError(f"cannot open key file {path}: {err}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"key file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise UsageError(
                f"key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); fix it with: chmod 600 {path}"
            )
        data = os.read(fd, _MAX_KEY_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE:
        raise UsageError(f"key file {path} is malformed: too large")
    return parse_key_file(data, path)


def save_identity(path: Path, identity: Identity) -> None:
    """Write ``identity`` to a new key file at ``path`` (mode 0600); never overwrites."""
    if not isinstance(identity, Identity):
        raise UsageError("save_identity takes an Identity")
    path = Path(path)
    _ensure_dir(path.parent)
    try:
        created = _write_new(path, format_key_file(identity))
    except OSError as err:
        raise UsageError(f"cannot write key file {path}: {err}") from err
    if not created:
        raise UsageError(f"key file {path} already exists; refusing to overwrite it")


def load_or_create_identity(data_dir: Path) -> Identity:
    """The identity in ``data_dir/identity.key``, created (with the directory) if missing."""
    data_dir = Path(data_dir)
    _ensure_dir(data_dir)
    path = data_dir / KEY_FILE_NAME
    if not os.path.lexists(path):
        identity = Identity.generate()
        try:
            created = _write_new(path, format_key_file(identity))
        except OSError as err:
            raise UsageError(f"cannot write key file {path}: {err}") from err
        if created:
            return identity
        # Another process created it first: use theirs.
    return read_identity(path)


__all__ = [
    "KEY_FILE_NAME",
    "KEY_FILE_TAG",
    "format_key_file",
    "load_or_create_identity",
    "parse_key_file",
    "read_identity",
    "save_identity",
]
