"""The byte vectors published in protocols/consensus.md and protocols/ledger.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from phala_p2p.chain.block import (
    BlockHeader,
    Vote,
    VoteType,
    proposal_sign_bytes,
    txs_root,
    vote_sign_bytes,
)
from phala_p2p.chain.bodies import Transfer
from phala_p2p.chain.tx import Tx
from phala_p2p.chain.validators import ValidatorSet
from phala_p2p.crypto.identity import Identity, verify_signature
from phala_p2p.wire.codec import decode, encode

PROTOCOLS = Path(__file__).resolve().parents[2] / "protocols"


def _vectors(name: str) -> dict[str, Any]:
    text = (PROTOCOLS / name).read_text()
    blocks = re.findall(r"```json\n(.*?)\n```", text, re.S)
    assert len(blocks) == 1
    data: dict[str, Any] = json.loads(blocks[0])
    return data


def _tx(v: dict[str, Any], ident: Identity) -> Tx:
    t = v["tx_transfer"]
    return Tx.sign(
        ident,
        chain_id=v["chain_id"],
        nonce=t["nonce"],
        fee=t["fee"],
        body=Transfer(bytes.fromhex(t["to"]), t["amount"]),
    )


def test_ledger_vectors() -> None:
    v = _vectors("ledger.md")
    ident = Identity.from_seed(bytes.fromhex(v["seed"]))
    tx = _tx(v, ident)
    t = v["tx_transfer"]
    assert tx.body.hex() == t["body"]
    assert tx.sign_bytes.hex() == t["sign_bytes"]
    assert tx.signature.hex() == t["signature"]
    assert tx.id.hex() == t["id"]
    assert tx.verify()


def test_consensus_vectors() -> None:
    v = _vectors("consensus.md")
    ident = Identity.from_seed(bytes.fromhex(v["seed"]))
    assert ident.public_key.hex() == v["public_key"]
    chain = v["chain_id"]
    pc = v["vote_precommit"]
    sb = vote_sign_bytes(
        chain, VoteType.PRECOMMIT, pc["height"], pc["round"], bytes.fromhex(pc["block_hash"])
    )
    assert sb.hex() == pc["sign_bytes"]
    assert ident.sign(sb).hex() == pc["signature"]
    vote = decode(bytes.fromhex(pc["wire"]), max_size=1024, expect=Vote)
    assert vote.verify(chain)
    assert encode(vote).hex() == pc["wire"]
    nil = v["vote_prevote_nil"]
    sb = vote_sign_bytes(chain, VoteType.PREVOTE, nil["height"], nil["round"], None)
    assert sb.hex() == nil["sign_bytes"]
    p = v["proposal"]
    sb = proposal_sign_bytes(
        chain, p["height"], p["round"], p["pol_round"], bytes.fromhex(p["block_hash"])
    )
    assert sb.hex() == p["sign_bytes"]
    valset = ValidatorSet.from_powers({ident.public_key: 1000})
    assert valset.hash.hex() == v["valset_hash_one_validator_power_1000"]
    assert txs_root([]).hex() == v["txs_root_empty"]
    h = v["header"]
    tx = _tx(_vectors("ledger.md"), ident)
    assert txs_root([tx]).hex() == h["txs_root"]
    header = BlockHeader(
        chain,
        h["height"],
        h["round"],
        bytes.fromhex(h["parent_hash"]),
        h["time_ms"],
        ident.public_key,
        txs_root([tx]),
        bytes.fromhex(h["state_root"]),
        valset.hash,
    )
    assert header.hash.hex() == h["hash"]
    assert not verify_signature(ident.public_key, sb, bytes.fromhex(pc["signature"]))
