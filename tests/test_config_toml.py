"""NodeConfig.to_toml / write_toml: what a launcher writes, a node reads back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from phala_p2p.config import DiscoveryConfig, MarketConfig, NodeConfig, Role, TeeConfig
from phala_p2p.errors import UsageError
from phala_p2p.net.health import HealthConfig

PEER = "12D3KooWQAqRU6avn8GNGEYEmu6SUC4ByiG1MQnXDcUWxUr4E5BV"


def test_default_config_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    NodeConfig().write_toml(path)
    assert NodeConfig.from_toml(path) == NodeConfig()


def test_every_section_and_awkward_strings_round_trip(tmp_path: Path) -> None:
    cfg = NodeConfig(
        role=Role.MINER,
        bootstrap=(f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}",),
        data_dir=tmp_path / 'a "quoted" dir',
        name='back\\slash, "quote", new\nline, é',
        metrics_port=0,
        genesis=tmp_path / "genesis.toml",
        health=HealthConfig(interval=2.5, dead_after=9.0, enabled=False),
        discovery=DiscoveryConfig(target_peers=3, interval=0.25),
        tee=TeeConfig(dev_root_key=tmp_path / "root.key", register=True),
        market=MarketConfig(price=7, slots=3, tags=("gpu", "eu"), max_input=4096),
    )
    path = tmp_path / "miner.toml"
    cfg.write_toml(path)
    back = NodeConfig.from_toml(path)
    assert back == cfg
    assert back.market.tags == ("gpu", "eu")
    assert back.name == cfg.name


def test_changed_values_are_written_not_defaults(tmp_path: Path) -> None:
    text = NodeConfig(market=MarketConfig(price=123_456)).to_toml()
    assert "price = 123456" in text
    assert "[market]" in text
    assert "data_dir" not in text  # None: left to the default


def test_a_value_of_an_unknown_type_is_a_clear_error() -> None:
    cfg = NodeConfig()
    object.__setattr__(cfg, "name", {"not": "writable"})
    with pytest.raises(UsageError, match="cannot write dict"):
        cfg.to_toml()


def test_relative_key_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text(
        '[node]\nrole = "miner"\nwallet_key = "keys/wallet.key"\n'
        '[tee]\ndev_root_key = "keys/root.key"\n'
    )
    cfg = NodeConfig.from_toml(tmp_path / "node.toml")
    assert cfg.wallet_key == tmp_path / "keys" / "wallet.key"
    assert cfg.tee.dev_root_key == tmp_path / "keys" / "root.key"
    absolute = tmp_path / "elsewhere.key"
    (tmp_path / "abs.toml").write_text(f'[tee]\ndev_root_key = "{absolute}"\n')
    assert NodeConfig.from_toml(tmp_path / "abs.toml").tee.dev_root_key == absolute
