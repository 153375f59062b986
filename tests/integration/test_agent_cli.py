"""`weft agent` as a person runs it: refusals in one sentence, and a run publishing to Kafka."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from probe_agent.enrich import cgroup2_mount
from schemas.codec import decode_frame
from tests.cgroups import private_cgroup

ROOT = Path(__file__).resolve().parents[2]
WEFT = [sys.executable, "-c", "from weft.cli import main; main()"]


def run_weft(*args: str, user: int | None = None, prefix: tuple[str, ...] = (),
             timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    if user:
        prefix = ("setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *prefix)
    return subprocess.run([*prefix, *WEFT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout,
                          env={**os.environ, "WEFT_RUN_DIR": "/tmp/weft-cli-test", **(env or {})})


@pytest.mark.usefixtures("reachable_by_nobody")
def test_not_root_is_refused_with_one_sentence() -> None:
    result = run_weft("agent", "--node", "x", "--capture", "/tmp/never.wcap", user=65534)
    assert result.returncode == 1, result
    assert "weft agent needs root" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.bpf
def test_a_pid_namespace_of_its_own_is_refused_with_one_sentence() -> None:
    """As in a container without hostPID: the kernel's process ids are not this /proc's, so the
    agent would attribute requests to the wrong processes and trace its own Kafka traffic."""
    container = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc")  # no agent outlives a failure
    result = run_weft("agent", "--node", "x", "--capture", "/tmp/never.wcap", prefix=container)
    assert result.returncode == 1, result
    assert result.stdout.strip().splitlines()[-1] == (
        "weft agent cannot run here: the agent runs in a PID namespace of its own (a container's): "
        "the kernel names processes by the host's ids, which this /proc does not show, and the agent "
        "could not tell its own traffic apart; run it in the host's PID namespace (Kubernetes: "
        "hostPID: true; docker run --pid=host)"), result
    assert "Traceback" not in result.stdout + result.stderr
    doctor = run_weft("doctor", prefix=container)
    assert doctor.returncode == 1 and "PID namespace: its own (a container's)" in doctor.stdout
    assert "BLOCKING: the agent runs in a PID namespace of its own" in doctor.stderr
    assert "PID namespace: the host's" in run_weft("doctor").stdout


@pytest.mark.bpf
def test_a_container_s_own_cgroup_hierarchy_is_named_and_injection_refused() -> None:
    """As a container runtime sets a container up: its own cgroup namespace, below the host's
    root, and cgroup2 mounted afresh in it. sock_ops attached at that mount's root would see
    that container's sockets alone, so header injection is refused, saying why."""
    mount = cgroup2_mount()
    with private_cgroup("weft-ctr") as cgroup:
        script = (f"echo $$ > {cgroup}/cgroup.procs && exec unshare --cgroup --mount --propagation "
                  f"private sh -c 'umount -l {mount} && mount -t cgroup2 none {mount} && exec \"$0\" "
                  f"\"$@\"' \"$@\"")

        def inside(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["sh", "-c", script, "sh", *WEFT, *args], cwd=ROOT, text=True,
                                  capture_output=True, timeout=60,
                                  env={**os.environ, "WEFT_RUN_DIR": "/tmp/weft-cli-test"})

        doctor = inside("doctor")
        agent = inside("agent", "--node", "x", "--capture", "/tmp/never.wcap", "--inject-headers")
    why = (f"the cgroup v2 hierarchy at {mount} is this container's own, not the host's (its cgroup "
           "namespace starts below the host's root), so header injection would reach this container "
           "alone and --cgroup cannot name another one; mount the host's /sys/fs/cgroup there "
           "(Kubernetes: a hostPath volume)")
    assert f"cgroup v2: {why}" in doctor.stdout, doctor.stdout + doctor.stderr
    assert f"header injection: form (b), sock_ops + sk_msg, is not available here: {why}." in doctor.stdout
    assert agent.returncode == 1, agent
    assert agent.stdout.strip().splitlines()[-1] == (
        f"weft agent --inject-headers: form (b), sock_ops + sk_msg, is not available here: {why}.")
    assert "cgroup v2: the host's whole hierarchy is mounted" in run_weft("doctor").stdout


