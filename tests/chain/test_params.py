"""ChainParams validation and the genesis document (TOML round trip, hash)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from phala_p2p.chain.params import ChainParams, Genesis
from phala_p2p.errors import UsageError

from .helpers import FAST, genesis, identities


def test_defaults_are_valid_and_all_ints() -> None:
    p = ChainParams()
    assert all(type(v) is int for v in p.as_dict().values())
    assert p.timeout_propose(0) < p.timeout_propose(1) < p.timeout_propose(5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("min_stake", 0),
        ("unbonding_blocks", 0),
        ("slash_fraction_ppm", 1_000_001),
        ("tx_fee", -1),
        ("block_time_ms", 1.5),
        ("max_tx_size", 2 * 1024 * 1024),
        ("max_block_bytes", 64 * 1024 * 1024),
    ],
)
def test_bad_params_are_refused(name: str, value: object) -> None:
    with pytest.raises(UsageError):
        ChainParams().with_change(name, value)  # type: ignore[arg-type]


def test_unknown_param_is_refused() -> None:
    with pytest.raises(UsageError):
        ChainParams().with_change("nope", 1)
    with pytest.raises(UsageError):
        ChainParams.from_dict({"nope": 1})


def test_genesis_toml_round_trip(tmp_path: Path) -> None:
    ids = identities(3)
    g = replace(
        genesis(ids[:2], accounts=[(ids[2], 77)], treasury=5),
        attestation_roots=(b"\x01" * 32,),
        allowed_measurements=(b"\x02" * 48, b"\x03" * 48),
    )
    path = tmp_path / "genesis.toml"
    g.write_toml(path)
    back = Genesis.from_toml(path)
    assert back == g
    assert back.genesis_hash == g.genesis_hash
    assert back.params == FAST


def test_genesis_hash_changes_with_any_field() -> None:
    ids = identities(2)
    g = genesis(ids)
    variants = [
        replace(g, chain_id="other"),
        replace(g, genesis_time=g.genesis_time + 1),
        replace(g, treasury=1),
        replace(g, params=FAST.with_change("tx_fee", 2)),
        replace(g, allowed_measurements=(b"m",)),
    ]
    assert len({v.genesis_hash for v in variants} | {g.genesis_hash}) == len(variants) + 1


@pytest.mark.parametrize(
    "text",
    [
        'chain_id = "x"\ngenesis_time = 1\n',  # no gatekeepers
        'chain_id = "x"\ngenesis_time = 1\n[[gatekeepers]]\npubkey = "zz"\nstake = 5000\n',
        'chain_id = "x"\ngenesis_time = 1\n[[gatekeepers]]\npubkey = "'
        + "ab" * 32
        + '"\nstake = 1\n',  # below min_stake
        'chain_id = "x"\ngenesis_time = 1\nsurprise = 1\n',
        'chain_id = "x"\ngenesis_time = 1\n[params]\nblock_time_ms = "fast"\n',
        "not toml at all [",
    ],
)
def test_bad_genesis_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError):
        Genesis.from_toml_str(text)


def test_duplicate_genesis_keys_are_refused() -> None:
    ids = identities(1)
    with pytest.raises(UsageError):
        Genesis("c", 1, ((ids[0].public_key, 5_000), (ids[0].public_key, 5_000)))
