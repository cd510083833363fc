"""The operator commands of ``phala-p2p`` (``chain status``, ``stake``, ``unstake``,
``propose``, ``vote``, ``miners``) and what they share with ``job run``: the connection
options, the client node's config, starting that node and waiting for the network.

Each command starts a client node of its own (a fresh peer id unless ``--data-dir`` names
one), waits for a bootstrap peer and the chain, does its one thing, prints a few lines on
stdout and stops. With ``--json`` it prints one object instead: for a refused transaction
too (``ok`` false, the chain's reason), none if it got no answer. Exit status: 0 done; 1 the
network or the chain said no (unreachable, not synced, a refused transaction: the line gives
the chain's reason); 2 a mistake found before the node starts (a bad amount, a missing
file); 130 interrupted. Never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import base58
import trio

from phala_p2p.config import NodeConfig, Role
from phala_p2p.errors import P2PError, UsageError

if TYPE_CHECKING:
    from phala_p2p.chain.bodies import GovPropose
    from phala_p2p.market.directory import Advert
    from phala_p2p.node import Node
    from phala_p2p.services.chain import Receipt

T = TypeVar("T")
Note = Callable[[str], None]  # a progress line for stderr

COMMANDS: Final = ("chain", "stake", "unstake", "propose", "vote", "miners")
DEFAULT_WAIT: Final = 30.0
MAX_AMOUNT: Final = 2**63 - 1  # the chain's bound on any amount or parameter value
HEAD_TIMEOUT: Final = 5.0  # seconds a peer has to tell its head height
MAX_HEAD_PEERS: Final = 8  # peers asked for their head height
MAX_HEAD_ANSWER: Final = 1024  # bytes of an answer that carries no block

logger = logging.getLogger("phala_p2p.cli")


class NetworkFailure(P2PError):
    """No bootstrap peer answered, or the chain did not sync in time (exit status 1)."""


class CommandFailure(P2PError):
    """The network or the chain failed the command (exit status 1)."""


class NodeStartFailed(UsageError):
    """The client node did not start: a bad data dir or key, say (exit status 2)."""


def fail(message: str) -> None:
    """The one line a failed command ends with."""
    print(f"phala-p2p: error: {message}", file=sys.stderr, flush=True)


# -- what job run and the operator commands share -----------------------------------------


def add_connection_options(p: argparse.ArgumentParser, *, wait_help: str) -> None:
    p.add_argument(
        "--wait", type=float, default=DEFAULT_WAIT, metavar="S", help=f"{wait_help}; default 30"
    )
    p.add_argument("--config", type=Path, metavar="FILE", help="the client's node config")
    p.add_argument("--bootstrap", action="append", metavar="ADDR", help="(repeatable)")
    p.add_argument("--genesis", type=Path, metavar="FILE", help="the chain's genesis TOML")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="the client's identity")
    p.add_argument("--wallet-key", type=Path, metavar="FILE", help="the account's key file")


def client_config(
    args: argparse.Namespace, command: str, *, signs: str | None, any_role: bool = False
) -> NodeConfig:
    """The client node's config: ``--config`` (or defaults) with the connection options
    applied, checked before the node starts. ``signs`` names what the account signs ("pay
    for the job"), None if the command signs nothing. With ``any_role``, a gatekeeper's or a
    miner's config is taken as that node's account and chain: the command still starts a
    client, with a fresh peer id and no data dir (the node itself may be running)."""
    from phala_p2p.chain.params import Genesis
    from phala_p2p.crypto.keyfile import KEY_FILE_NAME, read_identity

    cfg = NodeConfig.from_toml(args.config) if args.config else NodeConfig(role=Role.CLIENT)
    if cfg.role is not Role.CLIENT:
        if not any_role:
            raise UsageError(
                f"{command} starts a client node: {args.config} is a {cfg.role} config"
            )
        key = cfg.wallet_key
        if key is None and cfg.data_dir is not None:
            key = cfg.data_dir / KEY_FILE_NAME
        cfg = NodeConfig(
            role=Role.CLIENT,
            bootstrap=cfg.bootstrap,
            genesis=cfg.genesis,
            wallet_key=key,
            chain=cfg.chain,
            discovery=cfg.discovery,
        )
    changes: dict[str, Any] = {}
    if args.bootstrap:
        changes["bootstrap"] = tuple(args.bootstrap)
    if args.genesis:
        changes["genesis"] = args.genesis
    if args.data_dir:
        changes["data_dir"] = args.data_dir
    if args.wallet_key:
        changes["wallet_key"] = args.wallet_key
    cfg = cfg.with_(**changes) if changes else cfg
    if cfg.genesis is None:
        raise UsageError(f"{command} needs the chain: set genesis in the config or pass --genesis")
    Genesis.from_toml(cfg.genesis)
    if not cfg.bootstrap:
        raise UsageError(f"{command} needs a bootstrap address: set bootstrap or pass --bootstrap")
    if cfg.wallet_key is not None:
        read_identity(cfg.wallet_key)
    elif cfg.data_dir is None and signs is not None:
        verb = "pays" if signs.startswith("pay") else "signs"
        raise UsageError(
            f"nothing would {signs}: set wallet_key (a funded account's key file) "
            f"or data_dir (whose identity's account {verb})"
        )
    if not args.wait > 0:
        raise UsageError("--wait must be > 0 seconds")
    return cfg


async def with_client_node(config: NodeConfig, work: Callable[[Node], Awaitable[T]]) -> T:
    """Start a client node, run ``work`` on it, stop it. An expected failure of ``work``
    (``P2PError``, ``OSError``, ``TimeoutError``) comes out as itself, not wrapped in the
    node's nursery's group; a node that does not start raises :class:`NodeStartFailed`."""
    from phala_p2p.node import open_node

    done: list[T] = []
    failed: list[Exception] = []
    try:
        async with open_node(config) as node:
            try:
                done.append(await work(node))
            except (P2PError, OSError, TimeoutError) as err:
                failed.append(err)
    except (P2PError, OSError) as err:
        raise NodeStartFailed(f"cannot start the client node: {err}") from err
    if failed:
        raise failed[0]
    return done[0]


async def await_network(
    node: Node,
    config: NodeConfig,
    wait: float,
    note: Note,
    *,
    accept_stale: bool = False,
) -> bool:
    """Until a bootstrap peer answered and the chain is synced, within ``wait`` seconds;
    True then. Synced: the head is as high as the highest head the connected peers report,
    and recent. (A recent head alone is not enough: on a fast chain the clock-drift slack
    spans many blocks, and a stale head signs with a stale nonce.) With ``accept_stale``, a
    head that no peer has anything newer than is reported as it is, however old (a halted
    chain): False, and no error."""
    deadline = trio.current_time() + wait
    note("connecting to the network")
    with trio.move_on_at(deadline):
        await node.discovery.bootstrapped.wait()
    if not node.discovery.bootstrapped.is_set():
        addrs = ", ".join(config.bootstrap)
        raise NetworkFailure(f"no bootstrap peer answered within {wait:g}s ({addrs})")
    chain = node.chain
    note("syncing the chain")
    params = chain.params
    slack_ms = params.max_clock_drift_ms + 5 * params.block_time_ms
    target = 0  # the highest head a peer reported
    with trio.move_on_at(deadline):
        while True:
            heads = await peer_heads(node, timeout=HEAD_TIMEOUT)
            target = max([target, *heads])
            if chain.head.height < target:
                await chain.sync_once()
                with suppress(TimeoutError):  # gossip, or the node's own syncer, may get there
                    await chain.wait_for_height(target, timeout=0.5)
                continue
            if not heads:  # nobody answered (yet): ask again in a moment
                await trio.sleep(0.5)
                continue
            if time.time() * 1000 - chain.head.time_ms <= slack_ms:
                return True
            if accept_stale:
                return False
            with suppress(TimeoutError):  # the chain may resume
                await chain.wait_for_height(chain.head.height + 1, timeout=1.0)
    if accept_stale and chain.head.height >= target > 0:
        return False
    age = time.time() - chain.head.time_ms / 1000
    peers = f"; peers have {target}" if target > chain.head.height else ""
    raise NetworkFailure(
        f"the chain did not sync within {wait:g}s "
        f"(at height {chain.head.height}, a block {age:.0f}s old{peers})"
    )


async def peer_heads(node: Node, *, timeout: float) -> list[int]:
    """The head heights that connected peers (a few) report over the sync protocol: a
    request for a block beyond any chain, answered with no block and the peer's head."""
    from phala_p2p.chain.block import MAX_HEIGHT
    from phala_p2p.chain.sync import SYNC_PROTOCOL, SyncRequest, SyncResponse
    from phala_p2p.wire.codec import decode, encode

    request = encode(SyncRequest(MAX_HEIGHT, 1))
    heads: list[int] = []

    async def ask(peer: str) -> None:
        try:
            raw = await node.request(
                peer, SYNC_PROTOCOL, request, timeout=timeout, max_response=MAX_HEAD_ANSWER
            )
            heads.append(decode(raw, max_size=MAX_HEAD_ANSWER, expect=SyncResponse).head_height)
        except P2PError as err:  # a peer that keeps no chain, one that is slow: the others
            logger.info("no head height from %s: %s", peer, err)

    async with trio.open_nursery() as nursery:
        for peer in node.peers()[:MAX_HEAD_PEERS]:
            nursery.start_soon(ask, peer)
    return heads


# -- parsers --------------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """The operator commands' parsers, on ``phala-p2p``'s subparsers."""
    wait = "seconds to wait for a bootstrap peer and the chain"

    def command(name: str, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, **kw)
        return p

    def common(p: argparse.ArgumentParser, wait_help: str = wait) -> None:
        add_connection_options(p, wait_help=wait_help)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress lines, no warnings")
        p.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object"
        )

    chain = command("chain", help="the chain as the network has it")
    chain_sub = chain.add_subparsers(dest="chain_command", required=True)
    status = chain_sub.add_parser(
        "status",
        help="height, head, gatekeepers, your account",
        description="Chain id, height, head hash, the age of the last block, the gatekeepers "
        "and their stake, open proposals, and the account's balance, stake and unbonding "
        "(the account of --wallet-key or --data-dir, if one is given). A chain that no peer "
        "has newer blocks of is reported as it is (synced: false).",
    )
    common(status)

    for name, what in (
        ("stake", "bond AMOUNT of the balance"),
        ("unstake", "start unbonding AMOUNT of the stake"),
    ):
        p = command(
            name,
            help=what,
            description=f"Sign and submit a {name} transaction from the account, wait until it "
            "is final and print the outcome. Exit status 1 if the chain refuses it (the "
            "line gives its reason).",
        )
        p.add_argument("amount", metavar="AMOUNT", help="a positive integer")
        common(p)

    kinds = ", ".join(_kinds())
    propose = command(
        "propose",
        help="make a governance proposal (stakers only)",
        description=f"KIND is one of {kinds}. param_change: --param NAME --value V; "
        "gatekeeper_add, gatekeeper_remove: --account; measurement_allow, "
        "measurement_revoke: --measurement HEX; treasury_spend: --account and --amount. "
        "The proposal passes when more than half of the stake that votes says yes.",
    )
    propose.add_argument("kind", metavar="KIND")
    propose.add_argument("--param", metavar="NAME", help="a chain parameter")
    propose.add_argument("--value", metavar="V", help="its new value (an integer)")
    propose.add_argument("--account", metavar="ACCOUNT", help="64 hex digits, or a peer id")
    propose.add_argument("--measurement", metavar="HEX", help="an enclave measurement")
    propose.add_argument("--amount", metavar="N", help="for treasury_spend")
    common(propose)

    vote = command("vote", help="vote on a governance proposal")
    vote.add_argument("proposal_id", metavar="PROPOSAL_ID")
    vote.add_argument("choice", metavar="yes|no", help="yes or no")
    common(vote)

    miners = command(
        "miners",
        help="the miner directory, best first",
        description="The verified capacity adverts the network holds, ranked (--sort), "
        "with the filters given.",
    )
    miners.add_argument("--min-cores", type=int, default=1, metavar="N")
    miners.add_argument("--max-price", type=int, metavar="P", help="per million fuel")
    miners.add_argument("--min-free-slots", type=int, default=0, metavar="N", help="default 0")
    miners.add_argument("--tags", default="", metavar="T1,T2", help="every one advertised")
    miners.add_argument("--limit", type=int, metavar="N")
    miners.add_argument("--sort", choices=("price", "capacity", "latency"), default="price")
    common(miners, wait + " (and a first advert)")


