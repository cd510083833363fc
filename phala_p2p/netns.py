"""Real partitions between network namespaces (Linux, root, iproute2).

Every host of a lab is a network namespace of its own with one interface, ``eth0``, whose
veth peer is a port of a bridge in the lab's *switch* namespace. Nothing is created in the
namespace this process runs in: the machine's own network is never touched, and the lab's
subnet (default ``10.199.0.0/24``) exists only inside the lab::

    async with open_netlab() as lab:
        a, b, c = [await lab.add_host(name) for name in ("a", "b", "c")]
        argv = [*a.exec_prefix, "phala-p2p", "node", "--listen", a.listen_addr()]
        await lab.partition([a, b], [c])    # a and b hear each other, nobody hears c
        await lab.heal()                    # one bridge again, every link up, no loss
        await lab.link_down(c)              # c's cable pulled at the switch: no carrier
        await lab.set_loss(c, 100.0)        # or every packet c sends dropped (tc netem)

A partition moves the switch ports of each group but the first to a bridge of that group's
own: packets between groups are dropped in silence (no reset, no ICMP), as when a real
network splits; the links stay up. :meth:`NetLab.link_down` takes one host's link down.

Leaving the lab deletes every namespace it created, which deletes their veth pairs and
bridges with them. A process still running in one of them is killed by its pid first
(only this lab's callers can have started it there; a namespace outlives its deletion
while a process is in it). Stop your processes before the lab closes: one that is still
inside ``ip netns exec``, not yet in its namespace, cannot be found that way. Namespaces
are named ``ppn-<pid>-<tag>-...``: a lab sweeps the ones that a dead process left behind
(say, a test run killed with SIGKILL).

Needs root and iproute2 (``ip``); :func:`netns_problem` says why a lab cannot run here.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from phala_p2p.errors import P2PError, UsageError

logger = logging.getLogger(__name__)

PREFIX = "ppn-"
DEFAULT_SUBNET = "10.199.0.0/24"
IP_TIMEOUT = 20.0  # seconds any one `ip`/`tc` command may take
_NAME = re.compile(r"^ppn-(\d+)-[0-9a-f]+-")
_LABEL = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class NetnsError(P2PError):
    """An ``ip`` or ``tc`` command failed: the message names it and carries its stderr."""


@dataclass(frozen=True)
class Host:
    """One host of a lab: a namespace whose ``eth0`` has ``address`` on the lab's subnet."""

    name: str
    netns: str
    address: str
    port: str  # its switch-side veth, in the switch namespace
    ip_path: str = "ip"

    @property
    def exec_prefix(self) -> tuple[str, ...]:
        """Put this before a command to run it in the namespace (``ip netns exec`` execs,
        so the pid that starts is the command's own)."""
        return (self.ip_path, "netns", "exec", self.netns)

    def command(self, argv: Iterable[str]) -> list[str]:
        """``argv`` run in this host's namespace."""
        return [*self.exec_prefix, *argv]

    def listen_addr(self, port: int = 0) -> str:
        """A TCP multiaddr on this host's address (port 0: the kernel picks one)."""
        return f"/ip4/{self.address}/tcp/{port}"


