"""Node configuration: frozen, validated, loadable from TOML."""

from __future__ import annotations

import enum
import ipaddress
import json
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import multiaddr
import multiaddr.exceptions

from phala_p2p.errors import UsageError
from phala_p2p.net.gossip import GossipConfig
from phala_p2p.net.health import HealthConfig
from phala_p2p.net.host import HostLimits


class Role(enum.StrEnum):
    BOOTSTRAP = "bootstrap"
    GATEKEEPER = "gatekeeper"
    MINER = "miner"
    CLIENT = "client"

    @property
    def dht_server(self) -> bool:
        """Gatekeepers and bootstrap nodes answer DHT and rendezvous queries."""
        return self in (Role.BOOTSTRAP, Role.GATEKEEPER)


DEFAULT_LISTEN = ("/ip4/127.0.0.1/tcp/0",)


@dataclass(frozen=True)
class DiscoveryConfig:
    """How a node finds others: bootstrap list, rendezvous per role, optional mDNS."""

    target_peers: int = 12
    interval: float = 2.0
    mdns: bool = False  # LAN discovery is opt-in
    rendezvous_ttl: int = 7200

    def __post_init__(self) -> None:
        if self.target_peers < 1 or self.interval <= 0:
            raise UsageError("discovery: target_peers >= 1 and interval > 0")
        if not 120 <= self.rendezvous_ttl <= 72 * 3600:
            raise UsageError("discovery: rendezvous_ttl must be between 2 minutes and 72 hours")


@dataclass(frozen=True)
class ChainConfig:
    """Node-local chain settings (the chain's own parameters are in its genesis)."""

    durable: bool = True  # fsync each block before acknowledging it (off only for tests)
    rebroadcast_interval: float = 2.0  # re-send own consensus messages when a height stalls
    sync_interval: float = 3.0  # ask for blocks after this long (or 2 block times) without one
    sync_batch: int = 64  # blocks per sync request
    resend_interval: float = 3.0  # publish own pending transactions again after this long
    receipt_timeout: float = 60.0  # wallet calls give up waiting for finality after this
    mempool_max_txs: int = 10_000
    mempool_max_bytes: int = 16 * 1024 * 1024
    byzantine_double_sign: bool = False  # TESTS ONLY: double-sign every vote

    def __post_init__(self) -> None:
        for name in ("rebroadcast_interval", "sync_interval", "resend_interval", "receipt_timeout"):
            if not getattr(self, name) > 0:
                raise UsageError(f"[chain] {name} must be > 0")
        if not 1 <= self.sync_batch <= 64:
            raise UsageError("[chain] sync_batch must be in 1..64")
        if self.mempool_max_txs < 1 or self.mempool_max_bytes < 1:
            raise UsageError("[chain] mempool bounds must be >= 1")


@dataclass(frozen=True)
class TeeConfig:
    """The node's enclave. ``enclave``: "auto" (a simulated enclave on miners, and on
    gatekeepers that are key managers, when they name a ``dev_root_key``), "simulated", or
    "none"."""

    enclave: str = "auto"
    dev_root_key: Path | None = None  # key file of the simulated platform's attestation root
    register: bool = False  # miners: stake what is missing and register the enclave on start
    key_manager: bool = False  # gatekeepers: keep the network's master key in an enclave

    def __post_init__(self) -> None:
        if self.enclave not in ("auto", "simulated", "none"):
            raise UsageError('[tee] enclave must be "auto", "simulated" or "none"')
        if self.dev_root_key is not None and not isinstance(self.dev_root_key, Path):
            object.__setattr__(self, "dev_root_key", Path(self.dev_root_key))
        if self.enclave == "simulated" and self.dev_root_key is None:
            raise UsageError("[tee] a simulated enclave needs dev_root_key")

    def wants_enclave(self, role: Role) -> bool:
        if self.enclave == "simulated":
            return True
        if self.enclave != "auto" or self.dev_root_key is None:
            return False
        return role is Role.MINER or (role is Role.GATEKEEPER and self.key_manager)


