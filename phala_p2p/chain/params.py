"""Chain parameters and the genesis document.

Every parameter is an integer (times in milliseconds, fractions in parts per million) so that
governance can change any of them with one ``(name, value)`` pair and so that the state root
never depends on float formatting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from phala_p2p.errors import UsageError

PPM = 1_000_000
MAX_CHAIN_ID_LEN = 64
MAX_GENESIS_ENTRIES = 10_000
MAX_HEARTBEAT_CHALLENGES = 1_024  # bounds the liveness work of one block
MAX_HEARTBEAT_WINDOW = 10_000


@dataclass(frozen=True)
class ChainParams:
    """Consensus and ledger parameters; governance may change any of them (see ledger.md)."""

    block_time_ms: int = 1_000
    timeout_propose_ms: int = 3_000
    timeout_propose_delta_ms: int = 500
    timeout_prevote_ms: int = 1_000
    timeout_prevote_delta_ms: int = 500
    timeout_precommit_ms: int = 1_000
    timeout_precommit_delta_ms: int = 500
    max_clock_drift_ms: int = 10_000
    unbonding_blocks: int = 100
    min_stake: int = 1_000
    tx_fee: int = 1
    slash_fraction_ppm: int = 50_000
    voting_period_blocks: int = 50
    evidence_max_age_blocks: int = 1_000
    max_block_txs: int = 500
    max_tx_size: int = 4_096
    max_block_bytes: int = 917_504  # a proposal must fit one gossip message (1 MiB)
    min_miner_stake: int = 1_000
    max_attest_tx_size: int = 66_000  # a miner registration carries a quote and collateral
    attest_max_age_ms: int = 600_000
    accept_tcb_mask: int = 1  # bit i accepts miners.TCB_STATUSES[i]; 1: UpToDate only
    key_epoch_blocks: int = 600  # cluster keys rotate every this many blocks
    key_retention_epochs: int = 2  # epoch keys older than this many epochs are erased
    # miner liveness challenges (chain/liveness.py, protocols/settlement.md); 0 turns them off
    heartbeat_challenge_ppm: int = 0  # chance that an active miner is challenged in a block
    heartbeat_max_challenges: int = 64  # at most this many miners challenged per block
    heartbeat_window_blocks: int = 10  # a challenge at h is answered in blocks h+1..h+window
    heartbeat_slash_ppm: int = 10_000  # share of the operator's stake slashed per miss
    heartbeat_max_misses: int = 3  # misses in a row that revoke a miner

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(value) is not int:
                raise UsageError(f"ChainParams.{f.name} must be an int, got {value!r}")
            if value < 0:
                raise UsageError(f"ChainParams.{f.name} must be >= 0, got {value}")
        positive = (
            "timeout_propose_ms",
            "timeout_prevote_ms",
            "timeout_precommit_ms",
            "unbonding_blocks",
            "min_stake",
            "voting_period_blocks",
            "evidence_max_age_blocks",
            "max_block_txs",
            "max_tx_size",
            "max_block_bytes",
            "key_epoch_blocks",
            "heartbeat_window_blocks",
            "heartbeat_max_misses",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"ChainParams.{name} must be > 0")
        for name in ("slash_fraction_ppm", "heartbeat_challenge_ppm", "heartbeat_slash_ppm"):
            if getattr(self, name) > PPM:
                raise UsageError(f"ChainParams.{name} must be <= 1_000_000")
        for name, most in (
            ("heartbeat_max_challenges", MAX_HEARTBEAT_CHALLENGES),
            ("heartbeat_window_blocks", MAX_HEARTBEAT_WINDOW),
        ):
            if getattr(self, name) > most:
                raise UsageError(f"ChainParams.{name} must be <= {most}")
        if not self.max_tx_size <= self.max_attest_tx_size <= 70_000:
            raise UsageError("ChainParams.max_attest_tx_size must be in max_tx_size..70000")
        if self.accept_tcb_mask >= 1 << 16:
            raise UsageError("ChainParams.accept_tcb_mask has unknown bits")
        if self.max_tx_size > self.max_block_bytes:
            raise UsageError("ChainParams.max_tx_size must be <= max_block_bytes")
        if self.max_block_bytes > 16 * 1024 * 1024:
            raise UsageError("ChainParams.max_block_bytes must be <= 16 MiB")
        if self.max_block_txs > 100_000:
            raise UsageError("ChainParams.max_block_txs must be <= 100_000")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def with_change(self, name: str, value: int) -> ChainParams:
        """A copy with one parameter changed; UsageError if the name or value is invalid."""
        if name not in self.names():
            raise UsageError(f"unknown chain parameter {name!r}")
        return dataclasses.replace(self, **{name: value})

    def with_changes(self, changes: dict[str, int]) -> ChainParams:
        """A copy with several parameters changed (UsageError for unknown names)."""
        unknown = set(changes) - set(self.names())
        if unknown:
            raise UsageError(f"unknown chain parameters: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.names()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChainParams:
        unknown = set(data) - set(cls.names())
        if unknown:
            raise UsageError(f"unknown chain parameters: {sorted(unknown)}")
        return cls(**{k: v for k, v in data.items()})

    def timeout_propose(self, round_: int) -> float:
        """Seconds to wait for a proposal in ``round_`` (grows linearly per round)."""
        return (self.timeout_propose_ms + round_ * self.timeout_propose_delta_ms) / 1000

    def timeout_prevote(self, round_: int) -> float:
        return (self.timeout_prevote_ms + round_ * self.timeout_prevote_delta_ms) / 1000

    def timeout_precommit(self, round_: int) -> float:
        return (self.timeout_precommit_ms + round_ * self.timeout_precommit_delta_ms) / 1000


def _check_key(value: Any, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != 32:
        raise UsageError(f"{what} must be 32 bytes")
    return value


def _check_amount(value: Any, what: str, *, positive: bool = False) -> int:
    if type(value) is not int or value < 0 or (positive and value == 0):
        raise UsageError(f"{what} must be a {'positive' if positive else 'non-negative'} int")
    return value


@dataclass(frozen=True)
class Genesis:
    """The first state of the chain. ``genesis_time`` is Unix seconds."""

    chain_id: str
    genesis_time: int
    gatekeepers: tuple[tuple[bytes, int], ...]
    accounts: tuple[tuple[bytes, int], ...] = ()
    params: ChainParams = field(default_factory=ChainParams)
    attestation_roots: tuple[bytes, ...] = ()
    allowed_measurements: tuple[bytes, ...] = ()
    treasury: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "gatekeepers", tuple(tuple(g) for g in self.gatekeepers))
        object.__setattr__(self, "accounts", tuple(tuple(a) for a in self.accounts))
        object.__setattr__(self, "attestation_roots", tuple(self.attestation_roots))
        object.__setattr__(self, "allowed_measurements", tuple(self.allowed_measurements))
        if not isinstance(self.chain_id, str) or not 0 < len(self.chain_id) <= MAX_CHAIN_ID_LEN:
            raise UsageError(f"chain_id must be 1..{MAX_CHAIN_ID_LEN} characters")
        if not self.chain_id.isascii() or not self.chain_id.isprintable():
            raise UsageError("chain_id must be printable ASCII")
        _check_amount(self.genesis_time, "genesis_time")
        _check_amount(self.treasury, "treasury")
        if not isinstance(self.params, ChainParams):
            raise UsageError("params must be ChainParams")
        if not self.gatekeepers:
            raise UsageError("genesis needs at least one gatekeeper")
        for what, entries in (("gatekeepers", self.gatekeepers), ("accounts", self.accounts)):
            if len(entries) > MAX_GENESIS_ENTRIES:
                raise UsageError(f"too many genesis {what}")
            seen: set[bytes] = set()
            for entry in entries:
                if len(entry) != 2:
                    raise UsageError(f"genesis {what} entries are (pubkey, amount) pairs")
                key = _check_key(entry[0], f"genesis {what} pubkey")
                if key in seen:
                    raise UsageError(f"duplicate genesis {what} entry {key.hex()}")
                seen.add(key)
                _check_amount(entry[1], f"genesis {what} amount", positive=what == "gatekeepers")
        for pubkey, stake in self.gatekeepers:
            if stake < self.params.min_stake:
                raise UsageError(f"genesis gatekeeper {pubkey.hex()} stake below min_stake")
        for what, items in (
            ("attestation_roots", self.attestation_roots),
            ("allowed_measurements", self.allowed_measurements),
        ):
            if len(items) > MAX_GENESIS_ENTRIES:
                raise UsageError(f"too many genesis {what}")
            for item in items:
                if not isinstance(item, bytes) or not 0 < len(item) <= 256:
                    raise UsageError(f"genesis {what} entries must be 1..256 bytes")

    @property
    def genesis_time_ms(self) -> int:
        return self.genesis_time * 1000

    def canonical(self) -> list[Any]:
        """The msgpack array hashed by ``genesis_hash`` (see protocols/ledger.md)."""
        return [
            self.chain_id,
            self.genesis_time,
            [list(g) for g in self.gatekeepers],
            [list(a) for a in self.accounts],
            [[name, value] for name, value in self.params.as_dict().items()],
            list(self.attestation_roots),
            list(self.allowed_measurements),
            self.treasury,
        ]

    @property
    def genesis_hash(self) -> bytes:
        packed = msgpack.packb(self.canonical(), use_bin_type=True)
        return hashlib.sha256(b"phala/genesis/1\x00" + packed).digest()

    # -- TOML ---------------------------------------------------------------------------

    @classmethod
    def from_toml(cls, path: str | Path) -> Genesis:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise UsageError(f"cannot read genesis {path}: {err}") from err
        return cls.from_toml_dict(data)

    @classmethod
    def from_toml_str(cls, text: str) -> Genesis:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"bad genesis TOML: {err}") from err
        return cls.from_toml_dict(data)

    @classmethod
    def from_toml_dict(cls, data: dict[str, Any]) -> Genesis:
        known = {
            "chain_id",
            "genesis_time",
            "treasury",
            "params",
            "gatekeepers",
            "accounts",
            "attestation_roots",
            "allowed_measurements",
        }
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown genesis keys: {sorted(unknown)}")

        def unhex(value: Any, what: str) -> bytes:
            if not isinstance(value, str):
                raise UsageError(f"{what} must be a hex string")
            try:
                return bytes.fromhex(value)
            except ValueError as err:
                raise UsageError(f"{what} is not hex") from err

        def pairs(name: str, amount_key: str) -> tuple[tuple[bytes, int], ...]:
            raw = data.get(name, [])
            if not isinstance(raw, list):
                raise UsageError(f"{name} must be an array of tables")
            out = []
            for item in raw:
                if not isinstance(item, dict) or set(item) != {"pubkey", amount_key}:
                    raise UsageError(f"each {name} entry needs exactly pubkey and {amount_key}")
                out.append((unhex(item["pubkey"], f"{name}.pubkey"), item[amount_key]))
            return tuple(out)

        def hexlist(name: str) -> tuple[bytes, ...]:
            raw = data.get(name, [])
            if not isinstance(raw, list):
                raise UsageError(f"{name} must be an array of hex strings")
            return tuple(unhex(v, name) for v in raw)

        params_raw = data.get("params", {})
        if not isinstance(params_raw, dict):
            raise UsageError("params must be a table")
        try:
            return cls(
                chain_id=data.get("chain_id", ""),
                genesis_time=data.get("genesis_time", -1),
                gatekeepers=pairs("gatekeepers", "stake"),
                accounts=pairs("accounts", "balance"),
                params=ChainParams.from_dict(params_raw),
                attestation_roots=hexlist("attestation_roots"),
                allowed_measurements=hexlist("allowed_measurements"),
                treasury=data.get("treasury", 0),
            )
        except TypeError as err:
            raise UsageError(f"bad genesis: {err}") from err

    def to_toml(self) -> str:
        def q(s: str) -> str:
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

        def hexes(items: tuple[bytes, ...]) -> str:
            return "[" + ", ".join(q(i.hex()) for i in items) + "]"

        lines = [
            f"chain_id = {q(self.chain_id)}",
            f"genesis_time = {self.genesis_time}",
            f"treasury = {self.treasury}",
            f"attestation_roots = {hexes(self.attestation_roots)}",
            f"allowed_measurements = {hexes(self.allowed_measurements)}",
            "",
            "[params]",
        ]
        lines += [f"{name} = {value}" for name, value in self.params.as_dict().items()]
        for pubkey, stake in self.gatekeepers:
            lines += ["", "[[gatekeepers]]", f"pubkey = {q(pubkey.hex())}", f"stake = {stake}"]
        for pubkey, balance in self.accounts:
            lines += ["", "[[accounts]]", f"pubkey = {q(pubkey.hex())}", f"balance = {balance}"]
        return "\n".join(lines) + "\n"

    def write_toml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())
