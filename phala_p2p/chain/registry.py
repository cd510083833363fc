"""Registry of transaction kinds and end-of-block hooks: the ledger's extension point.

The core kinds (transfer, staking, escrow, evidence, governance) register themselves here on
import; later features register their own (``register_tx_kind(140, MinerRegister, handler)``)
and every node that imports the same modules applies the same rules. A handler validates first
and raises ``TxRejected`` to refuse; the ledger undoes any write the handler made before
raising, so a refused transaction never changes the state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phala_p2p.errors import UsageError
from phala_p2p.wire import codec

if TYPE_CHECKING:
    from phala_p2p.chain.ledger import LedgerState
    from phala_p2p.chain.tx import Tx


@dataclass(frozen=True)
class TxContext:
    """What a handler sees: the state to change, the transaction and the block height."""

    state: LedgerState
    tx: Tx
    height: int

    @property
    def sender(self) -> bytes:
        return self.tx.sender


TxHandler = Callable[[TxContext, Any], None]
EndBlockHook = Callable[["LedgerState", int], None]


@dataclass(frozen=True)
class TxKind:
    kind: int
    body_cls: type[Any]
    handler: TxHandler
    size_param: str = "max_tx_size"  # the chain parameter that bounds this kind's size


_KINDS: dict[int, TxKind] = {}
_BY_CLASS: dict[type[Any], int] = {}
_END_BLOCK: list[tuple[int, str, EndBlockHook]] = []


def register_tx_kind(
    kind: int, body_cls: type[Any], handler: TxHandler, *, size_param: str = "max_tx_size"
) -> None:
    """Register a transaction kind; its body is the wire message ``body_cls``, and ``kind``
    must be that message's wire kind (so a tx's ``kind`` names its body's type).
    ``size_param`` names the chain parameter bounding the transaction's size."""
    if codec.kind_of(body_cls) != kind:
        raise UsageError(f"{body_cls.__name__} is wire kind {codec.kind_of(body_cls)}, not {kind}")
    if kind in _KINDS:
        if _KINDS[kind].body_cls is body_cls and _KINDS[kind].handler is handler:
            return
        raise UsageError(f"tx kind {kind} is already registered")
    if body_cls in _BY_CLASS:
        raise UsageError(f"{body_cls.__name__} is already registered as a tx body")
    _KINDS[kind] = TxKind(kind, body_cls, handler, size_param)
    _BY_CLASS[body_cls] = kind


def register_end_block(order: int, name: str, hook: EndBlockHook) -> None:
    """Run ``hook(state, height)`` at the end of every block, in ascending ``order``."""
    for o, n, _ in _END_BLOCK:
        if n == name:
            return
        if o == order:
            raise UsageError(f"end-block order {order} is taken by {n}")
    _END_BLOCK.append((order, name, hook))
    _END_BLOCK.sort(key=lambda item: item[0])


def lookup(kind: int) -> TxKind | None:
    return _KINDS.get(kind)


def kind_of(body_cls: type[Any]) -> int:
    try:
        return _BY_CLASS[body_cls]
    except KeyError:
        raise UsageError(f"{body_cls.__name__} is not a registered tx body") from None


def end_block_hooks() -> list[EndBlockHook]:
    return [hook for _, _, hook in _END_BLOCK]