def test_unknown_cgroup_is_refused_with_one_sentence() -> None:
    result = run_weft("agent", "--node", "x", "--capture", "/tmp/never.wcap",
                      "--cgroup", f"/no-such-{uuid.uuid4().hex}")
    assert result.returncode == 2, result
    assert "does not exist" in result.stdout and "Traceback" not in result.stderr


def test_bad_setting_names_the_key() -> None:
    result = run_weft("agent", "--node", "has space", "--capture", "/tmp/never.wcap")
    assert result.returncode == 2
    assert "agent.node" in result.stdout
    both = run_weft("agent", "--kafka", "127.0.0.1:1", "--capture", "/tmp/never.wcap")
    assert both.returncode == 2 and "not both" in both.stdout
    # the sampler sets the flags of injected traceparents: read, and refused, only with injection
    sampler = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"}
    bad = run_weft("agent", "--node", "x", "--capture", "/tmp/never.wcap", "--inject-headers", env=sampler)
    assert bad.returncode == 2
    assert bad.stdout.strip() == "weft agent: OTEL_TRACES_SAMPLER_ARG=2: a ratio from 0 to 1", bad


@pytest.mark.bpf
@pytest.mark.slow
def test_agent_publishes_frames_to_kafka_and_never_traces_its_own_traffic(infra: Any,
                                                                          tmp_path: Path) -> None:
    topic = f"agent-cli-{uuid.uuid4().hex[:8]}"
    infra.create_topic(topic, 2)
    env = {**os.environ, "WEFT_RUN_DIR": str(tmp_path), "WEFT_KAFKA_RAW_TOPIC": topic}
    log = tmp_path / "agent.log"
    with open(log, "w") as fh:
        agent = subprocess.Popen([*WEFT, "agent", "--node", "k1", "--kafka", infra.bootstrap],
                                 cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "weft agent k1:" not in log.read_text():
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        subprocess.run(["sh", "-c", "true; true"], check=True)   # some lineage activity
        time.sleep(1.0)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=30) == 0, log.read_text()
    assert "Traceback" not in log.read_text()

    consumer = Consumer({"bootstrap.servers": infra.bootstrap, "group.id": uuid.uuid4().hex,
                         "enable.auto.commit": False})
    meta = consumer.list_topics(topic, timeout=10)
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.topics[topic].partitions])
    frames = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msgs = consumer.consume(1000, timeout=1.0)
        frames += [decode_frame(m.value()) for m in msgs if m.error() is None]
        if frames and not msgs:
            break
    consumer.close()
    assert frames
    assert {f.node for f in frames} == {"k1"}
    assert [f.seq for f in frames] == list(range(len(frames)))
    events = [e for f in frames for e in f.events]
    assert sum(e.WhichOneof("kind") == "watermark" for e in events) >= 5
    for e in events:
        body = getattr(e, str(e.WhichOneof("kind")))
        assert agent.pid not in (getattr(body, "pid", None), getattr(body, "parent_pid", None)), e


def test_an_agent_that_was_not_scheduled_says_so(tmp_path: Path) -> None:
    """A starved agent (here: stopped for a second) logs and counts the gap on its next round, the
    likely cause of any ring-buffer loss it reports next."""
    log = tmp_path / "agent.log"
    env = {**os.environ, "WEFT_RUN_DIR": str(tmp_path / "run")}
    with open(log, "wb") as fh:
        argv = [*WEFT, "-v", "agent", "--node", "starved", "--capture", str(tmp_path / "c.wcap")]
        agent = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while "weft agent starved:" not in log.read_text():
            assert agent.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        agent.send_signal(signal.SIGSTOP)
        time.sleep(1.2)
        agent.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not _gaps(log) or max(_gaps(log)) < 1000:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, log.read_text()[-2000:]
    assert max(_gaps(log)) < 10_000


def _gaps(log: Path) -> list[int]:
    return [int(ms) for ms in re.findall(r"agent was not scheduled for (\d+) ms", log.read_text())]
