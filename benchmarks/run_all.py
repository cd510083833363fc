#!/usr/bin/env python3
"""Run every benchmark in turn (each prints ratios against its own in-run baseline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ["bench_stream.py", "bench_gossip.py"]

if __name__ == "__main__":
    failed = 0
    for name in BENCHES:
        print(f"== {name}", flush=True)
        failed |= subprocess.call([sys.executable, str(HERE / name)]) != 0
    sys.exit(1 if failed else 0)
