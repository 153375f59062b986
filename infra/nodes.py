"""Test "nodes" on this machine: network namespaces on a private bridge, each with its own cgroup.

    with NodeSet(3) as nodes:
        server = nodes[0].popen(["python3", "-m", "http.server", "8080"])
        nodes[1].run(["curl", f"http://{nodes[0].address}:8080/"])

Each node is a netns with one veth (`eth0`, 10.203.0.<10+i>/24) whose peer sits on a bridge in
the root namespace, and a cgroup-v2 leaf /sys/fs/cgroup/unified/weft/<netns>; every process a
node runs joins that cgroup before it execs, so an agent can filter by its cgroup id. The bridge
has no address in the root namespace and forwarding is not touched: nodes reach each other and
nothing else, and two NodeSets (other tests, other helpers) never share a route. Teardown kills
exactly the processes in the node cgroups, then removes namespaces, bridge and cgroups — also
after a failed test, and `sweep_stale()` removes what a killed test run left behind.

`NodeSet(n, router=True)` adds one more namespace, a "service VIP" router in the style of
kube-proxy: `expose(port, backend, backend_port)` DNATs VIP_ADDRESS:port to the backend with
nftables and masquerades, so that a request through the VIP crosses NAT on the way.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from infra.procs import pid_alive

logger = logging.getLogger(__name__)

SUBNET_PREFIX = "10.203.0"
FIRST_HOST = 10
VIP_ADDRESS = f"{SUBNET_PREFIX}.200"     # the "service VIP" clients connect to
ROUTER_ADDRESS = f"{SUBNET_PREFIX}.250"  # the router's own address: backends see it as the peer
CGROUP_PARENT = Path("/sys/fs/cgroup/unified/weft")
_NS_PREFIX = "weft-"
# <tag> is "<creator pid in base36>_<serial>": netns weft-<tag>-<node>, bridge wb<tag>,
# host veth wv<tag>_<i>, cgroup weft/<tag>-<node>.
_NAME = re.compile(r"^weft-(?P<pid>[0-9a-z]{1,5})_(?P<n>\d+)-(?P<node>[a-z0-9]+)$")
_LINK = re.compile(r"^w[bvp](?P<pid>[0-9a-z]{1,5})_\d+(_\d+)?$")
_counter = itertools.count()


class NodeError(RuntimeError):
    """A namespace, link or cgroup operation failed; the message carries the command's stderr."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NodeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


