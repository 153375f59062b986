"""The runner on the real kernel with the lineage probe: exec → ProcessInfo merged with /proc,
spawn and exit events, counters, frames with watermarks, and a clean detach."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from probe_agent.config import AgentSettings
from probe_agent.metrics import AgentMetrics
from probe_agent.probes.lineage import LineageProbe
from probe_agent.runner import AgentRunner, _clean_compiler_mappings
from probe_agent.sinks import CaptureSink
from schemas.codec import read_capture

pytestmark = [pytest.mark.bpf]


def bpf_prog_ids_held() -> set[int]:
    """Ids of BPF programs this process has open."""
    ids: set[int] = set()
    for entry in Path("/proc/self/fdinfo").iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue  # an fd closed while we looked
        ids.update(int(line.split()[1]) for line in text.splitlines() if line.startswith("prog_id:"))
    return ids


def compiler_resident_kb() -> int:
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5:
            counting = len(parts) >= 6 and ("libLLVM" in parts[5] or "libclang" in parts[5])
        elif counting and parts[:1] == ["Rss:"]:
            total += int(parts[1])
    return total


SMAPS = """\
7f0000000000-7f0000100000 r-xp 00000000 fe:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                 800 kB
Anonymous:             0 kB
7f0000100000-7f0000200000 r--p 00100000 fe:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                 400 kB
Anonymous:           400 kB
7f0000200000-7f0000300000 rw-p 00200000 fe:01 11 /usr/lib/x86_64-linux-gnu/libLLVM-14.so.1
Rss:                  40 kB
Anonymous:             0 kB
7f0000300000-7f0000400000 r-xp 00000000 fe:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 900 kB
Anonymous:             0 kB
"""


def test_only_unmodified_read_only_compiler_pages_are_shed() -> None:
    # Pages copied on write (Anonymous > 0), writable mappings and other libraries stay.
    assert _clean_compiler_mappings(SMAPS) == [(0x7F0000000000, 0x7F0000100000)]


def loaded_prog_ids() -> set[int]:
    out = subprocess.run(["bpftool", "prog", "show", "--json"], check=True, capture_output=True,
                         text=True).stdout
    return {int(p["id"]) for p in json.loads(out)}


def test_runner_frames_lineage_with_process_info_and_detaches(tmp_path: Path) -> None:
    settings = AgentSettings(node="r1", frame_max_events=64, poll_interval_ms=10)
    metrics = AgentMetrics("r1")
    capture = tmp_path / "r1.wcap"
    runner = AgentRunner(settings, CaptureSink(capture, "r1", metrics), metrics,
                         probes=[LineageProbe()])
    runner.load()
    assert compiler_resident_kb() < 20_000  # shed after compiling (was ~90 MB)
    prog_ids = bpf_prog_ids_held()
    assert prog_ids
    loop = threading.Thread(target=runner.run)
    loop.start()
    service = f"lineage-{uuid.uuid4().hex[:6]}"
    try:
        # The agent never traces itself (here: this test process), so a shell spawns the child.
        shell = subprocess.Popen(["sh", "-c", "sleep 0.2; exit 0"],
                                 env={"OTEL_SERVICE_NAME": service, "PATH": os.environ["PATH"]})
        shell.wait()
        deadline = time.monotonic() + 10
        while metrics.value("weft_agent_events_total", kind="task_exit") < 2:
            assert time.monotonic() < deadline, "no lineage event reached the runner"
            time.sleep(0.02)
    finally:
        runner.request_stop()
        loop.join(timeout=30)
    assert not loop.is_alive()
    assert not prog_ids & bpf_prog_ids_held()
    deadline = time.monotonic() + 5  # the kernel frees a released program asynchronously (RCU)
    while prog_ids & loaded_prog_ids():
        assert time.monotonic() < deadline, f"programs {prog_ids & loaded_prog_ids()} still loaded"
        time.sleep(0.05)

    frames = list(read_capture(capture))
    assert [f.seq for f in frames] == list(range(len(frames)))
    events = [e for f in frames for e in f.events]
    kinds = [str(e.WhichOneof("kind")) for e in events]
    assert kinds[-1] == "watermark"
    spawns = [i for i, e in enumerate(events) if kinds[i] == "thread_spawn"
              and e.thread_spawn.parent_pid == shell.pid and e.thread_spawn.new_process]
    assert spawns, "no spawn event for the shell's child"
    child = events[spawns[0]].thread_spawn.child_pid
    execs = [i for i, e in enumerate(events) if kinds[i] == "process" and e.process.pid == child]
    exits = [i for i, e in enumerate(events) if kinds[i] == "task_exit" and e.task_exit.pid == child]
    assert execs and exits
    # The shell was announced (with its service name) before its spawn event.
    shell_infos = [events[i].process for i in range(spawns[0])
                   if kinds[i] == "process" and events[i].process.pid == shell.pid]
    assert shell_infos and shell_infos[-1].service_name == service
    info = events[execs[-1]].process
    assert (info.exe, info.service_name, info.ppid) == ("sleep", service, shell.pid)
    assert spawns[0] < execs[-1] < exits[-1]
    assert metrics.value("weft_agent_events_total", kind="thread_spawn") >= 1
    assert metrics.value("weft_agent_frames_total") == len(frames)
    assert metrics.value("weft_agent_ringbuf_lost_total", probe="lineage") == 0
    fill = metrics.registry.get_sample_value("weft_agent_bpf_map_fill_ratio",
                                             {"node": "r1", "probe": "lineage", "map": "cgroup_verdict"})
    assert fill == 0.0  # no cgroup filter: no cgroup's verdict is ever asked for


def test_budgeted_rounds_lose_nothing_and_hold_the_watermark_until_the_rings_are_empty(
        tmp_path: Path) -> None:
    # One record per round: the rings cannot be emptied in one round, so the watermark must
    # not pass records still waiting in a ring, and stopping reads them all.
    settings = AgentSettings(node="r2", round_budget=1, poll_interval_ms=10)
    metrics = AgentMetrics("r2")
    capture = tmp_path / "r2.wcap"
    runner = AgentRunner(settings, CaptureSink(capture, "r2", metrics), metrics,
                         probes=[LineageProbe()])
    runner.load()
    shell = subprocess.Popen(["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/true; done"])
    shell.wait()
    t_done = time.time_ns()
    for _ in range(5):
        runner.step()       # 5 rounds of 1 record: far from empty
        time.sleep(0.2)     # a watermark is due every round
    runner.close()
    events = [e for f in read_capture(capture) for e in f.events]
    children = {e.thread_spawn.child_pid for e in events
                if e.WhichOneof("kind") == "thread_spawn" and e.thread_spawn.parent_pid == shell.pid}
    exits = {e.task_exit.pid for e in events if e.WhichOneof("kind") == "task_exit"}
    assert len(children) == 10 and children <= exits
    marks = [(i, e.watermark.ts_ns) for i, e in enumerate(events) if e.WhichOneof("kind") == "watermark"]
    # Every watermark but the final one was taken before the burst was read: none passes it.
    assert len(marks) >= 4
    assert all(ts < t_done for _, ts in marks[:-1])
    assert marks[-1][0] == len(events) - 1 and marks[-1][1] > t_done


@pytest.mark.parametrize("reader", ["mmap", "bcc"])
def test_both_ring_readers_deliver_every_record_through_many_wrap_arounds(
        tmp_path: Path, reader: str) -> None:
    # A 32 KiB ring: 200 children (spawn, exec and exit records, ~270 bytes each: ~160 KiB) wrap
    # it about five times; a round per millisecond keeps it from filling. (The whole machine's
    # processes write to it too: at 16 KiB a 10 ms hiccup of this thread under `make test` lost
    # a record once.)
    settings = AgentSettings(node="r3", ring_pages=8, poll_interval_ms=1, ring_reader=reader)
    metrics = AgentMetrics("r3")
    capture = tmp_path / "r3.wcap"
    runner = AgentRunner(settings, CaptureSink(capture, "r3", metrics), metrics,
                         probes=[LineageProbe()])
    runner.load()
    assert bool(runner._loaded[0].mapped) == (reader == "mmap")
    loop = threading.Thread(target=runner.run)
    loop.start()
    try:
        script = "i=0; while [ $i -lt 100 ]; do /bin/true; sleep 0.002; i=$((i + 1)); done"
        spawner = subprocess.Popen(["sh", "-c", script])
        spawner.wait()
    finally:
        runner.request_stop()
        loop.join(timeout=30)
    events = [e for f in read_capture(capture) for e in f.events]
    kinds = [e.WhichOneof("kind") for e in events]
    children = [e.thread_spawn.child_pid for e, k in zip(events, kinds, strict=True)
                if k == "thread_spawn" and e.thread_spawn.parent_pid == spawner.pid]
    exited = {e.task_exit.pid for e, k in zip(events, kinds, strict=True) if k == "task_exit"}
    exe = {e.process.pid: e.process.exe for e, k in zip(events, kinds, strict=True) if k == "process"}
    assert metrics.value("weft_agent_ringbuf_lost_total", probe="lineage") == 0
    assert metrics.value("weft_agent_decode_errors_total") == 0
    assert len(children) == 200  # /bin/true and sleep
    assert set(children) <= exited
    assert sorted(exe.get(c, "") for c in children) == ["sleep"] * 100 + ["true"] * 100


class _HeldUpRunner(AgentRunner):
    """A runner whose second round is held off the CPU for 400 ms in its middle (as a SIGSTOP
    or a starved CPU would), then stops."""

    rounds = 0

    def step(self) -> None:
        self.rounds += 1
        if self.rounds == 2:
            time.sleep(0.4)
            self.request_stop()
        super().step()


def test_an_agent_held_off_the_cpu_in_the_middle_of_a_round_counts_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = AgentMetrics("held")
    runner = _HeldUpRunner(AgentSettings(node="held"), CaptureSink(tmp_path / "c.wcap", "held", metrics),
                           metrics, probes=[])
    with caplog.at_level("WARNING", logger="probe_agent.runner"):
        runner.run()
    assert metrics.value("weft_agent_late_rounds_total") == 1
    (gap,) = [int(m) for m in re.findall(r"agent was not scheduled for (\d+) ms", caplog.text)]
    assert 350 <= gap < 1000