@dataclass
class NetLab:
    """Namespaces, veth pairs and bridges of one lab; made by :func:`open_netlab`."""

    tag: str
    subnet: ipaddress.IPv4Network
    switch: str  # the switch namespace
    ip_path: str
    tc_path: str | None
    hosts: dict[str, Host] = field(default_factory=dict)
    _free: list[str] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)  # created, in order
    _bridges: set[str] = field(default_factory=set)
    _placed: dict[str, str] = field(default_factory=dict)  # host name -> its bridge
    _down: set[str] = field(default_factory=set)
    _lossy: set[str] = field(default_factory=set)

    # -- hosts -----------------------------------------------------------------------------

    async def add_host(self, name: str) -> Host:
        """A new namespace linked to the main bridge, its ``lo`` and ``eth0`` up, with the
        next free address of the subnet."""
        if not _LABEL.match(name):
            raise UsageError(f"host name {name!r}: 1-64 letters, digits, '.', '_' or '-'")
        if name in self.hosts:
            raise UsageError(f"host {name!r} exists already")
        if not self._free:
            raise UsageError(f"no free address left in {self.subnet}")
        index = len(self.hosts) + 1
        ns = f"{PREFIX}{os.getpid()}-{self.tag}-{index}"
        port = f"p{index}"
        address = self._free.pop(0)
        await self._add_namespace(ns)
        await self._ip("-n", self.switch, "link", "add", "name", port, "type", "veth",
                       "peer", "name", "eth0", "netns", ns)  # fmt: skip
        await self._ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        await self._ip("-n", ns, "link", "set", "lo", "up")
        await self._ip("-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        await self._ip("-n", ns, "link", "set", "eth0", "up")
        host = Host(name=name, netns=ns, address=address, port=port, ip_path=self.ip_path)
        self.hosts[name] = host
        self._placed[name] = "br0"
        return host

    def host(self, name: str) -> Host:
        try:
            return self.hosts[name]
        except KeyError as err:
            raise UsageError(f"no host {name!r} in this lab") from err

    # -- cuts ------------------------------------------------------------------------------

    async def partition(self, *groups: Sequence[Host]) -> None:
        """Split the lab: hosts hear only the hosts of their own group. Hosts in no group
        stay with the first. Links stay up; packets across groups are silently lost."""
        if len(groups) < 2:
            raise UsageError("a partition needs at least two groups")
        seen: set[str] = set()
        for group in groups:
            for h in group:
                self._check(h)
                if h.name in seen:
                    raise UsageError(f"host {h.name!r} is in two groups")
                seen.add(h.name)
        for g, group in enumerate(groups):
            bridge = f"br{g}"
            await self._bridge(bridge)
            for h in group:
                await self._place(h, bridge)
        for name, h in self.hosts.items():
            if name not in seen:
                await self._place(h, "br0")

    async def link_down(self, *hosts: Host) -> None:
        """Take each host's link down at the switch: its ``eth0`` loses carrier."""
        for h in hosts:
            self._check(h)
            await self._ip("-n", self.switch, "link", "set", h.port, "down")
            self._down.add(h.name)

    async def link_up(self, *hosts: Host) -> None:
        for h in hosts:
            self._check(h)
            await self._ip("-n", self.switch, "link", "set", h.port, "up")
            self._down.discard(h.name)

    async def set_loss(self, host: Host, percent: float) -> None:
        """Drop ``percent`` of what ``host`` sends (``tc netem`` on its ``eth0``); 0 clears
        it. NetnsError when this kernel has no netem (module ``sch_netem``)."""
        self._check(host)
        if not 0.0 <= percent <= 100.0:
            raise UsageError("loss is a percentage in 0..100")
        if self.tc_path is None:
            raise NetnsError("tc (iproute2) is not installed: no packet loss")
        if percent == 0.0:
            if host.name in self._lossy:
                await self._run(self.tc_path, "-n", host.netns, "qdisc", "del", "dev", "eth0",
                                "root")  # fmt: skip
                self._lossy.discard(host.name)
            return
        try:
            await self._run(self.tc_path, "-n", host.netns, "qdisc", "replace", "dev", "eth0",
                            "root", "netem", "loss", f"{percent}%")  # fmt: skip
        except NetnsError as err:
            if "unknown" in str(err).lower():
                raise NetnsError(f"this kernel has no tc netem (sch_netem): {err}") from err
            raise
        self._lossy.add(host.name)

    async def heal(self) -> None:
        """Undo every cut: all ports on the main bridge, every link up, no loss."""
        for name in sorted(self._lossy):
            await self.set_loss(self.hosts[name], 0.0)
        for name, bridge in sorted(self._placed.items()):
            if bridge != "br0":
                await self._place(self.hosts[name], "br0")
        await self.link_up(*(self.hosts[n] for n in sorted(self._down)))

    # -- plumbing --------------------------------------------------------------------------

    def _check(self, host: Host) -> None:
        if self.hosts.get(host.name) != host:
            raise UsageError(f"host {host.name!r} is not in this lab")

    async def _bridge(self, bridge: str) -> None:
        if bridge not in self._bridges:
            await self._ip("-n", self.switch, "link", "add", "name", bridge, "type", "bridge")
            await self._ip("-n", self.switch, "link", "set", bridge, "up")
            self._bridges.add(bridge)

    async def _place(self, host: Host, bridge: str) -> None:
        if self._placed[host.name] != bridge:
            await self._ip("-n", self.switch, "link", "set", host.port, "master", bridge)
            self._placed[host.name] = bridge

    async def _add_namespace(self, ns: str) -> None:
        await self._ip("netns", "add", ns)
        self._namespaces.append(ns)

    async def _ip(self, *args: str) -> str:
        return await self._run(self.ip_path, *args)

    async def _run(self, *argv: str) -> str:
        return await _run(argv)

    async def _close(self) -> None:
        """Delete every namespace of the lab (switch last), killing any process left in
        one; NetnsError if something could not be deleted."""
        failures: list[str] = []
        for ns in reversed(self._namespaces):
            try:
                await _kill_leftovers(self.ip_path, ns)
            except (NetnsError, OSError, ValueError) as err:
                failures.append(f"{ns}: {err}")
            try:
                await _run((self.ip_path, "netns", "del", ns))
            except (NetnsError, OSError) as err:
                failures.append(f"{ns}: {err}")
        self._namespaces.clear()
        if failures:
            raise NetnsError("lab not fully removed: " + "; ".join(failures))


@asynccontextmanager
async def open_netlab(*, subnet: str = DEFAULT_SUBNET) -> AsyncIterator[NetLab]:
    """A lab with its switch namespace and main bridge ``br0``; see the module's text.
    Everything it created is deleted on the way out, also on an error or a cancel."""
    problem = netns_problem()
    if problem:
        raise NetnsError(problem)
    net = ipaddress.ip_network(subnet)
    if not isinstance(net, ipaddress.IPv4Network) or not net.is_private or net.prefixlen > 29:
        raise UsageError(f"subnet {subnet}: a private IPv4 network of at least 8 addresses")
    ip_path = shutil.which("ip")
    assert ip_path is not None  # netns_problem checked it
    await _sweep_stale(ip_path)
    lab = NetLab(
        tag=secrets.token_hex(3),
        subnet=net,
        switch="",
        ip_path=ip_path,
        tc_path=shutil.which("tc"),
        _free=[str(a) for a in net.hosts()],
    )
    lab.switch = f"{PREFIX}{os.getpid()}-{lab.tag}-sw"
    try:
        await lab._add_namespace(lab.switch)
        await lab._bridge("br0")
        yield lab
    finally:
        with trio.CancelScope(shield=True):
            await lab._close()


def netns_problem() -> str | None:
    """Why a lab cannot run here (not Linux, not root, no ``ip``, no namespaces), or None.
    Creates and deletes a probe namespace: call it once, say to skip a test."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root"
    ip_path = shutil.which("ip")
    if ip_path is None:
        return "iproute2 is not installed (no `ip` command)"
    probe = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}-probe"
    try:
        made = subprocess.run(
            [ip_path, "netns", "add", probe], capture_output=True, text=True, timeout=IP_TIMEOUT
        )
        if made.returncode != 0:
            return f"`ip netns add` failed: {made.stderr.strip()}"
        veth = subprocess.run(
            [ip_path, "-n", probe, *"link add name va type veth peer name vb".split()],
            capture_output=True,
            text=True,
            timeout=IP_TIMEOUT,
        )
        if veth.returncode != 0:
            return f"no veth pairs in a namespace: {veth.stderr.strip()}"
        return None
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`ip netns` does not work here: {err}"
    finally:
        subprocess.run([ip_path, "netns", "del", probe], capture_output=True, timeout=IP_TIMEOUT)


async def _run(argv: Sequence[str]) -> str:
    try:
        with trio.fail_after(IP_TIMEOUT):
            done = await trio.run_process(
                list(argv), capture_stdout=True, capture_stderr=True, check=False
            )
    except trio.TooSlowError as err:
        raise NetnsError(f"{' '.join(argv)}: no answer within {IP_TIMEOUT}s") from err
    if done.returncode != 0:
        err_text = done.stderr.decode(errors="replace").strip()
        raise NetnsError(f"{' '.join(argv)} failed ({done.returncode}): {err_text}")
    return str(done.stdout.decode(errors="replace"))


async def _kill_leftovers(ip_path: str, ns: str) -> None:
    """SIGKILL, by pid, each process still in the lab's namespace ``ns``."""
    pids = [int(p) for p in (await _run((ip_path, "netns", "pids", ns))).split()]
    for pid in pids:
        logger.warning("process %d still in namespace %s: killing it", pid, ns)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pids:  # SIGKILL is not instant: poll (no event tells us), for at most 5 s
        with trio.move_on_after(5.0):
            while (await _run((ip_path, "netns", "pids", ns))).split():  # noqa: ASYNC110
                await trio.sleep(0.05)


async def _sweep_stale(ip_path: str) -> None:
    """Delete the namespaces that labs of processes no longer running left behind."""
    listing = await _run((ip_path, "netns", "list"))
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        match = _NAME.match(name)
        if match is None or _alive(int(match.group(1))):
            continue
        logger.warning("deleting namespace %s left behind by process %s", name, match.group(1))
        try:
            await _run((ip_path, "netns", "del", name))
        except NetnsError as err:
            logger.warning("could not delete %s: %s", name, err)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