@dataclass(frozen=True)
class Node:
    name: str       # "n0", "n1", ...
    netns: str      # "weft-<tag>-n0"
    address: str    # 10.203.0.10, ...
    cgroup: Path
    host_veth: str  # the veth end on the bridge, in the root namespace

    @property
    def cgroup_id(self) -> int:
        """What bpf_get_current_cgroup_id() returns for this node's processes: the cgroup inode."""
        return os.stat(self.cgroup).st_ino

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in this node's netns (the cgroup is joined by `_join_cgroup`)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def _join_cgroup(self) -> Any:
        """A preexec_fn: the child joins the node's cgroup after fork, before exec, so it is in
        the node when popen() returns. Only raw os calls: it runs in a freshly forked child."""
        procs = str(self.cgroup / "cgroup.procs").encode()

        def join() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0" means the writing process itself
            finally:
                os.close(fd)

        return join

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in this node (it is killed at teardown if still running)."""
        return subprocess.Popen(self.command(argv), preexec_fn=self._join_cgroup(), **kwargs)

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 60)
        return subprocess.run(self.command(argv), preexec_fn=self._join_cgroup(), **kwargs)

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.cgroup / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []


class NodeSet:
    """N test nodes on one private bridge; a context manager that always tears down."""

    def __init__(self, count: int, *, names: Sequence[str] | None = None, router: bool = False) -> None:
        if not 1 <= count <= 200:
            raise ValueError(f"count={count}: 1..200 nodes fit in {SUBNET_PREFIX}.0/24")
        names = list(names or (f"n{i}" for i in range(count)))
        if len(names) != count or any(not re.fullmatch(r"[a-z][a-z0-9]{0,7}", n) for n in names):
            raise ValueError("node names: `count` of them, lowercase letters/digits, at most 8 chars")
        # The tag names the owning process, so sweep_stale() can tell leftovers from live sets.
        self.tag = f"{_base36(os.getpid())}_{next(_counter)}"
        self.bridge = f"wb{self.tag}"
        self.nodes = [
            Node(name=name, netns=f"{_NS_PREFIX}{self.tag}-{name}",
                 address=f"{SUBNET_PREFIX}.{FIRST_HOST + i}", cgroup=CGROUP_PARENT / f"{self.tag}-{name}",
                 host_veth=f"wv{self.tag}_{i}")
            for i, name in enumerate(names)
        ]
        # The optional "service VIP" router: like kube-proxy, it DNATs VIP:port to a backend
        # node (and masquerades, so replies come back through it); see expose().
        self.router: Node | None = None
        if router:
            self.router = Node(name="vip", netns=f"{_NS_PREFIX}{self.tag}-vip", address=ROUTER_ADDRESS,
                               cgroup=CGROUP_PARENT / f"{self.tag}-vip", host_veth=f"wv{self.tag}_{count}")

    @property
    def _all(self) -> list[Node]:
        return self.nodes + ([self.router] if self.router else [])

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def by_name(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def __enter__(self) -> NodeSet:
        sweep_stale()
        try:
            self._create()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()

    def _create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("link", "set", self.bridge, "up")
        CGROUP_PARENT.mkdir(exist_ok=True)
        for node in self._all:
            _ip("netns", "add", node.netns)
            peer = f"wp{self.tag}"  # renamed eth0 inside the node
            _ip("link", "add", node.host_veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", node.netns)
            _ip("-n", node.netns, "link", "set", peer, "name", "eth0")
            _ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _ip("-n", node.netns, "link", "set", "eth0", "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
            _ip("link", "set", node.host_veth, "master", self.bridge)
            _ip("link", "set", node.host_veth, "up")
            node.cgroup.mkdir(exist_ok=True)
        if self.router is not None:
            self._setup_router(self.router)
        logger.info("created %d test nodes on bridge %s: %s", len(self.nodes), self.bridge,
                    ", ".join(f"{n.name}={n.address}" for n in self.nodes))

    def _setup_router(self, router: Node) -> None:
        _ip("-n", router.netns, "addr", "add", f"{VIP_ADDRESS}/32", "dev", "eth0")
        # Forwarding and redirects are per namespace: this touches the router's only.
        sysctl = router.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                             "net.ipv4.conf.eth0.send_redirects=0"])
        if sysctl.returncode != 0:
            raise NodeError(f"router sysctl failed: {sysctl.stderr.strip()}")
        self._nft("add table ip weft_vip\n"
                  "add chain ip weft_vip prerouting { type nat hook prerouting priority dstnat; }\n"
                  "add chain ip weft_vip postrouting { type nat hook postrouting priority srcnat; }\n")

    def _nft(self, script: str) -> None:
        assert self.router is not None
        result = self.router.run(["nft", "-f", "-"], input=script)
        if result.returncode != 0:
            raise NodeError(f"nft in {self.router.netns} failed: {result.stderr.strip()}")

    def expose(self, port: int, backend: Node, backend_port: int) -> str:
        """Make VIP:port reach backend:backend_port through the router's DNAT (the NAT hop);
        returns "VIP:port". Needs NodeSet(..., router=True)."""
        if self.router is None:
            raise NodeError("expose() needs a NodeSet made with router=True")
        self._nft(f"add rule ip weft_vip prerouting ip daddr {VIP_ADDRESS} tcp dport {port} "
                  f"dnat to {backend.address}:{backend_port}\n"
                  f"add rule ip weft_vip postrouting ip daddr {backend.address} tcp dport {backend_port} "
                  "masquerade\n")
        return f"{VIP_ADDRESS}:{port}"

    def teardown(self) -> None:
        """Kill the node processes, remove namespaces, links and cgroups; never raises."""
        for node in self._all:
            _kill_cgroup(node.cgroup)
            _remove_netns(node.netns)
        for link in [self.bridge, f"wp{self.tag}", *(n.host_veth for n in self._all)]:
            _remove_link(link)
        for node in self._all:
            _remove_cgroup(node.cgroup)


def _kill_cgroup(cgroup: Path, timeout_s: float = 5.0) -> None:
    """Kill every process of this (our own) cgroup and wait until it is empty."""
    procs = cgroup / "cgroup.procs"
    if not procs.exists():
        return
    kill = cgroup / "cgroup.kill"
    deadline = time.monotonic() + timeout_s
    while (pids := procs.read_text().split()) and time.monotonic() < deadline:
        if kill.exists():
            kill.write_text("1")
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
        time.sleep(0.02)  # a killed task leaves cgroup.procs when it exits, reaped or not
    if procs.read_text().split():
        logger.warning("processes still in %s after %.0f s", cgroup, timeout_s)


def _remove_netns(name: str) -> None:
    with contextlib.suppress(NodeError):
        if Path(f"/run/netns/{name}").exists():
            _ip("netns", "del", name)


def _remove_link(name: str) -> None:
    if Path(f"/sys/class/net/{name}").exists():
        with contextlib.suppress(NodeError):
            _ip("link", "del", name)


def _remove_cgroup(cgroup: Path) -> None:
    deadline = time.monotonic() + 2.0
    while cgroup.exists():
        try:
            cgroup.rmdir()
        except OSError as exc:
            if time.monotonic() > deadline:
                logger.warning("cannot remove %s: %s", cgroup, exc.strerror)
                return
            time.sleep(0.02)


def sweep_stale() -> list[str]:
    """Remove test nodes whose creating process is gone (a test run killed mid-way)."""
    removed: list[str] = []
    names = os.listdir("/run/netns") if os.path.isdir("/run/netns") else []
    cgroups = os.listdir(CGROUP_PARENT) if CGROUP_PARENT.is_dir() else []
    for name in names + [_NS_PREFIX + c for c in cgroups]:
        match = _NAME.match(name)
        if match is None or pid_alive(int(match["pid"], 36)):
            continue
        tag = f"{match['pid']}_{match['n']}"
        _kill_cgroup(CGROUP_PARENT / f"{tag}-{match['node']}")
        _remove_netns(name)
        _remove_link(f"wb{tag}")
        _remove_cgroup(CGROUP_PARENT / f"{tag}-{match['node']}")
        removed.append(name)
    for link in os.listdir("/sys/class/net"):
        found = _LINK.match(link)
        if found and not pid_alive(int(found["pid"], 36)):
            _remove_link(link)
            removed.append(link)
    if removed:
        logger.info("removed stale test nodes: %s", ", ".join(sorted(set(removed))))
    return removed