def _kinds() -> list[str]:
    from phala_p2p.chain.bodies import ProposalAction

    return [str(a) for a in ProposalAction]


# -- plans: everything checked before a node starts -----------------------------------------


@dataclass
class Plan:
    name: str  # the command, as the lines name it
    config: NodeConfig
    wait: float
    as_json: bool
    quiet: bool
    work: Callable[[Node, Plan, Note], Awaitable[Report]]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """What a command found: ``result`` for --json, ``lines`` for people, ``error`` (the
    failure line, exit status 1) when the chain said no."""

    result: dict[str, Any]
    lines: list[str]
    error: str | None = None


def plan(args: argparse.Namespace) -> Plan:
    """The command's plan; UsageError (exit status 2) for a mistake in the arguments."""
    as_json = bool(getattr(args, "json", False))
    name: str = args.command
    options: dict[str, Any] = {}
    signs: str | None = None
    work: Callable[[Node, Plan, Note], Awaitable[Report]]
    if name == "chain":
        name, work = "chain status", _status
    elif name in ("stake", "unstake"):
        options["amount"] = _positive(args.amount, "AMOUNT")
        signs, work = f"sign the {name}", _stake
    elif name == "propose":
        options["body"] = _proposal(args)
        signs, work = "sign the proposal", _propose
    elif name == "vote":
        options["proposal_id"] = _count(args.proposal_id, "PROPOSAL_ID")
        choice = args.choice.lower()
        if choice not in ("yes", "no"):
            raise UsageError(f"vote yes or no, not {args.choice!r}")
        options["yes"] = choice == "yes"
        signs, work = "sign the vote", _vote
    elif name == "miners":
        options["constraints"] = _constraints(args)
        work = _miners
    else:  # pragma: no cover (argparse allows no other)
        raise UsageError(f"unknown command {name}")
    config = client_config(args, name, signs=signs, any_role=True)
    return Plan(name, config, args.wait, as_json, args.quiet, work, options)


