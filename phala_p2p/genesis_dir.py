"""A genesis folder: ``genesis.toml``, gatekeeper keys and ready-to-run node configs.

    out/genesis.toml
    out/gatekeeper-1/identity.key     out/gatekeeper-1.toml   (one pair per gatekeeper)
    out/account-1/identity.key                                (one per extra funded account)

This is what ``phala-p2p genesis new`` writes. Gatekeepers and extra accounts are all funded
with ``balance`` (a gatekeeper needs some to pay fees); gatekeepers also get ``stake``.

Keys are fresh random ones, or with ``seed`` those of
:func:`phala_p2p.crypto.identity.derive_identity` (index 0 is the bootstrap node, ``1..gatekeepers``
the gatekeepers, ``gatekeepers + j`` account ``j``), so a seed reproduces every key (and,
with a fixed ``genesis_time``, the genesis file byte for byte). Seeded keys are known to
anyone who knows the seed: dev networks only.

A key file that already exists is never overwritten: it is kept and used (with a seed it must
be the seed's key). ``genesis.toml`` is written last, in one step, so a half-made folder never
holds one; an existing ``genesis.toml`` is replaced only with ``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from phala_p2p.chain.params import MAX_GENESIS_ENTRIES, ChainParams, Genesis
from phala_p2p.crypto.identity import Identity
from phala_p2p.crypto.keyfile import KEY_FILE_NAME, read_identity, save_identity
from phala_p2p.errors import UsageError

GENESIS_FILE = "genesis.toml"
DEFAULT_BALANCE = 1_000_000_000
DEFAULT_STAKE = 100_000
DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"


@dataclass(frozen=True)
class Member:
    """One gatekeeper or extra account of a genesis folder."""

    name: str  # "gatekeeper-1", "account-1"
    public_key: bytes
    key_file: Path
    stake: int  # 0 for an extra account
    balance: int
    config: Path | None  # the node config (gatekeepers only)
    kept_key: bool  # the key file existed before and was kept


@dataclass(frozen=True)
class GenesisDir:
    """What :func:`write_genesis_dir` wrote."""

    path: Path  # the genesis.toml
    genesis: Genesis
    gatekeepers: tuple[Member, ...]
    accounts: tuple[Member, ...]
    seeded: bool
    stale_stores: tuple[Path, ...]  # block stores of an earlier genesis, left in data dirs


def parse_params(items: list[str] | tuple[str, ...]) -> dict[str, int]:
    """``["name=value", ...]`` as chain parameter changes; UsageError (one line) if bad."""
    names = ChainParams.names()
    changes: dict[str, int] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name:
            raise UsageError(f"--param expects name=value, got {item!r}")
        if name not in names:
            raise UsageError(f"unknown chain parameter {name!r} (known: {', '.join(names)})")
        try:
            value = int(raw)
        except ValueError as err:
            raise UsageError(f"--param {name}: {raw!r} is not an integer") from err
        changes[name] = value
    return changes


def _identity(seed: bytes | None, index: int) -> Identity:
    if seed is None:
        return Identity.generate()
    from phala_p2p.crypto.identity import derive_identity  # the one derivation devnets share

    return derive_identity(seed, index)


def _planned_key(directory: Path, seed: bytes | None, index: int) -> tuple[Identity, bool]:
    """The key for ``directory`` and whether it already exists there (and is kept)."""
    path = directory / KEY_FILE_NAME
    wanted = None if seed is None else _identity(seed, index)
    if os.path.lexists(path):
        existing = read_identity(path)
        if wanted is not None and existing != wanted:
            raise UsageError(
                f"{path} holds another key than --seed gives; remove it or choose another --out"
            )
        return existing, True
    return wanted or _identity(None, index), False


def _quote(text: str) -> str:
    return json.dumps(text)  # a TOML basic string for these ASCII names and paths


def node_config_text(name: str, chain_id: str, data_dir: str, genesis: str) -> str:
    """A gatekeeper's node config, with paths relative to the config file's folder."""
    return (
        f"# {name} of chain {chain_id}, written by `phala-p2p genesis new`.\n"
        f"# Run it with:  phala-p2p node --config {name}.toml --bootstrap <multiaddr/p2p/id>\n"
        "# Paths are relative to this file. Listen on a public address to serve other hosts.\n"
        "[node]\n"
        'role = "gatekeeper"\n'
        f"name = {_quote(name)}\n"
        f"data_dir = {_quote(data_dir)}\n"
        f"genesis = {_quote(genesis)}\n"
        f"listen = [{_quote(DEFAULT_LISTEN)}]\n"
    )


def genesis_header(genesis: Genesis, *, seeded: bool) -> str:
    lines = [
        f"# Genesis of chain {genesis.chain_id} (hash {genesis.genesis_hash.hex()}),",
        "# written by `phala-p2p genesis new`. Every node of the chain needs this exact file.",
    ]
    if seeded:
        lines.append("# Keys derived from --seed: anyone who knows the seed holds them. Dev only.")
    return "\n".join(lines) + "\n\n"


def _write_file(path: Path, text: str, *, replace: bool) -> None:
    """Write ``path`` in one step; if not ``replace``, UsageError when it exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError as err:
                raise UsageError(f"{path} exists; pass --force to replace it") from err
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)


