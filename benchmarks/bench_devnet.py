#!/usr/bin/env python3
"""The example launcher's devnet, one OS process per node, against baselines of the same run.

devnet      ``examples/launch.py --gatekeepers 4 --miners 8 --clients 2 --demo`` (one process
            per node, plus each miner's enclave process and the demo's job client): seconds
            from starting the launcher to every process up, to the first finalized block, to
            every miner registered and advertising to every client, and to the demo's
            confidential job done (settled on chain); the launcher's whole run, stop included.
            Times are the launcher's (each line says "after N s"), plus the time its first
            line took to arrive (the interpreter's start). Memory: the peak RSS
            (VmHWM) of each process, by role.
baselines   one bare node process (``phala-p2p node --role bootstrap``), start to its ready
            line and its peak RSS (median of --bare runs); a one-gatekeeper devnet
            (``--gatekeepers 1 --peers 0 --demo``) to its first finalized block; the smallest
            job devnet (``--gatekeepers 1 --miners 1 --clients 1 --demo``) to its job done.
            Each figure of the big devnet is printed as a ratio against its baseline.

Linux only (RSS from /proc). Every process is on 127.0.0.1; the launcher stops them all.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = [sys.executable, str(REPO / "examples" / "launch.py")]  # by path: never imported
NODE = [sys.executable, "-m", "phala_p2p.cli", "--json", "node"]
MIB = 1024 * 1024
AFTER = re.compile(r"after ([\d.]+)s")
MARKERS = {  # figure -> the launcher's line that marks it
    "up": re.compile(r"^all \d+ processes up after"),
    "first_block": re.compile(r"^first block finalized"),
    "miners": re.compile(r"^\d+ miners registered on chain and advertising"),
    "working": re.compile(r"^devnet working after"),
    "job": re.compile(r"^demo done after"),
}


def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    except OSError:
        return {}


def _kib(value: str | None) -> int:
    return int(value.split()[0]) * 1024 if value else 0


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[int, int]:
    """(parent pid, session id), or (0, 0) if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[1]), int(fields[3])
    except (OSError, IndexError, ValueError):
        return 0, 0


@dataclass
class Run:
    """One launcher run: when each marker line arrived, and each process's peak RSS."""

    seconds: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    peak: dict[int, int] = field(default_factory=dict)  # pid -> VmHWM bytes
    role: dict[int, str] = field(default_factory=dict)  # pid -> role
    output: list[str] = field(default_factory=list)
    code: int = 0


def _sample(run: Run, launcher: int, folder: Path) -> None:
    """Name the launcher's processes by role and record their peak RSS."""
    nodes: dict[int, str] = {}
    try:
        manifest = json.loads((folder / "devnet.json").read_text())
        nodes = {int(n["pid"]): n["role"] for n in manifest["nodes"]}
    except (OSError, ValueError, KeyError):
        pass
    for pid, role in nodes.items():
        run.role[pid] = role
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in nodes:
            continue
        pid = int(entry)
        parent, session = _stat(pid)
        if parent == launcher and b"\0job\0run\0" in _cmdline(pid):
            run.role[pid] = "job client"  # the demo's `phala-p2p job run`
        elif nodes.get(session) == "miner":
            run.role.setdefault(pid, "miner enclave")
    for pid in run.role:
        hwm = _kib(_status(pid).get("VmHWM"))
        if hwm:
            run.peak[pid] = max(run.peak.get(pid, 0), hwm)