def _positive(text: str, what: str) -> int:
    value = _count(text, what)
    if value == 0:
        raise UsageError(f"{what} must be a positive integer, not {text!r}")
    return value


def _count(text: str, what: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0 or value > MAX_AMOUNT:
        raise UsageError(f"{what} must be an integer in 0..2^63-1, not {text!r}")
    return value


def _account(text: str) -> bytes:
    """An account: 64 hex digits (its public key) or an Ed25519 peer id."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) == 32:
        return raw
    try:
        decoded = base58.b58decode(text)
    except ValueError:
        decoded = b""
    # an identity multihash of the protobuf-encoded key: Ed25519 (1), 32 bytes
    prefix = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
    if len(decoded) == 38 and decoded.startswith(prefix):
        return decoded[len(prefix) :]
    raise UsageError(f"--account {text!r} is neither 64 hex digits nor an Ed25519 peer id")


def _proposal(args: argparse.Namespace) -> GovPropose:
    from phala_p2p.chain.bodies import GovPropose, ProposalAction
    from phala_p2p.chain.params import ChainParams
    from phala_p2p.errors import ProtocolViolation

    kind = args.kind.lower().replace("-", "_")
    try:
        action = ProposalAction(kind)
    except ValueError as err:
        kinds = ", ".join(_kinds())
        raise UsageError(f"unknown proposal kind {args.kind!r} (one of {kinds})") from err
    uses = {
        ProposalAction.PARAM_CHANGE: ("param", "value"),
        ProposalAction.GATEKEEPER_ADD: ("account",),
        ProposalAction.GATEKEEPER_REMOVE: ("account",),
        ProposalAction.MEASUREMENT_ALLOW: ("measurement",),
        ProposalAction.MEASUREMENT_REVOKE: ("measurement",),
        ProposalAction.TREASURY_SPEND: ("account", "amount"),
    }[action]
    for name in ("param", "value", "account", "measurement", "amount"):
        given = getattr(args, name) is not None
        if name in uses and not given:
            raise UsageError(f"a {action} proposal needs --{name}")
        if name not in uses and given:
            raise UsageError(f"--{name} is not for a {action} proposal")
    fields: dict[str, Any] = {}
    if args.param is not None:
        if args.param not in ChainParams.names():
            raise UsageError(f"unknown chain parameter {args.param!r}")
        fields["param"] = args.param
    if args.value is not None:
        fields["value"] = _count(args.value, "--value")
    if args.account is not None:
        fields["account"] = _account(args.account)
    if args.measurement is not None:
        try:
            fields["measurement"] = bytes.fromhex(args.measurement)
        except ValueError as err:
            raise UsageError(f"--measurement {args.measurement!r} is not hex") from err
    if args.amount is not None:
        fields["amount"] = _positive(args.amount, "--amount")
    body = GovPropose(action, **fields)
    try:
        body.validate()
    except ProtocolViolation as err:
        raise UsageError(f"bad proposal: {err}") from err
    return body


def _constraints(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("min_cores", "max_price", "min_free_slots", "limit"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    tags = tuple(t.strip() for t in args.tags.split(",") if t.strip())
    return {
        "min_cores": args.min_cores,
        "max_price": args.max_price,
        "min_free_slots": args.min_free_slots,
        "tags": tags,
        "limit": args.limit,
        "sort": args.sort,
    }


# -- running a plan -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Run an operator command; its exit status."""
    p = plan(args)
    if p.quiet and not args.verbose:
        # Quiet means the report and, on failure, its one line: not the node's warnings
        # (a peer that stopped answering pings, say) that the command got past.
        logging.getLogger().setLevel(logging.ERROR)
    return int(trio.run(execute, p))


async def cancel_on_signal(
    signals: AsyncIterator[int],
    scope: trio.CancelScope,
    interrupted: trio.Event,
    first: Callable[[], None] | None = None,
) -> None:
    """At the first of ``signals`` (SIGINT, SIGTERM): ``first()``, set ``interrupted`` and
    cancel ``scope`` (the command's)."""
    async for _sig in signals:
        if first is not None:
            first()
        interrupted.set()
        scope.cancel()
        return


async def execute(p: Plan) -> int:
    """Start the client node, do the command, stop; print the report; the exit status."""

    def note(text: str) -> None:
        # A few short lines: written at once (a reader that stops reading stderr altogether
        # would block them, as it would block Python's own error output).
        if not p.quiet:
            print(f"phala-p2p: {text}", file=sys.stderr, flush=True)

    async def work(node: Node) -> Report:
        return await p.work(node, p, note)

    report: Report | None = None
    error: str | None = None
    code = 0
    interrupted = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_on_signal, signals, nursery.cancel_scope, interrupted)
            try:
                report = await with_client_node(p.config, work)
            except NodeStartFailed as err:
                code, error = 2, str(err)
            except (P2PError, OSError, TimeoutError) as err:
                code, error = 1, str(err) or type(err).__name__
            nursery.cancel_scope.cancel()
    if interrupted.is_set():
        fail("interrupted")
        return 130
    if report is not None:
        if p.as_json:
            print(json.dumps(report.result), flush=True)
        elif report.error is None:
            print("\n".join(report.lines), flush=True)
        if report.error is not None:
            code, error = 1, report.error
    if error is not None:
        fail(error)
    return code