def write_genesis_dir(
    out: str | Path,
    *,
    gatekeepers: int = 4,
    accounts: int = 0,
    balance: int = DEFAULT_BALANCE,
    stake: int = DEFAULT_STAKE,
    chain_id: str | None = None,
    seed: bytes | None = None,
    params: dict[str, int] | None = None,
    genesis_time: int | None = None,
    force: bool = False,
) -> GenesisDir:
    """Write a genesis folder in ``out`` (see the module docstring); UsageError on any
    problem, raised before anything is written where it can be checked in advance."""
    out = Path(out)
    genesis_path = out / GENESIS_FILE
    if not 1 <= gatekeepers <= MAX_GENESIS_ENTRIES:
        raise UsageError(f"--gatekeepers must be in 1..{MAX_GENESIS_ENTRIES}")
    if not 0 <= accounts <= MAX_GENESIS_ENTRIES - gatekeepers:
        raise UsageError(f"--accounts must be in 0..{MAX_GENESIS_ENTRIES - gatekeepers}")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is not a directory")
    if genesis_path.exists() and not force:
        raise UsageError(f"{genesis_path} exists; pass --force to replace it")
    chain_params = ChainParams().with_changes(params or {})

    keepers = [
        (f"gatekeeper-{i}", *_planned_key(out / f"gatekeeper-{i}", seed, i))
        for i in range(1, gatekeepers + 1)
    ]
    extra = [
        (f"account-{j}", *_planned_key(out / f"account-{j}", seed, gatekeepers + j))
        for j in range(1, accounts + 1)
    ]
    if chain_id is None:
        if seed is None:
            tag = secrets.token_hex(4)
        else:  # as phala_p2p.testing.devnet_genesis names a seeded devnet
            tag = hashlib.blake2b(seed, digest_size=4).hexdigest()
        chain_id = f"devnet-{tag}"
    genesis = Genesis(
        chain_id=chain_id,
        genesis_time=int(time.time()) - 1 if genesis_time is None else genesis_time,
        gatekeepers=tuple((ident.public_key, stake) for _, ident, _ in keepers),
        accounts=tuple((ident.public_key, balance) for _, ident, _ in keepers + extra),
        params=chain_params,
    )

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {out}: {err}") from err
    members: list[Member] = []
    for name, ident, kept in keepers + extra:
        key_file = out / name / KEY_FILE_NAME
        if not kept:
            save_identity(key_file, ident)
        config = None
        if name.startswith("gatekeeper-"):
            config = out / f"{name}.toml"
            text = node_config_text(name, chain_id, name, GENESIS_FILE)
            _write_file(config, text, replace=True)
        is_keeper = config is not None
        members.append(
            Member(
                name, ident.public_key, key_file, stake if is_keeper else 0, balance, config, kept
            )
        )
    from phala_p2p.services.chain import STORE_FILE

    stale = tuple(p for m in members if (p := m.key_file.parent / STORE_FILE).exists())
    header = genesis_header(genesis, seeded=seed is not None)
    _write_file(genesis_path, header + genesis.to_toml(), replace=force)
    return GenesisDir(
        path=genesis_path,
        genesis=genesis,
        gatekeepers=tuple(members[:gatekeepers]),
        accounts=tuple(members[gatekeepers:]),
        seeded=seed is not None,
        stale_stores=stale,
    )


__all__ = [
    "DEFAULT_BALANCE",
    "DEFAULT_STAKE",
    "GENESIS_FILE",
    "GenesisDir",
    "Member",
    "node_config_text",
    "parse_params",
    "write_genesis_dir",
]
