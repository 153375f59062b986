"""The runner's per-event step against real processes: ProcessInfo once per process and before
its first event, re-announced after exec, the --pid filter following children, the agent's own
events dropped."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from probe_agent.config import AgentSettings
from probe_agent.metrics import AgentMetrics
from probe_agent.runner import AgentRunner
from probe_agent.sinks import CaptureSink
from schemas import weft_events_pb2 as pb


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    env = {"PATH": os.environ["PATH"], "OTEL_SERVICE_NAME": "sleepy"}
    procs = [subprocess.Popen(["sleep", "60"], env=env) for _ in range(3)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def runner_for(tmp_path: object, **settings: object) -> AgentRunner:
    s = AgentSettings(node="p1", **settings)  # type: ignore[arg-type]
    metrics = AgentMetrics("p1")
    return AgentRunner(s, CaptureSink(f"{tmp_path}/p.wcap", "p1", metrics), metrics, probes=[])


def http(pid: int, ts: int) -> pb.Event:
    return pb.Event(http=pb.HttpRequest(role=pb.ROLE_SERVER, pid=pid, tid=pid, start_ns=ts, method="GET"))


def prepared(runner: AgentRunner, events: list[pb.Event]) -> list[pb.Event]:
    batch = runner._prepare(events)
    assert len(batch.times) == len(batch.events) == len(batch.weights)
    return batch.events


def described(events: list[pb.Event]) -> list[tuple[str, int]]:
    out = []
    for e in events:
        kind = str(e.WhichOneof("kind"))
        body = getattr(e, kind)
        out.append((kind, body.parent_pid if kind == "thread_spawn" else body.pid))
    return out


def test_process_info_once_before_first_event_and_again_after_exec(
        tmp_path: object, sleepers: list[subprocess.Popen[bytes]]) -> None:
    runner = runner_for(tmp_path)
    a, b = sleepers[0].pid, sleepers[1].pid
    out = prepared(runner, [http(a, 10), http(b, 11), http(a, 12), http(os.getpid(), 13)])
    assert described(out) == [("process", a), ("http", a), ("process", b), ("http", b), ("http", a)]
    info = out[0].process
    assert (info.exe, info.service_name, info.ts_ns) == ("sleep", "sleepy", 10)
    # exec: the kernel's ProcessInfo is merged with /proc and announced again
    exec_event = pb.Event(process=pb.ProcessInfo(pid=a, ts_ns=20, exe="sleep", service_name="sleep",
                                                 start_ns=5, cgroup_id=info.cgroup_id))
    out = prepared(runner, [exec_event, http(a, 21)])
    assert described(out) == [("process", a), ("http", a)]
    assert (out[0].process.service_name, out[0].process.start_ns, out[0].process.ts_ns) == ("sleepy", 5, 20)
    # exit: forgotten, so a reused pid is announced again
    out = prepared(runner, [pb.Event(task_exit=pb.TaskExit(pid=a, tid=a, ts_ns=30)), http(a, 31)])
    assert described(out) == [("task_exit", a), ("process", a), ("http", a)]
    assert runner.metrics.value("weft_agent_events_total", kind="http") == 6


def test_pid_filter_follows_children_until_they_exit(
        tmp_path: object, sleepers: list[subprocess.Popen[bytes]]) -> None:
    a, b, c = (p.pid for p in sleepers)
    runner = runner_for(tmp_path, pids=(a,))
    spawn = pb.Event(thread_spawn=pb.ThreadSpawn(parent_pid=a, parent_tid=a, child_pid=c, child_tid=c,
                                                 new_process=True, ts_ns=1))
    out = prepared(runner, [http(b, 0), spawn, http(c, 2), http(a, 3)])
    assert described(out) == [("process", a), ("thread_spawn", a), ("process", c), ("http", c),
                              ("http", a)]
    out = prepared(runner, [pb.Event(task_exit=pb.TaskExit(pid=c, tid=c, ts_ns=4)), http(c, 5)])
    assert described(out) == [("task_exit", c)]