def _account_state(node: Node) -> dict[str, Any]:
    state, account = node.chain.state, node.account
    return {
        "account": account.hex(),
        "balance": state.balance(account),
        "stake": state.stake(account),
        "unbonding": [{"height": h, "amount": a} for h, a in sorted(state.unbonding(account))],
    }


def _account_line(a: dict[str, Any]) -> str:
    unbonding = ", ".join(f"{u['amount']} at height {u['height']}" for u in a["unbonding"])
    return f"account {a['account']}: balance {a['balance']}, stake {a['stake']}" + (
        f", unbonding {unbonding}" if unbonding else ""
    )


def _refused(what: str, receipt: Receipt, result: dict[str, Any]) -> Report:
    result.update(ok=False, error=receipt.error, detail=receipt.detail, tx_id=receipt.tx_id.hex())
    detail = f": {receipt.detail}" if receipt.detail else ""
    return Report(result, [], f"{what} refused: {receipt.error}{detail}")


async def _status(node: Node, p: Plan, note: Note) -> Report:
    synced = await await_network(node, p.config, p.wait, note, accept_stale=True)
    chain = node.chain
    head, state = chain.head, chain.state
    from phala_p2p.net.host import peer_id_of

    age = max(0.0, time.time() - head.time_ms / 1000)
    powers = state.gatekeepers()
    keepers = [
        {"account": a.hex(), "peer_id": peer_id_of(a), "stake": state.stake(a), "power": w}
        for a, w in sorted(powers.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    proposals = [_proposal_json(r) for r in state.proposals() if r.status == "open"]
    params = state.params
    has_account = p.config.wallet_key is not None or p.config.data_dir is not None
    result: dict[str, Any] = {
        "event": "chain_status",
        "chain_id": chain.genesis.chain_id,
        "genesis_hash": chain.genesis.genesis_hash.hex(),
        "height": head.height,
        "head_hash": head.hash.hex(),
        "head_time_ms": head.time_ms,
        "block_age_s": round(age, 3),
        "synced": synced,
        "peers": len(node.peers()),
        "gatekeepers": keepers,
        "total_stake": sum(k["stake"] for k in keepers),
        "treasury": state.treasury(),
        "params": {
            name: getattr(params, name)
            for name in (
                "block_time_ms",
                "tx_fee",
                "min_stake",
                "unbonding_blocks",
                "voting_period_blocks",
            )
        },
        "open_proposals": proposals,
        "account": _account_state(node) if has_account else None,
    }
    lines = [
        f"chain {result['chain_id']} at height {head.height}, last block {_ago(age)} ago"
        + ("" if synced else " (no peer has newer blocks: the chain may be halted)"),
        f"  head {result['head_hash']}",
        f"  gatekeepers {len(keepers)}, total stake {result['total_stake']}:",
        *(f"    {k['peer_id']}  stake {k['stake']}" for k in keepers),
    ]
    for r in proposals:
        lines.append(
            f"  proposal {r['proposal_id']} ({_what(r)}) open until height {r['end_height']}: "
            f"yes {r['yes']}, no {r['no']}"
        )
    if result["account"] is not None:
        lines.append("  " + _account_line(result["account"]))
    return Report(result, lines)


def _ago(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _proposal_json(r: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "proposal_id": r.id,
        "kind": r.action,
        "proposer": r.proposer.hex(),
        "created_height": r.created_height,
        "end_height": r.end_height,
        "yes": r.yes,
        "no": r.no,
        "status": r.status,
    }
    if r.param:
        out.update(param=r.param, value=r.value)
    if r.account:
        out["account"] = r.account.hex()
    if r.measurement:
        out["measurement"] = r.measurement.hex()
    if r.amount:
        out["amount"] = r.amount
    return out


def _what(r: dict[str, Any]) -> str:
    """A proposal in a few words: ``param_change tx_fee=2``."""
    if "param" in r:
        return f"{r['kind']} {r['param']}={r['value']}"
    parts = [r["kind"]]
    if "account" in r:
        parts.append(r["account"][:16] + "...")
    if "measurement" in r:
        parts.append(r["measurement"][:16] + "...")
    if "amount" in r:
        parts.append(str(r["amount"]))
    return " ".join(parts)


async def _stake(node: Node, p: Plan, note: Note) -> Report:
    await await_network(node, p.config, p.wait, note)
    amount: int = p.options["amount"]
    fee = node.chain.params.tx_fee
    note(f"submitting the {p.name} of {amount}")
    wallet = node.wallet
    receipt = await (wallet.stake(amount) if p.name == "stake" else wallet.unstake(amount))
    result: dict[str, Any] = {"event": p.name, "amount": amount, "fee": fee}
    if not receipt.ok:
        return _refused(p.name, receipt, result | {"ok": False} | _account_state(node))
    account = _account_state(node)
    result |= {"ok": True, "tx_id": receipt.tx_id.hex(), "height": receipt.height} | account
    done = "staked" if p.name == "stake" else "unstaked"
    line = f"{done} {amount} at height {receipt.height} (fee {fee})"
    if p.name == "unstake":
        release = receipt.height + node.chain.params.unbonding_blocks if receipt.height else None
        result["releases_at"] = release
        line += f"; it returns to the balance at height {release}"
    return Report(result, [line, "  " + _account_line(account)])


async def _propose(node: Node, p: Plan, note: Note) -> Report:
    await await_network(node, p.config, p.wait, note)
    body: GovPropose = p.options["body"]
    fee = node.chain.params.tx_fee
    note(f"submitting the {body.action} proposal")
    receipt = await node.wallet.propose(
        body.action,
        param=body.param,
        value=body.value,
        account=body.account,
        measurement=body.measurement,
        amount=body.amount,
    )
    result: dict[str, Any] = {"event": "propose", "kind": str(body.action), "fee": fee}
    if not receipt.ok:
        return _refused("proposal", receipt, result)
    record = None if receipt.proposal_id is None else node.chain.state.proposal(receipt.proposal_id)
    if record is None:  # pragma: no cover (the receipt names the proposal the block made)
        raise CommandFailure(f"the proposal was final at height {receipt.height} but not found")
    info = _proposal_json(record)
    result |= {"ok": True, "tx_id": receipt.tx_id.hex(), "height": receipt.height} | info
    lines = [
        f"proposal {record.id} ({_what(info)}) made at height {receipt.height} (fee {fee}); "
        f"voting ends at height {record.end_height}",
        f"  vote on it: phala-p2p vote {record.id} yes|no",
    ]
    return Report(result, lines)


async def _vote(node: Node, p: Plan, note: Note) -> Report:
    await await_network(node, p.config, p.wait, note)
    pid: int = p.options["proposal_id"]
    yes: bool = p.options["yes"]
    state = node.chain.state
    fee = node.chain.params.tx_fee
    result: dict[str, Any] = {
        "event": "vote",
        "proposal_id": pid,
        "vote": "yes" if yes else "no",
        "fee": fee,
    }
    if state.proposal(pid) is None:
        known = len(state.proposals())
        have = {0: "there are none yet", 1: "the only one is 0"}.get(known, f"ids 0 to {known - 1}")
        result |= {"ok": False, "error": "unknown_proposal", "detail": have}
        chain_id = node.chain.genesis.chain_id
        return Report(result, [], f"vote refused: no proposal {pid} on chain {chain_id} ({have})")
    note(f"submitting the vote on proposal {pid}")
    receipt = await node.wallet.vote(pid, yes)
    if not receipt.ok:
        return _refused("vote", receipt, result)
    record = state.proposal(pid)
    assert record is not None
    info = _proposal_json(record)
    result |= {"ok": True, "tx_id": receipt.tx_id.hex(), "height": receipt.height} | info
    result["vote"] = "yes" if yes else "no"
    when = (
        f"voting ends at height {record.end_height}"
        if record.status == "open"
        else f"it is {record.status}"
    )
    lines = [
        f"voted {result['vote']} on proposal {pid} ({_what(info)}) at height {receipt.height} "
        f"(fee {fee})",
        f"  so far yes {record.yes}, no {record.no}; {when}",
    ]
    return Report(result, lines)


async def _miners(node: Node, p: Plan, note: Note) -> Report:
    started = trio.current_time()
    await await_network(node, p.config, p.wait, note)
    constraints: dict[str, Any] = p.options["constraints"]
    market = node.market
    note("asking peers for the miner directory")
    left = max(0.1, p.wait - (trio.current_time() - started))
    found: list[Advert] = []
    with trio.move_on_after(left):
        found = await node.find_miners(timeout=left, **constraints)
        while not len(market.directory):  # nobody had an advert yet: wait for a first one
            await market.wait_for_change()
            found = await node.find_miners(**constraints)
    known = len(market.directory)
    rows = [_advert_json(a) for a in found]
    result = {"event": "miners", "known": known, "miners": rows}
    if not rows:
        what = "no miner advert" if not known else f"none of the {known} miner adverts"
        return Report(result, [f"{what} matches"])
    return Report(result, _miner_table(found, known))


def _advert_json(a: Advert) -> dict[str, Any]:
    return {
        "peer_id": a.peer_id,
        "operator": a.operator.hex(),
        "price": a.price,
        "cores": a.cores,
        "memory": a.memory,
        "fuel_per_s": a.fuel_per_s,
        "free_slots": a.free_slots,
        "slots": a.slots,
        "max_input": a.max_input,
        "max_fuel": a.max_fuel,
        "tags": list(a.tags),
        "expires": a.expires,
        "latency": a.latency,
        "addrs": list(a.addrs),
    }


def _miner_table(found: list[Advert], known: int) -> list[str]:
    from phala_p2p.progress import format_bytes

    head = ("PEER ID", "PRICE", "CORES", "MEMORY", "FUEL/S", "SLOTS", "LATENCY", "TAGS")
    rows = [
        (
            a.peer_id,
            str(a.price),
            str(a.cores),
            format_bytes(a.memory),
            str(a.fuel_per_s),
            f"{a.free_slots}/{a.slots}",
            "-" if a.latency is None else f"{a.latency * 1000:.0f} ms",
            ",".join(a.tags) or "-",
        )
        for a in found
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"{len(found)} of {known} miner adverts, best first (price per million fuel):"]
    for r in [head, *rows]:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return lines
