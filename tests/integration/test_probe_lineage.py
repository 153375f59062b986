"""Lineage probe on the real kernel: clone (thread and process), exec, exit; the handler-thread link."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from probe_agent.probes.http import HttpProbe
from probe_agent.probes.lineage import LineageProbe
from schemas import weft_events_pb2 as pb
from tests.integration.probe_harness import LoadedProbe, loaded
from tests.workloads.servers import running

pytestmark = pytest.mark.bpf

CHILD = """
import os, threading
print(os.getpid(), os.getppid(), flush=True)
t = threading.Thread(target=lambda: print(threading.get_native_id(), flush=True))
t.start(); t.join()
"""


@pytest.fixture(scope="module")
def lineage() -> Iterator[LoadedProbe]:
    with loaded(LineageProbe()) as lp:
        yield lp


def test_process_thread_exec_exit(lineage: LoadedProbe) -> None:
    # via sh: the test process plays the agent, whose own clones are not traced
    proc = subprocess.run(
        ["sh", "-c", f"{sys.executable} -c '{CHILD}'; true"], check=True, capture_output=True, text=True
    )
    pid, sh_pid, thread_tid = (int(x) for x in proc.stdout.split())

    def mine(es: list[pb.Event]) -> list[pb.Event]:
        return [
            e
            for e in es
            if (e.HasField("task_exit") and e.task_exit.tid in (thread_tid,))
            or (e.HasField("thread_spawn") and e.thread_spawn.child_tid == thread_tid)
        ]

    events = lineage.wait_for(lambda es: len(mine(es)) >= 2)
    spawn = next(e.thread_spawn for e in mine(events) if e.HasField("thread_spawn"))
    assert spawn.parent_pid == pid
    assert (spawn.child_pid, spawn.new_process) == (pid, False)
    assert spawn.parent_tid == pid  # the main thread started it
    events = lineage.wait_for(lambda es: any(e.HasField("task_exit") and e.task_exit.tid == pid for e in es))
    procs = [e.process for e in events if e.HasField("process") and e.process.pid == pid]
    assert procs and procs[-1].exe.startswith("python") and procs[-1].ppid == sh_pid
    assert procs[-1].start_ns <= procs[-1].ts_ns
    forks = [e.thread_spawn for e in events if e.HasField("thread_spawn") and e.thread_spawn.child_tid == pid]
    assert len(forks) == 1 and forks[0].new_process and forks[0].parent_pid == sh_pid
    exits = [e.task_exit for e in events if e.HasField("task_exit") and e.task_exit.pid == pid]
    assert {x.tid for x in exits} == {pid, thread_tid}


def test_thread_per_request_server_links_handler_to_acceptor(lineage: LoadedProbe, tmp_path: Path) -> None:
    with loaded(HttpProbe()) as http, running("python", tmp_path, mode="thread-per-request") as srv:
        subprocess.run(
            ["curl", "-s", "-o", "/dev/null", srv.url("/t1"), srv.url("/t2")], check=True, timeout=30
        )

        def served(es: list[pb.Event]) -> list[pb.HttpRequest]:
            return [
                e.http
                for e in es
                if e.HasField("http")
                and e.http.role == pb.ROLE_SERVER
                and e.http.tuple.local_port == srv.port
            ]

        reqs = served(http.wait_for(lambda es: len(served(es)) >= 2))
        spawns = {
            e.thread_spawn.child_tid: e.thread_spawn
            for e in lineage.snapshot()
            if e.HasField("thread_spawn") and e.thread_spawn.parent_pid == srv.pid
        }
    assert [r.path for r in sorted(reqs, key=lambda r: r.start_ns)] == ["/t1", "/t2"]
    for r in reqs:
        assert r.pid == srv.pid and r.tid != srv.pid
        spawn = spawns[r.tid]  # the handler thread was cloned by the acceptor (the main thread)
        assert spawn.parent_tid == srv.pid and not spawn.new_process
        assert spawn.ts_ns < r.start_ns
