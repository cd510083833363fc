"""Property: whatever the schedule of partitions, heals, crashes and restarts, with at most one
byzantine double-signer of four, no two different blocks are ever finalized at one height and
no honest gatekeeper ever signs two conflicting votes; once healed and restarted, the chain
moves on."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from .helpers import genesis, identities
from .sim import SimNet

event = st.tuples(
    st.floats(min_value=0.05, max_value=4.0),
    st.sampled_from(["partition", "heal", "crash", "restart", "drop_on", "drop_off"]),
    st.integers(min_value=0, max_value=15),
)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**16),
    byzantine=st.one_of(st.none(), st.integers(min_value=0, max_value=3)),
    events=st.lists(event, max_size=8),
)
def test_no_fork_under_any_schedule(
    seed: int, byzantine: int | None, events: list[tuple[float, str, int]]
) -> None:
    ids = identities(4, seed=seed % 5)
    g = genesis(ids, accounts=[(i, 100_000) for i in ids])
    with tempfile.TemporaryDirectory() as tmp:
        net = SimNet(
            g, ids, Path(tmp), seed=seed, byzantine=[] if byzantine is None else [byzantine]
        )
        try:
            for wait, what, arg in events:
                net.run_for(wait)  # safety is asserted by the harness at every step
                if what == "partition":
                    side = [i for i in range(4) if arg >> i & 1]
                    net.partition(side, [i for i in range(4) if i not in side])
                elif what == "heal":
                    net.heal()
                elif what == "crash":
                    net.crash(arg % 4)
                elif what == "restart" and not net.nodes[arg % 4].alive:
                    net.start(arg % 4)
                elif what == "drop_on":
                    net.drop = 0.3
                elif what == "drop_off":
                    net.drop = 0.0
            net.heal()
            net.drop = 0.0
            for node in net.nodes:
                if not node.alive:
                    net.start(node.index)
            honest = [i for i in range(4) if i != byzantine]
            start = max(net.heights())
            assert net.run_until(lambda: net.min_height(honest) >= start + 2, timeout=120)
            finalized = net.finalized
            for node in net.nodes:
                assert node.store is not None
                for h in range(1, node.store.head() + 1):
                    cb = node.store.get_block(h)
                    assert cb is not None
                    assert cb.block.hash == finalized[h]
        finally:
            net.close()
