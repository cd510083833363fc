"""Miner registration on chain: attested enclaves only, bound to their operator; revocation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from phala_p2p.chain.bodies import (
    GovPropose,
    GovVote,
    ProposalAction,
    Stake,
    SubmitEvidence,
    Unstake,
)
from phala_p2p.chain.evidence import DoubleSignEvidence
from phala_p2p.chain.miners import (
    MinerDeregister,
    MinerRegister,
    MinerStatus,
    get_miner,
    miner_by_enclave,
    registration_nonce,
)
from phala_p2p.chain.tx import Tx, TxRejectReason
from phala_p2p.chain.view import ChainView
from phala_p2p.crypto.identity import Identity
from phala_p2p.tee.quote import make_report_data, sign_sim_quote

from .helpers import CHAIN_ID, FAST, extend, genesis, identities, try_txs

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "attestation-samples"
KEEPERS = identities(4, seed=71)
ROOT = Identity.from_seed(b"r" * 32)
MEASUREMENT = bytes(range(32))
OPERATOR = Identity.from_seed(b"o" * 32)
ENCLAVE_ID = Identity.from_seed(b"e" * 32).public_key
ENCLAVE_X = Identity.from_seed(b"x" * 32).public_key


def _view() -> ChainView:
    gen = genesis(
        KEEPERS,
        accounts=[(OPERATOR, 1_000_000), *((k, 1_000_000) for k in KEEPERS)],
        params=dataclasses.replace(FAST, min_miner_stake=500, voting_period_blocks=2),
    )
    gen = dataclasses.replace(
        gen, attestation_roots=(ROOT.public_key,), allowed_measurements=(MEASUREMENT,)
    )
    return ChainView(gen)


class Chain:
    def __init__(self) -> None:
        self.view = _view()
        self.nonces: dict[bytes, int] = {}

    @property
    def now_s(self) -> int:
        return (self.view.head_time_ms + 1000) // 1000

    def tx(self, who: Identity, body: object) -> Tx:
        n = self.nonces.get(who.public_key, 0)
        self.nonces[who.public_key] = n + 1
        return Tx.sign(who, chain_id=CHAIN_ID, nonce=n, fee=1, body=body)

    def block(self, *txs: Tx) -> list[str | None]:
        """Apply a block with ``txs``; returns each one's rejection reason (None: applied)."""
        reasons = try_txs(self.view, txs)
        included = [tx for tx, r in zip(txs, reasons, strict=True) if r is None]
        for tx, r in zip(txs, reasons, strict=True):
            if r is not None:  # a refused transaction does not use its nonce
                self.nonces[tx.sender] -= 1
        extend(self.view, KEEPERS, included)
        return reasons

    def register(self, who: Identity = OPERATOR, **change: object) -> MinerRegister:
        nonce = registration_nonce(CHAIN_ID, who.public_key)
        quote = sign_sim_quote(
            change.pop("root", ROOT),  # type: ignore[arg-type]
            change.pop("measurement", MEASUREMENT),  # type: ignore[arg-type]
            make_report_data(ENCLAVE_ID, ENCLAVE_X, nonce=change.pop("nonce", nonce)),  # type: ignore[arg-type]
            change.pop("timestamp", self.now_s),  # type: ignore[arg-type]
        )
        body = MinerRegister("SIM", quote, "", ENCLAVE_ID, ENCLAVE_X)
        return dataclasses.replace(body, **change)  # type: ignore[arg-type]


def test_attested_and_staked_operator_registers() -> None:
    c = Chain()
    assert c.block(c.tx(OPERATOR, c.register())) == [TxRejectReason.BELOW_MIN_STAKE]
    assert c.block(c.tx(OPERATOR, Stake(500))) == [None]
    assert c.block(c.tx(OPERATOR, c.register())) == [None]
    record = get_miner(c.view.state, OPERATOR.public_key)
    assert record is not None
    assert record.status == MinerStatus.ACTIVE
    assert (record.identity_pub, record.x25519_pub) == (ENCLAVE_ID, ENCLAVE_X)
    assert record.measurement == MEASUREMENT
    assert miner_by_enclave(c.view.state, ENCLAVE_ID) == record


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"measurement": bytes(32)}, "unknown measurement"),
        ({"root": Identity.from_seed(b"f" * 32)}, "forged root"),
        ({"nonce": b"another operator's nonce"}, "quote bound to another nonce"),
        ({"timestamp": 1}, "stale quote"),
        ({"x25519_pub": bytes(32)}, "keys not in the report data"),
    ],
)
def test_bad_attestation_is_refused_and_changes_nothing(
    change: dict[str, object], why: str
) -> None:
    c = Chain()
    c.block(c.tx(OPERATOR, Stake(500)))
    root = c.view.state.state_root()
    assert c.block(c.tx(OPERATOR, c.register(**change))) == [TxRejectReason.ATTESTATION_FAILED], why
    assert get_miner(c.view.state, OPERATOR.public_key) is None
    assert root == c.view.state.state_root()  # nothing changed, not even the fee


