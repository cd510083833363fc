"""What an enclave signs for its host with its identity key, each under its own domain.

The host may ask its enclave to sign a capacity advert, a counter-offer or an agreement
(``Enclave.sign``): statements the host makes on the enclave's behalf and that bind the enclave
to the host's commercial decisions, which the host controls anyway. Usage receipts and quotes
are never signed this way: the enclave makes those itself from what it measured, under
domains this module does not hand out, so no host can forge them.
"""

from __future__ import annotations

from typing import Final

import msgpack

from phala_p2p.crypto.identity import verify_signature
from phala_p2p.errors import UsageError

PURPOSES: Final = {
    "advert": b"phala/market/advert/v1\x00",
    "counter": b"phala/market/counter/v1\x00",
    "agreement": b"phala/market/agreement/v1\x00",
}
MAX_STATEMENT: Final = 8192
# Liveness heartbeats (protocols/settlement.md): the enclave builds these bytes itself from the
# challenge, for its own key only; the same bytes as phala_p2p.chain.liveness (a test pins it).
HEARTBEAT_DOMAIN: Final = b"phala/chain/heartbeat/v1\x00"


def heartbeat_bytes(chain_id: str, height: int, seed: bytes, enclave: bytes) -> bytes:
    """What an enclave signs to answer the heartbeat challenge of block ``height``."""
    if not isinstance(chain_id, str) or not 0 < len(chain_id) <= 64:
        raise UsageError("a heartbeat names a chain id of 1..64 characters")
    if type(height) is not int or not 0 < height < 1 << 63:
        raise UsageError("a heartbeat names a block height >= 1")
    if not isinstance(seed, bytes) or len(seed) != 32 or len(enclave) != 32:
        raise UsageError("a heartbeat names a 32-byte seed and enclave key")
    packed: bytes = msgpack.packb([chain_id, height, seed, enclave], use_bin_type=True)
    return HEARTBEAT_DOMAIN + packed


def statement_bytes(purpose: str, payload: bytes) -> bytes:
    """The bytes signed for ``payload`` under ``purpose`` (UsageError for anything else)."""
    domain = PURPOSES.get(purpose) if isinstance(purpose, str) else None
    if domain is None:
        raise UsageError(f"an enclave signs statements of {sorted(PURPOSES)} only, not {purpose!r}")
    if not isinstance(payload, bytes) or not 0 < len(payload) <= MAX_STATEMENT:
        raise UsageError(f"a statement is 1..{MAX_STATEMENT} bytes")
    return domain + payload


def verify_statement(public_key: bytes, purpose: str, payload: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of ``payload`` under ``purpose``."""
    try:
        message = statement_bytes(purpose, payload)
    except UsageError:
        return False
    return verify_signature(public_key, message, signature)