def launch(argv: list[str], timeout: float) -> Run:
    run = Run()
    with tempfile.TemporaryDirectory(prefix="bench-devnet-") as tmp:
        folder = Path(tmp) / "net"
        start = time.monotonic()
        proc = subprocess.Popen(
            [*LAUNCHER, *argv, "--dir", str(folder), "--timeout", str(timeout)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert proc.stdout is not None

        def read() -> None:
            assert proc.stdout is not None
            offset = None  # the launcher's own clock starts as it prints its first line
            for line in proc.stdout:
                if offset is None:
                    offset = time.monotonic() - start
                run.output.append(line.rstrip("\n"))
                for name, marker in MARKERS.items():
                    took = AFTER.search(line)
                    if name not in run.seconds and marker.match(line) and took:
                        # the launcher's figure: a first block found while nodes were still
                        # starting is reported with the time it was finalized
                        run.seconds[name] = offset + float(took[1])

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while proc.poll() is None:
            _sample(run, proc.pid, folder)
            time.sleep(0.2)
        run.wall = time.monotonic() - start
        reader.join(timeout=5)
        run.code = proc.returncode
    if run.code != 0:
        tail = "\n".join(run.output[-15:])
        raise SystemExit(f"bench_devnet: launch.py {' '.join(argv)} exited {run.code}:\n{tail}")
    return run


def bare_node() -> tuple[float, int]:
    """Seconds from start to the ready line of one bare node process, and its peak RSS."""
    with tempfile.TemporaryDirectory(prefix="bench-node-") as tmp:
        start = time.monotonic()
        proc = subprocess.Popen(
            [*NODE, "--role", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--data-dir", tmp],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        try:
            proc.stdout.readline()
            ready = time.monotonic() - start
            time.sleep(1.0)  # settled: its background tasks have run
            rss = _kib(_status(proc.pid).get("VmHWM"))
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            proc.stdout.close()
    return ready, rss


def ratio(value: float, base: float) -> str:
    return f"{value / base:6.2f}x" if base else "   n/a"


def main(args: argparse.Namespace) -> int:
    cores = os.cpu_count()
    print(f"bench_devnet: {cores} cores", flush=True)
    bares = [bare_node() for _ in range(args.bare)]
    bare_s = statistics.median(b[0] for b in bares)
    bare_rss = statistics.median(b[1] for b in bares)
    print(
        f"{'baseline: one bare node, start to ready':<44} {bare_s:6.2f} s   "
        f"peak RSS {bare_rss / MIB:6.1f} MiB  (n={len(bares)})",
        flush=True,
    )
    single = launch(["--gatekeepers", "1", "--peers", "0", "--demo"], args.timeout)
    first = single.seconds["first_block"]
    print(f"{'baseline: 1-gatekeeper devnet, first block':<44} {first:6.2f} s", flush=True)
    small = launch(
        ["--gatekeepers", "1", "--miners", "1", "--clients", "1", "--demo"], args.timeout
    )
    print(
        f"{'baseline: 1+1+1 devnet, demo job done':<44} {small.seconds['job']:6.2f} s", flush=True
    )

    g, m, c = args.gatekeepers, args.miners, args.clients
    big = launch(
        ["--gatekeepers", str(g), "--miners", str(m), "--clients", str(c), "--demo"], args.timeout
    )
    processes = 1 + g + m + c
    print(f"devnet of {g} gatekeepers + {m} miners + {c} clients ({processes} node processes)")
    rows = [
        ("every process up", big.seconds.get("up"), bare_s, "one bare node's start"),
        ("first finalized block", big.seconds.get("first_block"),
         first, "1-gatekeeper devnet"),
        ("every miner advertising", big.seconds.get("miners"), None, ""),
        ("height 3 on every node", big.seconds.get("working"), None, ""),
        ("demo job done (settled)", big.seconds.get("job"), small.seconds["job"],
         "1+1+1 devnet"),
        ("the end (every process stopped)", big.wall, small.wall, "1+1+1 devnet"),
    ]  # fmt: skip
    for name, value, base, against in rows:
        if value is None:
            print(f"  {name:<42} (not reached)")
            continue
        versus = f"  ratio {ratio(value, base)} vs {against}" if base else ""
        print(f"  {'start to ' + name:<42} {value:6.2f} s{versus}", flush=True)

    print(f"peak RSS by role (MiB; ratio of the mean to one bare node, {bare_rss / MIB:.1f} MiB)")
    by_role: dict[str, list[int]] = {}
    for pid, role in big.role.items():
        if pid in big.peak:
            by_role.setdefault(role, []).append(big.peak[pid])
    order = ["bootstrap", "gatekeeper", "miner", "miner enclave", "client", "job client"]
    for role in sorted(by_role, key=lambda r: order.index(r) if r in order else len(order)):
        values = by_role[role]
        mean = statistics.mean(values)
        print(
            f"  {role:<14} n={len(values):<3} mean {mean / MIB:6.1f}  max {max(values) / MIB:6.1f}"
            f"  ratio {ratio(mean, bare_rss)}",
            flush=True,
        )
    total = sum(sum(v) for v in by_role.values())
    print(f"  {'all processes':<14} n={sum(map(len, by_role.values())):<3} sum {total / MIB:7.1f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gatekeepers", type=int, default=4)
    parser.add_argument("--miners", type=int, default=8)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--bare", type=int, default=3, help="bare node runs (default 3)")
    parser.add_argument(
        "--timeout", type=float, default=240.0, help="per launcher run (default 240 s)"
    )
    sys.exit(main(parser.parse_args()))
