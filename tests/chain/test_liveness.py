"""Miner liveness: deterministic challenges, heartbeats, slashing and revocation of misses."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from phala_p2p.chain.bodies import GovPropose, GovVote, ProposalAction, Transfer
from phala_p2p.chain.governance import ProposalStatus
from phala_p2p.chain.liveness import (
    CHALLENGES,
    Challenge,
    MinerHeartbeat,
    active_enclaves,
    awaiting,
    challenge_at,
    challenge_seed,
    heartbeat_sign_bytes,
    misses_of,
    select_challenged,
)
from phala_p2p.chain.miners import MinerDeregister, MinerStatus, get_miner
from phala_p2p.chain.params import PPM, ChainParams, Genesis
from phala_p2p.chain.tx import Tx, TxRejectReason
from phala_p2p.chain.view import ChainView
from phala_p2p.crypto.identity import Identity
from phala_p2p.errors import UsageError

from .helpers import CHAIN_ID
from .test_settlement import ENCLAVE, KEEPERS, OPERATOR, OTHER, PARAMS, Net, key

# every active miner is challenged at the end of every block; two blocks to answer
ALWAYS = dataclasses.replace(
    PARAMS,
    heartbeat_challenge_ppm=PPM,
    heartbeat_max_challenges=64,
    heartbeat_window_blocks=2,
    heartbeat_slash_ppm=20_000,
    heartbeat_max_misses=3,
)
STAKE = 1_000  # the operators' stake: min_miner_stake (500) is far below
OPERATOR_B = key("operator b")
ENCLAVE_B = key("enclave b")


def answer(net: Net, enclave: Identity, height: int, sender: Identity = OPERATOR) -> Tx:
    challenge = challenge_at(net.state, height)
    assert challenge is not None
    return net.tx(sender, MinerHeartbeat.answer(enclave, chain_id=CHAIN_ID, challenge=challenge))


# -- selection -------------------------------------------------------------------------------

MINERS = tuple(sorted(hashlib.sha256(b"miner %d" % i).digest() for i in range(50)))


def test_selection_is_a_deterministic_function_of_the_seed() -> None:
    seed = challenge_seed(CHAIN_ID, 7, b"\x01" * 32)
    chosen = select_challenged(seed, MINERS, 100_000, 64)
    assert chosen == select_challenged(seed, MINERS, 100_000, 64)
    assert chosen == tuple(sorted(set(chosen)))  # distinct, ascending
    assert set(chosen) <= set(MINERS)
    others = {
        select_challenged(challenge_seed(CHAIN_ID, 7, bytes([i]) * 32), MINERS, 100_000, 64)
        for i in range(2, 12)
    }
    assert len(others | {chosen}) > 5  # another seed, another draw
    # the seed depends on the chain, the height and the state root
    seeds = {
        challenge_seed(CHAIN_ID, 7, b"\x01" * 32),
        challenge_seed("other", 7, b"\x01" * 32),
        challenge_seed(CHAIN_ID, 8, b"\x01" * 32),
        challenge_seed(CHAIN_ID, 7, b"\x02" * 32),
    }
    assert len(seeds) == 4


def test_selection_rate_matches_the_governed_probability() -> None:
    blocks, chance = 4_000, 30_000  # 3% per miner per block
    counts: Counter[bytes] = Counter()
    for h in range(blocks):
        counts.update(select_challenged(challenge_seed(CHAIN_ID, h, bytes(32)), MINERS, chance, 64))
    expected = blocks * len(MINERS) * chance / PPM  # 6000, standard deviation ~77
    assert abs(sum(counts.values()) - expected) < 0.05 * expected
    per_miner = expected / len(MINERS)  # 120, standard deviation ~11
    assert all(0.6 * per_miner < counts[m] < 1.4 * per_miner for m in MINERS)


def test_selection_respects_the_cap_and_the_edges() -> None:
    seed = challenge_seed(CHAIN_ID, 1, bytes(32))
    assert len(select_challenged(seed, MINERS, PPM, 5)) == 5
    assert select_challenged(seed, MINERS, PPM, 64) == MINERS
    assert select_challenged(seed, MINERS, 0, 64) == ()
    assert select_challenged(seed, MINERS, PPM, 0) == ()
    assert select_challenged(seed, (), PPM, 64) == ()
    # an expected count of 1.5 is 1 or 2, each about half the time
    sizes = Counter(
        len(select_challenged(challenge_seed(CHAIN_ID, h, bytes(32)), MINERS[:10], 150_000, 64))
        for h in range(1_000)
    )
    assert set(sizes) == {1, 2}
    assert 400 < sizes[1] < 600


# -- answering -------------------------------------------------------------------------------


def test_a_miner_that_answers_is_never_slashed() -> None:
    net = Net(params=ALWAYS)
    registered = net.register(OPERATOR, ENCLAVE, stake=STAKE)
    challenge = challenge_at(net.state, registered)
    assert challenge is not None
    assert challenge.enclaves == (ENCLAVE.public_key,)
    assert challenge.due_height == registered + 2
    treasury = net.state.treasury()
    for _ in range(6):
        assert awaiting(net.state, net.height, ENCLAVE.public_key)
        assert net.block(answer(net, ENCLAVE, net.height)) == [None]
        assert not awaiting(net.state, net.height - 1, ENCLAVE.public_key)
    assert net.state.stake(OPERATOR.public_key) == STAKE
    assert misses_of(net.state, ENCLAVE.public_key) == (0, 0)
    assert net.state.treasury() == treasury + 6 * net.state.params.tx_fee  # fees only
    # answered challenges are gone once their window closed
    assert challenge_at(net.state, registered) is None


def test_a_miss_is_slashed_by_exactly_heartbeat_slash_ppm_and_counted() -> None:
    net = Net(params=ALWAYS)
    registered = net.register(OPERATOR, ENCLAVE, stake=STAKE)
    treasury = net.state.treasury()
    net.block()  # registered + 1: the window of the first challenge is still open
    assert net.state.stake(OPERATOR.public_key) == STAKE
    assert awaiting(net.state, registered, ENCLAVE.public_key)
    net.block()  # registered + 2 = due: the first miss
    cut = STAKE * ALWAYS.heartbeat_slash_ppm // PPM
    assert cut == 20
    assert net.state.stake(OPERATOR.public_key) == STAKE - cut
    assert net.state.treasury() == treasury + cut
    assert misses_of(net.state, ENCLAVE.public_key) == (1, 1)
    record = get_miner(net.state, OPERATOR.public_key)
    assert record is not None
    assert record.status == MinerStatus.ACTIVE


def test_misses_in_a_row_revoke_and_an_answer_resets_the_count() -> None:
    net = Net(params=ALWAYS)
    registered = net.register(OPERATOR, ENCLAVE, stake=STAKE)
    stake = STAKE
    net.block()
    net.block()  # miss 1 (challenge of `registered`)
    stake -= stake * ALWAYS.heartbeat_slash_ppm // PPM
    assert misses_of(net.state, ENCLAVE.public_key) == (1, 1)
    # answer the challenge of registered+2 in the block that judges registered+1: the answer
    # comes first in the block, then the miss
    assert net.block(answer(net, ENCLAVE, registered + 2)) == [None]
    stake -= stake * ALWAYS.heartbeat_slash_ppm // PPM
    assert misses_of(net.state, ENCLAVE.public_key) == (1, 2)
    assert net.state.stake(OPERATOR.public_key) == stake
    net.block()  # registered+2 was answered: nothing
    assert misses_of(net.state, ENCLAVE.public_key) == (1, 2)
    assert net.state.stake(OPERATOR.public_key) == stake
    for in_row in (2, 3):
        net.block()
        stake -= stake * ALWAYS.heartbeat_slash_ppm // PPM
        assert net.state.stake(OPERATOR.public_key) == stake
        record = get_miner(net.state, OPERATOR.public_key)
        assert record is not None
        if in_row < ALWAYS.heartbeat_max_misses:
            assert misses_of(net.state, ENCLAVE.public_key) == (in_row, in_row + 1)
            assert record.status == MinerStatus.ACTIVE
    record = get_miner(net.state, OPERATOR.public_key)
    assert record is not None
    assert record.status == MinerStatus.REVOKED
    assert misses_of(net.state, ENCLAVE.public_key) == (0, 4)
    assert ENCLAVE.public_key not in active_enclaves(net.state)
    # a revoked miner is challenged no more, and its open challenges go unpunished
    for _ in range(3):
        net.block()
    assert net.state.stake(OPERATOR.public_key) == stake
    assert challenge_at(net.state, net.height) is None


def test_bad_heartbeats_are_refused() -> None:
    # one of the two miners challenged a block, a long window, no revocation
    params = dataclasses.replace(
        ALWAYS, heartbeat_max_challenges=1, heartbeat_window_blocks=8, heartbeat_max_misses=100
    )
    net = Net(params=params, accounts=(OPERATOR, OPERATOR_B, OTHER))
    net.register(OPERATOR, ENCLAVE, stake=STAKE)
    net.register(OPERATOR_B, ENCLAVE_B, stake=STAKE)
    h = net.height
    challenge = challenge_at(net.state, h)
    assert challenge is not None
    assert len(challenge.enclaves) == 1
    chosen, other = (
        (ENCLAVE, ENCLAVE_B)
        if challenge.enclaves == (ENCLAVE.public_key,)
        else (ENCLAVE_B, ENCLAVE)
    )

    def signed(
        enclave: bytes, by: Identity, height: int = h, seed: bytes = challenge.seed
    ) -> MinerHeartbeat:
        sig = by.sign(heartbeat_sign_bytes(CHAIN_ID, height, seed, enclave))
        return MinerHeartbeat(enclave, height, sig)

    stranger = key("never registered")
    cases = [
        (signed(chosen.public_key, chosen, height=h + 1), TxRejectReason.NOT_CHALLENGED),  # yet
        (signed(other.public_key, other), TxRejectReason.NOT_CHALLENGED),  # not selected
        (signed(stranger.public_key, stranger), TxRejectReason.NOT_CHALLENGED),
        (signed(chosen.public_key, other), TxRejectReason.BAD_SIGNATURE),  # wrong key
        (signed(chosen.public_key, chosen, seed=bytes(32)), TxRejectReason.BAD_SIGNATURE),
    ]
    for body, reason in cases:
        assert net.block(net.tx(OTHER, body)) == [reason]
    assert challenge.due_height == h + 8
    while net.height < challenge.due_height:
        net.block()
    assert awaiting(net.state, h, chosen.public_key) is False  # judged: a miss
    assert misses_of(net.state, chosen.public_key)[1] >= 1
    late = net.tx(OTHER, signed(chosen.public_key, chosen))
    assert net.block(late) == [TxRejectReason.CHALLENGE_CLOSED]
    # a fresh challenge: answered once, not twice
    h = net.height
    challenge = challenge_at(net.state, h)
    assert challenge is not None
    picked = ENCLAVE if challenge.enclaves == (ENCLAVE.public_key,) else ENCLAVE_B
    first = net.tx(OTHER, MinerHeartbeat.answer(picked, chain_id=CHAIN_ID, challenge=challenge))
    assert net.block(first) == [None]
    again = net.tx(OTHER, MinerHeartbeat.answer(picked, chain_id=CHAIN_ID, challenge=challenge))
    assert net.block(again) == [TxRejectReason.ALREADY_ANSWERED]
    with pytest.raises(UsageError):
        MinerHeartbeat.answer(stranger, chain_id=CHAIN_ID, challenge=challenge)


def test_only_active_miners_registered_by_the_challenge_are_judged() -> None:
    net = Net(params=ALWAYS, accounts=(OPERATOR, OPERATOR_B, OTHER))
    r = net.register(OPERATOR, ENCLAVE, stake=STAKE)
    first = challenge_at(net.state, r)
    assert first is not None
    assert first.enclaves == (ENCLAVE.public_key,)
    # the operator re-registers its enclave right after the challenge: that challenge was
    # for the previous registration
    assert net.block(
        net.tx(OPERATOR, MinerDeregister("upgrade")),
        net.tx(OPERATOR, net.registration(OPERATOR, ENCLAVE)),
    ) == [None, None]
    record = get_miner(net.state, OPERATOR.public_key)
    assert record is not None
    assert (record.registered_height, record.status) == (r + 1, MinerStatus.ACTIVE)
    second = challenge_at(net.state, r + 1)
    assert second is not None
    assert second.enclaves == (ENCLAVE.public_key,)
    net.register(OPERATOR_B, ENCLAVE_B, stake=STAKE)  # registered after both challenges
    assert net.height == r + 2  # the first challenge's window closed: unpunished
    assert net.state.stake(OPERATOR.public_key) == STAKE
    assert misses_of(net.state, ENCLAVE.public_key) == (0, 0)
    third = challenge_at(net.state, r + 2)
    assert third is not None
    assert third.enclaves == tuple(sorted([ENCLAVE.public_key, ENCLAVE_B.public_key]))
    net.block()  # the re-registration's own challenge (r + 1) was missed
    assert net.state.stake(OPERATOR.public_key) < STAKE
    assert misses_of(net.state, ENCLAVE.public_key) == (1, 1)
    assert net.state.stake(OPERATOR_B.public_key) == STAKE
    assert misses_of(net.state, ENCLAVE_B.public_key) == (0, 0)


def test_challenges_are_the_same_on_every_node() -> None:
    params = dataclasses.replace(ALWAYS, heartbeat_challenge_ppm=500_000, heartbeat_window_blocks=3)
    operators = [key(f"op {i}") for i in range(4)]
    net = Net(params=params, accounts=(*operators, OTHER))
    enclaves = [key(f"enclave {i}") for i in range(4)]
    for op, enc in zip(operators, enclaves, strict=True):
        net.register(op, enc, stake=STAKE)
    seen: list[Challenge] = []
    for _ in range(12):
        challenge = challenge_at(net.state, net.height)
        if challenge is not None:
            seen.append(challenge)
        net.block()
    assert len(seen) >= 6
    assert len({c.enclaves for c in seen}) > 1
    # a node that replays the same blocks computes the same state, challenges included
    # (ChainView.apply checks each header's state root)
    replayed = ChainView.replay(net.genesis, net.blocks)
    assert replayed.state.state_root() == net.state.state_root()
    assert list(replayed.state.table(CHALLENGES).items()) == list(
        net.state.table(CHALLENGES).items()
    )
    # and the recorded draw is select_challenged of the recorded seed
    last = challenge_at(net.state, net.height)
    if last is not None:
        active = active_enclaves(net.state)
        assert last.enclaves == select_challenged(last.seed, active, 500_000, 64)


def test_the_seed_depends_on_the_blocks_transactions() -> None:
    seeds = []
    for txs in ([], [(OTHER, Transfer(OPERATOR.public_key, 1))]):
        net = Net(params=ALWAYS)
        net.register(OPERATOR, ENCLAVE, stake=STAKE)
        net.block(*(net.tx(who, body) for who, body in txs))
        challenge = challenge_at(net.state, net.height)
        assert challenge is not None
        seeds.append(challenge.seed)
    assert seeds[0] != seeds[1]


def test_an_answer_in_the_last_block_of_the_window_counts() -> None:
    net = Net(params=ALWAYS)
    r = net.register(OPERATOR, ENCLAVE, stake=STAKE)
    net.block()
    assert net.height + 1 == r + ALWAYS.heartbeat_window_blocks  # the due height of r
    assert net.block(answer(net, ENCLAVE, r)) == [None]
    assert net.state.stake(OPERATOR.public_key) == STAKE
    assert misses_of(net.state, ENCLAVE.public_key) == (0, 0)


def test_the_last_gatekeeper_is_never_slashed_out_of_the_set() -> None:
    solo = KEEPERS[0]
    params = dataclasses.replace(ALWAYS, min_miner_stake=100)
    net = Net(params=params, keepers=[solo], keeper_stakes=[100])
    net.register(solo, ENCLAVE)
    for _ in range(3):
        net.block()
    assert net.state.stake(solo.public_key) == 100  # a slash would halt the chain
    assert misses_of(net.state, ENCLAVE.public_key)[1] >= 2  # but the misses count


# -- parameters ------------------------------------------------------------------------------


def test_heartbeat_parameters_are_validated_and_off_by_default() -> None:
    p = ChainParams()
    assert p.heartbeat_challenge_ppm == 0
    assert (p.heartbeat_slash_ppm, p.heartbeat_max_misses) == (10_000, 3)
    for name, value in [
        ("heartbeat_challenge_ppm", PPM + 1),
        ("heartbeat_slash_ppm", PPM + 1),
        ("heartbeat_window_blocks", 0),
        ("heartbeat_window_blocks", 10_001),
        ("heartbeat_max_misses", 0),
        ("heartbeat_max_challenges", 1_025),
        ("heartbeat_max_challenges", -1),
    ]:
        with pytest.raises(UsageError):
            p.with_change(name, value)
    assert p.with_change("heartbeat_max_challenges", 0).heartbeat_max_challenges == 0


def test_heartbeat_parameters_round_trip_through_genesis_toml() -> None:
    g = Net(params=ALWAYS).genesis
    back = Genesis.from_toml_str(g.to_toml())
    assert back.params == ALWAYS
    assert back.genesis_hash == g.genesis_hash
    assert dataclasses.replace(g, params=PARAMS).genesis_hash != g.genesis_hash
    text = g.to_toml().replace("heartbeat_slash_ppm = 20000", "heartbeat_slash_ppm = 30000")
    assert Genesis.from_toml_str(text).params.heartbeat_slash_ppm == 30_000


def test_governance_turns_challenges_on_and_refuses_bad_values() -> None:
    net = Net()
    net.register(OPERATOR, ENCLAVE, stake=STAKE)
    proposer = KEEPERS[0]
    bad = GovPropose(ProposalAction.PARAM_CHANGE, param="heartbeat_slash_ppm", value=PPM + 1)
    assert net.block(net.tx(proposer, bad)) == [TxRejectReason.INVALID_PARAM]
    changes = [("heartbeat_challenge_ppm", PPM), ("heartbeat_window_blocks", 4)]
    net.block(
        *(
            net.tx(proposer, GovPropose(ProposalAction.PARAM_CHANGE, param=n, value=v))
            for n, v in changes
        )
    )
    pids = [p.id for p in net.state.proposals()]
    assert len(pids) == 2
    net.block(*(net.tx(k, GovVote(pid, True)) for k in KEEPERS for pid in pids))
    while any(p.status == ProposalStatus.OPEN for p in net.state.proposals()):
        assert challenge_at(net.state, net.height) is None
        net.block()
    assert all(p.status == ProposalStatus.PASSED for p in net.state.proposals())
    assert net.state.params.heartbeat_challenge_ppm == PPM
    challenge = challenge_at(net.state, net.height)  # made in the very block that passed them
    assert challenge is not None
    assert challenge.enclaves == (ENCLAVE.public_key,)
    assert challenge.due_height == net.height + 4


# -- vectors ---------------------------------------------------------------------------------


def test_liveness_vectors() -> None:
    text = (Path(__file__).resolve().parents[2] / "protocols" / "settlement.md").read_text()
    v = json.loads(re.findall(r"```json\n(.*?)\n```", text, re.S)[0])
    enclave = Identity.from_seed(bytes.fromhex(v["enclave_seed"]))
    hb = v["heartbeat"]
    seed = challenge_seed(hb["chain_id"], hb["height"], bytes.fromhex(hb["state_root"]))
    assert seed.hex() == hb["seed"]
    sign_bytes = heartbeat_sign_bytes(hb["chain_id"], hb["height"], seed, enclave.public_key)
    assert sign_bytes.hex() == hb["sign_bytes"]
    challenge = Challenge(hb["height"], hb["height"] + 1, seed, (enclave.public_key,))
    answered = MinerHeartbeat.answer(enclave, chain_id=hb["chain_id"], challenge=challenge)
    assert answered.signature.hex() == hb["signature"]
    miners = tuple(bytes([i]) * 32 for i in range(1, 11))
    for case in v["selection"]:
        chosen = select_challenged(seed, miners, case["chance_ppm"], case["most"])
        assert [c[0] for c in chosen] == case["challenged"]
