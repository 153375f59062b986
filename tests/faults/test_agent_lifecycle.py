"""The agent refuses to start in one plain sentence when a kernel feature is missing, and leaves
no BPF program loaded or attached after it exits — on SIGTERM (it detaches) and on SIGKILL (the
kernel releases non-pinned programs when the process's fds close). Checked with bpftool.

(Not root → refused: tests/integration/test_agent_cli.py::test_not_root_is_refused_with_one_sentence.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.pipeline import held_prog_ids
from weft.run import WEFT, Child, spawn_agent, wait_agents

pytestmark = [pytest.mark.bpf]


def loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], check=True, capture_output=True,
                         text=True).stdout
    return {int(p["id"]) for p in json.loads(out)}


def attached_prog_ids() -> set[int]:
    """Programs attached through links, to cgroups (the root's tree) or to perf events."""
    ids: set[int] = set()
    links = json.loads(subprocess.run(["bpftool", "link", "show", "--json"], check=True,
                                      capture_output=True, text=True).stdout or "[]")
    ids.update(int(link["prog_id"]) for link in links if "prog_id" in link)
    tree = json.loads(subprocess.run(["bpftool", "cgroup", "tree", "/sys/fs/cgroup/unified", "--json"],
                                     check=True, capture_output=True, text=True).stdout or "[]")
    for cgroup in tree:
        ids.update(int(p["id"]) for p in cgroup.get("programs", []))
    perf = json.loads(subprocess.run(["bpftool", "perf", "show", "--json"], check=True,
                                     capture_output=True, text=True).stdout or "[]")
    ids.update(int(p["prog_id"]) for p in perf if "prog_id" in p)
    return ids


def test_missing_kernel_btf_is_refused_in_one_sentence(tmp_path: Path) -> None:
    # A private mount namespace where /sys/kernel/btf is an empty tmpfs: the kernel "lacks" BTF.
    script = f"mount -t tmpfs none /sys/kernel/btf && exec {WEFT} agent --node x --capture {tmp_path}/x.wcap"
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WEFT_RUN_DIR": str(tmp_path)})
    assert done.returncode == 1, done
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "needs kernel BTF" in lines[0], done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert Path("/sys/kernel/btf/vmlinux").exists()     # the host's view was never touched


def test_no_bpf_program_stays_after_sigterm_or_sigkill(tmp_path: Path) -> None:
    env = {**os.environ, "WEFT_RUN_DIR": str(tmp_path)}
    agents = {sig: spawn_agent(f"life{int(sig)}", tmp_path, capture=tmp_path / f"{int(sig)}.wcap", env=env)
              for sig in (signal.SIGTERM, signal.SIGKILL)}
    try:
        wait_agents(list(agents.values()))
        held = {sig: held_prog_ids(agent.proc.pid) for sig, agent in agents.items()}
        assert all(held.values()), held
        assert held[signal.SIGTERM] <= loaded_prog_ids() and held[signal.SIGKILL] <= loaded_prog_ids()
        assert held[signal.SIGKILL] & attached_prog_ids(), "the agent's programs should be attached"
        for sig, agent in agents.items():
            agent.proc.send_signal(sig)
        assert agents[signal.SIGTERM].proc.wait(60) == 0, agents[signal.SIGTERM].tail()
        assert agents[signal.SIGKILL].proc.wait(30) == -signal.SIGKILL
        mine = held[signal.SIGTERM] | held[signal.SIGKILL]
        deadline = time.monotonic() + 10   # the kernel frees released programs after an RCU grace
        while mine & (loaded_prog_ids() | attached_prog_ids()):
            assert time.monotonic() < deadline, \
                f"still loaded or attached: {mine & (loaded_prog_ids() | attached_prog_ids())}"
            time.sleep(0.1)
        print(f"programs held: SIGTERM agent {len(held[signal.SIGTERM])}, SIGKILL agent "
              f"{len(held[signal.SIGKILL])}; none left loaded or attached")
    finally:
        for agent in agents.values():
            _stop(agent)


def _stop(agent: Child) -> None:
    if agent.alive():
        agent.proc.kill()
    agent.stop(10)
