"""The identity key file: private on creation, refused when exposed or malformed."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from phala_p2p.crypto.identity import Identity
from phala_p2p.crypto.keyfile import (
    KEY_FILE_NAME,
    format_key_file,
    load_or_create_identity,
    read_identity,
    save_identity,
)
from phala_p2p.errors import UsageError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_private_and_reloaded(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "node"
    identity = load_or_create_identity(data_dir)
    key = data_dir / KEY_FILE_NAME
    assert mode(key) == 0o600
    assert mode(data_dir) == 0o700
    assert sorted(os.listdir(data_dir)) == [KEY_FILE_NAME]  # no temporary file left behind
    again = load_or_create_identity(data_dir)
    assert again.public_key == identity.public_key
    assert key.read_text().startswith("phala-p2p-ed25519-v1 ")


def test_created_private_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create_identity(tmp_path / "d")
    finally:
        os.umask(old)
    assert mode(tmp_path / "d" / KEY_FILE_NAME) == 0o600


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_exposed_key_file_is_refused(tmp_path: Path, bad_mode: int) -> None:
    load_or_create_identity(tmp_path)
    key = tmp_path / KEY_FILE_NAME
    key.chmod(bad_mode)
    with pytest.raises(UsageError) as info:
        load_or_create_identity(tmp_path)
    assert str(key) in str(info.value)
    assert f"chmod 600 {key}" in str(info.value)
    key.chmod(0o600)
    load_or_create_identity(tmp_path)


def test_read_only_owner_file_is_accepted(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    (tmp_path / KEY_FILE_NAME).chmod(0o400)
    assert load_or_create_identity(tmp_path) == identity


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"phala-p2p-ed25519-v1\n",
        b"phala-p2p-ed25519-v2 " + b"00" * 32 + b"\n",
        b"phala-p2p-ed25519-v1 " + b"00" * 31 + b"\n",
        b"phala-p2p-ed25519-v1 " + b"zz" * 32 + b"\n",
        b"phala-p2p-ed25519-v1 " + b"00" * 32 + b" extra\n",
        b"\xff\xfe",
        b"x" * 10_000,
    ],
)
def test_malformed_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    key = tmp_path / KEY_FILE_NAME
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(UsageError) as info:
        load_or_create_identity(tmp_path)
    assert str(key) in str(info.value)
    assert key.read_bytes() == content  # never overwritten


def test_symlinked_or_non_regular_key_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.key"
    save_identity(target, Identity.generate())
    (tmp_path / "node").mkdir(mode=0o700)
    (tmp_path / "node" / KEY_FILE_NAME).symlink_to(target)
    with pytest.raises(UsageError):
        load_or_create_identity(tmp_path / "node")
    (tmp_path / "other").mkdir(mode=0o700)
    (tmp_path / "other" / KEY_FILE_NAME).mkdir(mode=0o700)
    with pytest.raises(UsageError):
        load_or_create_identity(tmp_path / "other")


def test_save_identity(tmp_path: Path) -> None:
    identity = Identity.from_seed(bytes(range(32)))
    path = tmp_path / "new-dir" / KEY_FILE_NAME
    save_identity(path, identity)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    assert path.read_bytes() == format_key_file(identity)
    assert read_identity(path) == identity
    assert load_or_create_identity(path.parent) == identity
    with pytest.raises(UsageError, match="refusing to overwrite"):
        save_identity(path, Identity.generate())
    assert read_identity(path) == identity
    with pytest.raises(UsageError):
        save_identity(tmp_path / "x.key", "not an identity")  # type: ignore[arg-type]


def test_data_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        load_or_create_identity(tmp_path / "file")
