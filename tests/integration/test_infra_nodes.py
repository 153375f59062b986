"""infra/nodes.py: namespaces on a private bridge, one cgroup each, torn down even after failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.nodes import ROUTER_ADDRESS, VIP_ADDRESS, Node, NodeSet, sweep_stale
from infra.procs import free_port

pytestmark = [pytest.mark.netns]

HTTP_SERVER = [sys.executable, "-m", "http.server", "--bind", "0.0.0.0"]


def _gone(nodes: NodeSet) -> None:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    for node in nodes:
        assert node.netns not in netns
        assert not node.cgroup.exists()
        assert not Path(f"/sys/class/net/{node.host_veth}").exists()
    assert not Path(f"/sys/class/net/{nodes.bridge}").exists()


_WAIT_LISTENING = """
import socket, sys, time
for _ in range(300):
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()
        break
    except OSError:
        time.sleep(0.02)
else:
    raise SystemExit(1)
"""


def _wait_listening(node: Node, port: int) -> None:
    """Poll from inside the node until something listens on its loopback `port`."""
    assert node.run([sys.executable, "-c", _WAIT_LISTENING, str(port)]).returncode == 0


def test_nodes_talk_over_the_bridge_each_in_its_own_cgroup() -> None:
    port = 8080
    with NodeSet(3) as nodes:
        assert [n.address for n in nodes] == ["10.203.0.10", "10.203.0.11", "10.203.0.12"]
        server = nodes[0].popen([*HTTP_SERVER, str(port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        _wait_listening(nodes[0], port)
        for client in nodes[1:]:
            got = client.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                              f"http://{nodes[0].address}:{port}/"])
            assert got.stdout == "200", got.stderr
        # The server is in node 0's cgroup (the inode is what bpf_get_current_cgroup_id returns).
        assert server.pid in nodes[0].pids()
        cgroup_line = Path(f"/proc/{server.pid}/cgroup").read_text()
        assert f"0::/weft/{nodes[0].cgroup.name}\n" in cgroup_line
        assert len({n.cgroup_id for n in nodes}) == 3
        assert nodes[0].cgroup_id == os.stat(f"/sys/fs/cgroup/unified/weft/{nodes[0].cgroup.name}").st_ino
        # Each node has its own network: its own address and nothing of the host's.
        addrs = nodes[1].run(["ip", "-4", "-br", "addr"]).stdout
        assert "10.203.0.11/24" in addrs and "10.203.0.10" not in addrs
        routes = nodes[1].run(["ip", "route"]).stdout
        assert "default" not in routes, "a node must not route off the machine"
    assert server.wait(timeout=5) is not None
    _gone(nodes)


def test_host_services_on_loopback_are_not_reachable_from_a_node() -> None:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen(1)
        port = listener.getsockname()[1]
        with NodeSet(1) as nodes:
            probe = ("import socket, sys\n"
                     "try:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), 0.5)\n"
                     "except OSError:\n    raise SystemExit(3)")
            assert nodes[0].run([sys.executable, "-c", probe, str(port)]).returncode == 3
    _gone(nodes)


def test_teardown_after_a_failure_kills_node_processes_only() -> None:
    bystander = subprocess.Popen(["sleep", "60"])  # same program, outside any node
    try:
        with pytest.raises(RuntimeError, match="test failed"), NodeSet(2) as nodes:
            sleeper = nodes[1].popen(["sleep", "60"])
            assert sleeper.pid in nodes[1].pids()
            raise RuntimeError("test failed")
        assert sleeper.wait(timeout=5) != 0
        _gone(nodes)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_two_sets_coexist_and_sweep_leaves_live_ones_alone() -> None:
    with NodeSet(1) as a, NodeSet(1) as b:
        assert a[0].netns != b[0].netns and a.bridge != b.bridge
        assert sweep_stale() == []  # both belong to this live process
        assert a[0].run(["true"]).returncode == 0 and b[0].run(["true"]).returncode == 0
    _gone(a)
    _gone(b)


def test_sweep_removes_nodes_of_a_dead_run() -> None:
    code = ("import os\nfrom infra.nodes import NodeSet\n"
            "nodes = NodeSet(2).__enter__()\nprint(nodes.tag, flush=True)\nos._exit(0)  # no teardown")
    repo = Path(__file__).resolve().parents[2]
    tag = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=repo).stdout.strip()
    assert Path(f"/run/netns/weft-{tag}-n0").exists() and Path(f"/sys/class/net/wb{tag}").exists()
    removed = sweep_stale()
    assert f"weft-{tag}-n0" in removed and f"weft-{tag}-n1" in removed
    assert not Path(f"/run/netns/weft-{tag}-n0").exists()
    assert not Path(f"/sys/class/net/wb{tag}").exists()
    assert not Path(f"/sys/fs/cgroup/unified/weft/{tag}-n0").exists()


def test_the_vip_router_dnats_to_the_backend_node() -> None:
    with NodeSet(2, router=True) as nodes:
        assert nodes.router is not None
        backend, client = nodes[0], nodes[1]
        server = backend.popen([*HTTP_SERVER, "8080"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
        _wait_listening(backend, 8080)
        vip = nodes.expose(80, backend, 8080)
        assert vip == f"{VIP_ADDRESS}:80"
        got = client.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{remote_ip}",
                          f"http://{vip}/"])
        assert got.stdout == f"200 {VIP_ADDRESS}", got.stderr  # the client talked to the VIP
        server.terminate()
        _, log = server.communicate(timeout=10)
        # ...and the backend saw the router as its peer: the connection crossed NAT.
        assert f'{ROUTER_ADDRESS} - - ' in log and '"GET / HTTP/1.1" 200' in log
        # Without the router's rule, the VIP is just an address nobody serves on port 81.
        refused = client.run(["curl", "-sS", "--max-time", "3", f"http://{VIP_ADDRESS}:81/"])
        assert refused.returncode != 0
    _gone(nodes)
    assert not Path(f"/run/netns/{nodes.router.netns}").exists()