@dataclass(frozen=True)
class JobsConfig:
    """Confidential job sessions (``protocols/job.md``).

    ``grace``: seconds a dropped session may be resumed: a client tries that long, a miner's
    enclave keeps its sessions that long (a client that comes back after the miner's grace
    gets ``JobLost``). Clients: ``window`` and ``chunk_size`` of the
    streams, ``settle_timeout`` (seconds to wait for the settlement to be final before
    ``run_job`` returns with it pending).
    Miners: ``settle_after`` (seconds after a job ends before the operator settles it with
    the enclave's last receipt, if the client has not settled it by then)."""

    grace: float = 30.0
    window: int = 8
    chunk_size: int = 256 * 1024
    settle_timeout: float = 30.0
    settle_after: float = 20.0

    def __post_init__(self) -> None:
        for name in ("grace", "settle_timeout", "settle_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise UsageError(f"[jobs] {name} must be a positive number of seconds")
        if self.grace > 86_400:
            raise UsageError("[jobs] grace must be at most one day")
        if not isinstance(self.window, int) or not 1 <= self.window <= 32:
            raise UsageError("[jobs] window must be in 1..32 (what an enclave holds for it)")
        if not isinstance(self.chunk_size, int) or not 1024 <= self.chunk_size <= 1_048_512:
            raise UsageError("[jobs] chunk_size must be in 1024..1048512")


@dataclass(frozen=True)
class MarketConfig:
    """Capacity adverts, the miner directory and negotiation (``protocols/market.md``).

    Miners: ``price`` per million fuel, ``slots`` (concurrent agreements), ``tags``,
    ``advert_ttl`` (seconds an advert is believed; re-advertised at half of it and whenever
    slots change, at most once per ``advert_interval``), and negotiation limits. Every node
    with a chain keeps a directory of at most ``max_adverts`` and pulls adverts from a peer
    when it connects and every ``sync_interval`` (gossip does not backfill).

    Clients: the escrow a client opens for a miner's operator is a standing one that covers
    ``escrow_jobs`` jobs like the one being negotiated and lasts ``escrow_lifetime`` seconds
    (or the job's deadline, if later). Later agreements with that operator draw on it while
    it covers them, so they wait for no transaction; what is left returns to the client when
    it expires. ``escrow_jobs = 1`` opens one escrow per agreement, refunded at settlement.
    """

    price: int = 1_000
    slots: int = 4
    tags: tuple[str, ...] = ()
    max_input: int | None = None  # bytes per job; default 1 TiB (streaming jobs)
    advert_ttl: float = 60.0
    advert_interval: float = 1.0
    max_rounds: int = 4
    offer_ttl: float = 10.0
    min_deadline: float = 1.0
    max_deadline: float = 3600.0
    min_escrow_blocks: int = 10
    sync_interval: float = 10.0
    max_adverts: int = 10_000
    escrow_jobs: int = 8
    escrow_lifetime: float = 3600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", tuple(self.tags))
        if not isinstance(self.price, int) or self.price < 0:
            raise UsageError("[market] price must be an int >= 0 (per million fuel)")
        if not isinstance(self.slots, int) or not 1 <= self.slots <= 1024:
            raise UsageError("[market] slots must be in 1..1024")
        if len(self.tags) > 16 or not all(
            isinstance(t, str) and 0 < len(t) <= 32 for t in self.tags
        ):
            raise UsageError("[market] tags: at most 16, each 1..32 characters")
        if len(set(self.tags)) != len(self.tags):
            raise UsageError("[market] tags must be distinct")
        if self.max_input is not None and self.max_input < 1:
            raise UsageError("[market] max_input must be >= 1")
        if not 2.0 <= self.advert_ttl <= 600.0:
            raise UsageError("[market] advert_ttl must be in 2..600 seconds")
        if not 0 < self.advert_interval <= self.advert_ttl / 2:
            raise UsageError("[market] advert_interval must be in (0, advert_ttl / 2]")
        if not 0 <= self.max_rounds <= 8:
            raise UsageError("[market] max_rounds must be in 0..8")
        for name in ("offer_ttl", "min_deadline", "max_deadline", "sync_interval"):
            if not getattr(self, name) > 0:
                raise UsageError(f"[market] {name} must be > 0")
        if self.offer_ttl > 60:
            raise UsageError("[market] offer_ttl must be at most 60 seconds")
        if self.min_deadline > self.max_deadline:
            raise UsageError("[market] min_deadline must not exceed max_deadline")
        if self.min_escrow_blocks < 0 or self.max_adverts < 1:
            raise UsageError("[market] min_escrow_blocks >= 0 and max_adverts >= 1")
        if isinstance(self.escrow_jobs, bool) or not isinstance(self.escrow_jobs, int):
            raise UsageError("[market] escrow_jobs must be an int")
        if not 1 <= self.escrow_jobs <= 1_000:
            raise UsageError("[market] escrow_jobs must be in 1..1000")
        if not 0 < self.escrow_lifetime <= 30 * 86_400:
            raise UsageError("[market] escrow_lifetime must be in (0, 30 days] seconds")


@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to start. ``NodeConfig.from_toml(path)`` reads one from a file."""

    role: Role = Role.CLIENT
    listen: tuple[str, ...] = DEFAULT_LISTEN
    bootstrap: tuple[str, ...] = ()
    data_dir: Path | None = None
    name: str = ""
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    dashboard: str | None = None  # "HOST:PORT" of the live dashboard (port 0: any); None: off
    gossip: GossipConfig = field(default_factory=GossipConfig)
    limits: HostLimits = field(default_factory=HostLimits)
    health: HealthConfig = field(default_factory=HealthConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    genesis: Path | None = None  # the chain's genesis TOML; None: this node keeps no chain
    wallet_key: Path | None = None  # the account's key file; None: the node's identity key
    chain: ChainConfig = field(default_factory=ChainConfig)
    tee: TeeConfig = field(default_factory=TeeConfig)
    market: MarketConfig = field(default_factory=MarketConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.role, Role):
            try:
                object.__setattr__(self, "role", Role(self.role))
            except ValueError as err:
                roles = ", ".join(r.value for r in Role)
                raise UsageError(f"unknown role {self.role!r} (one of {roles})") from err
        object.__setattr__(self, "listen", tuple(self.listen))
        object.__setattr__(self, "bootstrap", tuple(self.bootstrap))
        if not self.listen:
            raise UsageError("a node needs at least one listen address")
        for addr in self.listen:
            names = _protocol_names(addr, "listen")
            if "p2p" in names:
                raise UsageError(f"listen address {addr} must not contain /p2p/")
            if "tcp" not in names:
                raise UsageError(f"listen address {addr}: only TCP and WebSocket are supported")
        for addr in self.bootstrap:
            if "p2p" not in _protocol_names(addr, "bootstrap"):
                raise UsageError(f"bootstrap address {addr} must end with /p2p/<peer id>")
        if self.data_dir is not None and not isinstance(self.data_dir, Path):
            object.__setattr__(self, "data_dir", Path(self.data_dir))
        for name in ("genesis", "wallet_key"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise UsageError("metrics_port must be in [0, 65535]")
        if self.dashboard is not None:
            dashboard_address(self.dashboard)

    def with_(self, **changes: Any) -> NodeConfig:
        return replace(self, **changes)

    @classmethod
    def from_toml(cls, path: str | Path) -> NodeConfig:
        """Read a config file: top-level keys of ``[node]``, plus optional ``[gossip]``,
        ``[limits]``, ``[health]``, ``[discovery]``, ``[chain]``, ``[tee]``, ``[market]`` and
        ``[jobs]`` tables. Relative paths are relative to the file. Unknown keys are errors."""
        p = Path(path)
        try:
            raw = tomllib.loads(p.read_text())
        except FileNotFoundError as err:
            raise UsageError(f"config file not found: {p}") from err
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"{p}: not valid TOML: {err}") from err
        return cls.from_dict(raw, base_dir=p.parent)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base_dir: Path | None = None) -> NodeConfig:
        raw = dict(raw)
        node = dict(raw.pop("node", {}))
        sections = {
            "gossip": GossipConfig,
            "limits": HostLimits,
            "health": HealthConfig,
            "discovery": DiscoveryConfig,
            "chain": ChainConfig,
            "tee": TeeConfig,
            "market": MarketConfig,
            "jobs": JobsConfig,
        }
        kwargs: dict[str, Any] = {}
        for name, klass in sections.items():
            if name in raw:
                kwargs[name] = _build(klass, raw.pop(name), name)
        if raw:
            raise UsageError(f"unknown config sections: {', '.join(sorted(raw))}")
        allowed = {f.name for f in fields(cls)} - set(sections)
        unknown = set(node) - allowed
        if unknown:
            raise UsageError(f"unknown [node] keys: {', '.join(sorted(unknown))}")
        for key in ("data_dir", "genesis", "wallet_key"):
            if node.get(key) is not None:
                d = Path(node[key]).expanduser()
                node[key] = d if d.is_absolute() or base_dir is None else base_dir / d
        tee = kwargs.get("tee")
        if tee is not None and tee.dev_root_key is not None and base_dir is not None:
            key = tee.dev_root_key.expanduser()  # relative to the file, like the paths above
            kwargs["tee"] = replace(tee, dev_root_key=key if key.is_absolute() else base_dir / key)
        return cls(**node, **kwargs)

    def to_toml(self) -> str:
        """This config as a file :meth:`from_toml` reads back to an equal config (paths are
        written as they are: absolute paths stay valid wherever the file goes)."""
        top = [f for f in fields(self) if f.name not in _SECTIONS]
        lines = ["[node]", *_toml_lines(self, top)]
        for name in _SECTIONS:
            section = getattr(self, name)
            lines += ["", f"[{name}]", *_toml_lines(section, fields(section))]
        return "\n".join(lines) + "\n"

    def write_toml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())


def dashboard_address(value: Any) -> tuple[str, int]:
    """``(host, port)`` of a ``dashboard`` setting such as ``"127.0.0.1:8080"`` or
    ``"[::1]:0"``; UsageError otherwise. The host is ``localhost`` (bound as 127.0.0.1) or an
    explicit IP address: not a name (it could resolve anywhere) and not a wildcard such as
    0.0.0.0 (the dashboard has no login; it belongs on loopback or one chosen interface)."""
    if not isinstance(value, str):
        raise UsageError(f"dashboard must be a string HOST:PORT, not {value!r}")
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise UsageError(f"dashboard {value!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    port = int(port_text)
    if port > 65535:
        raise UsageError(f"dashboard {value!r}: port must be in [0, 65535]")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"dashboard {value!r}: write an IPv6 host in brackets, [::1]:PORT")
    if host == "localhost":
        return "127.0.0.1", port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(
            f"dashboard {value!r}: the host must be localhost or an IP address"
        ) from None
    if ip.is_unspecified or ip.is_multicast:
        raise UsageError(f"dashboard {value!r}: bind a loopback or one explicit address, not {ip}")
    return str(ip), port


_SECTIONS = ("gossip", "limits", "health", "discovery", "chain", "tee", "market", "jobs")


def _toml_lines(obj: Any, names: Any) -> list[str]:
    out = []
    for f in names:
        value = getattr(obj, f.name)
        if value is not None:  # absent keys take their default, and no default is not None
            out.append(f"{f.name} = {_toml_value(value)}")
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):  # Role is a str
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise UsageError(f"cannot write {type(value).__name__} to a config file")


def _build(klass: Any, values: Any, section: str) -> Any:
    if not isinstance(values, dict):
        raise UsageError(f"[{section}] must be a table")
    allowed = {f.name for f in fields(klass)}
    unknown = set(values) - allowed
    if unknown:
        raise UsageError(f"unknown [{section}] keys: {', '.join(sorted(unknown))}")
    try:
        return klass(**values)
    except TypeError as err:
        raise UsageError(f"[{section}]: {err}") from err


def _protocol_names(addr: str, what: str) -> set[str]:
    try:
        return {p.name for p in multiaddr.Multiaddr(addr).protocols()}
    except (ValueError, multiaddr.exceptions.Error) as err:
        raise UsageError(f"{what} address {addr!r} is not a multiaddr: {err}") from err
