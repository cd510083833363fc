#!/usr/bin/env python3
"""Run every benchmark in turn; each prints ratios against its own in-run baseline.

The gossip burst runs with 200 messages here (about 10 minutes on 2 cores with all three
variants); `benchmarks/bench_gossip.py --count 1000` is the full burst. Each benchmark has
a time limit, so a stuck baseline cannot hang `make bench`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    # each chain benchmark in its own process, so that one's teardown cannot slow another
    (["bench_chain.py", "--only", "catchup"], 600),
    (["bench_chain.py", "--only", "throughput"], 900),
    (["bench_chain.py", "--only", "latency"], 900),
    (["bench_stream.py"], 900),
    (["bench_gossip.py", "--count", "200"], 1500),
    (["bench_tee.py"], 900),
    (["bench_market.py", "--only", "agreement"], 600),
    # the 20 miners, each node its own process (one process cannot carry 20)
    (["bench_market.py", "--only", "convergence", "--processes", "--rounds", "5"], 900),
    # confidential jobs: each part in its own process and devnet (about 10 s, 30 s, 60 s)
    (["bench_jobs.py", "--only", "handshake"], 300),
    (["bench_jobs.py", "--only", "e2e"], 600),
    (["bench_jobs.py", "--only", "throughput"], 900),
    # the example launcher's devnet, one process per node: 4 gatekeepers, 8 miners, 2 clients
    # and its baselines (about 2 minutes on 2 cores)
    (["bench_devnet.py"], 600),
]

if __name__ == "__main__":
    failed = False
    for args, limit in BENCHES:
        print(f"== {' '.join(args)}", flush=True)
        try:
            code = subprocess.call([sys.executable, str(HERE / args[0]), *args[1:]], timeout=limit)
        except subprocess.TimeoutExpired:
            print(f"!! {args[0]} did not finish within {limit}s", flush=True)
            code = 1
        failed |= code != 0
    sys.exit(1 if failed else 0)