def test_a_quote_for_one_operator_cannot_be_registered_by_another() -> None:
    c = Chain()
    thief = KEEPERS[0]
    c.block(c.tx(OPERATOR, Stake(500)), c.tx(thief, Stake(500)))
    stolen = c.register(OPERATOR)  # bound to OPERATOR's registration nonce
    assert c.block(c.tx(thief, stolen)) == [TxRejectReason.ATTESTATION_FAILED]
    assert c.block(c.tx(OPERATOR, stolen)) == [None]
    # and the enclave cannot be claimed by another operator, even with a good quote
    assert c.block(c.tx(thief, c.register(thief))) == [TxRejectReason.NOT_AUTHORIZED]


def test_real_dcap_quotes_go_through_the_dcap_verifier() -> None:
    c = Chain()
    c.block(c.tx(OPERATOR, Stake(500)))
    raw = (SAMPLES / "sgx_quote").read_bytes()
    collateral = (SAMPLES / "sgx_quote_collateral.json").read_text()
    body = MinerRegister("SGX", raw, collateral, ENCLAVE_ID, ENCLAVE_X)
    tx = c.tx(OPERATOR, body)
    assert tx.size > c.view.params.max_tx_size  # it needs the larger attestation bound
    result = c.view.state.check_tx(tx)
    assert result is None
    state = c.view.state

    def attempt(at_s: int) -> str:
        token = state.checkpoint()
        state.block_time_ms = at_s * 1000
        try:
            result = state.apply_tx(tx, c.view.next_height)
        finally:
            state.rollback(token)
        assert result.reason == TxRejectReason.ATTESTATION_FAILED
        return result.detail

    # at this chain's clock the sample's collateral is not valid yet: DCAP itself refuses
    assert "issue date is in the future" in attempt(c.now_s)
    # at the sample's time the quote verifies, and the chain's policy refuses it...
    sample_time = 1_751_328_000
    assert "unknown measurement 33d8736d" in attempt(sample_time)
    # ...and even with its MRENCLAVE allowed and its TCB status accepted, its report data
    # binds "Hello, world!", not this enclave's keys and this operator's nonce
    mrenclave = bytes.fromhex("33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb")
    state.measurements.set(mrenclave, True)
    state.params_table.set("accept_tcb_mask", 0b1111)
    assert "report data does not match" in attempt(sample_time)


def test_revocation_by_governance_unstake_and_slashing_and_deregistration() -> None:
    c = Chain()
    c.block(c.tx(OPERATOR, Stake(500)))
    c.block(c.tx(OPERATOR, c.register()))
    # governance revokes the measurement: the miner is revoked at the end of that block
    c.block(
        c.tx(KEEPERS[0], GovPropose(ProposalAction.MEASUREMENT_REVOKE, measurement=MEASUREMENT))
    )
    pid = c.view.state.proposals()[-1].id
    c.block(*(c.tx(k, GovVote(pid, True)) for k in KEEPERS))
    for _ in range(3):
        c.block()
    record = get_miner(c.view.state, OPERATOR.public_key)
    assert record is not None
    assert record.status == MinerStatus.REVOKED
    assert "revoked" in record.reason
    assert miner_by_enclave(c.view.state, ENCLAVE_ID) is None
    # a revoked measurement cannot register again
    assert c.block(c.tx(OPERATOR, c.register())) == [TxRejectReason.ATTESTATION_FAILED]


def test_unstaking_below_the_minimum_revokes_and_deregister_needs_a_miner() -> None:
    c = Chain()
    c.block(c.tx(OPERATOR, Stake(500)))
    c.block(c.tx(OPERATOR, c.register()))
    c.block(c.tx(OPERATOR, Unstake(1)))
    record = get_miner(c.view.state, OPERATOR.public_key)
    assert record is not None
    assert record.status == MinerStatus.REVOKED
    assert c.block(c.tx(OPERATOR, MinerDeregister())) == [TxRejectReason.NOT_REGISTERED]
    # stake again and re-register, then leave voluntarily
    c.block(c.tx(OPERATOR, Stake(1)))
    assert c.block(c.tx(OPERATOR, c.register())) == [None]
    assert c.block(c.tx(OPERATOR, MinerDeregister("maintenance"))) == [None]
    record = get_miner(c.view.state, OPERATOR.public_key)
    assert record is not None
    assert (record.status, record.reason) == (MinerStatus.DEREGISTERED, "maintenance")


def test_a_slashed_operator_loses_its_miner() -> None:
    from phala_p2p.chain.block import Vote, VoteType, vote_sign_bytes

    c = Chain()
    operator = KEEPERS[1]  # a gatekeeper that also runs a miner
    c.block(c.tx(operator, c.register(operator)))
    assert get_miner(c.view.state, operator.public_key) is not None
    h = c.view.height

    def vote(block_hash: bytes) -> Vote:
        sb = vote_sign_bytes(CHAIN_ID, VoteType.PREVOTE, h, 0, block_hash)
        return Vote(VoteType.PREVOTE, h, 0, block_hash, operator.public_key, operator.sign(sb))

    a, b = sorted([vote(b"\x01" * 32), vote(b"\x02" * 32)], key=lambda v: v.block_hash or b"")
    assert c.block(c.tx(KEEPERS[0], SubmitEvidence(DoubleSignEvidence(a, b)))) == [None]
    record = get_miner(c.view.state, operator.public_key)
    assert record is not None
    assert (record.status, record.reason) == (MinerStatus.REVOKED, "operator slashed")
